"""Bad input to train_sft: one ``error:`` line naming the culprit, a non-zero exit, no traceback,
no rank left hanging, and no checkpoint deleted or changed.

One-process cases run as ``python -m`` forked from this process (forked.py: the imports are paid once);
the cases on 2 ranks are real ``deepspeed`` launches."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import pytest
from forked import run_module
from launch import DATA, committed, launch_cmd, run

pytestmark = pytest.mark.slow

MODULE = "openrl_ckpt.cli.train_sft"
TIMEOUT = 120  # every case here ends in seconds; a hung rank would run into this


def sft_args(model: str, data: Path | str, tmp: Path, *extra: str, ckpt: Path | None = None) -> list[str]:
    """A short, valid run; ``extra`` flags come last so they override the defaults (argparse keeps the last)."""
    return ["--pretrain", str(model), "--dataset", str(data), "--input_key", "question", "--output_key", "response",
            "--input_template", "User: {}\nAssistant: ", "--max_len", "128", "--train_batch_size", "4",
            "--micro_train_batch_size", "2", "--max_epochs", "1", "--learning_rate", "1e-4",
            "--ckpt_path", str(ckpt or tmp / "ckpt"), "--save_path", str(tmp / "out"), *extra]


def launch(args: list[str], ranks: int = 0):
    if ranks == 0:
        return run_module(MODULE, args, timeout=TIMEOUT)
    return run(launch_cmd(MODULE, args, ranks=ranks), timeout=TIMEOUT)


def assert_one_error(res, *needles: str, prefix: str = "error:") -> str:
    """Non-zero exit, exactly one error line that holds every needle, and no traceback anywhere."""
    assert res.returncode != 0, res.output[-3000:]
    assert "Traceback" not in res.output, res.output[-5000:]
    errors = [line for line in res.output.splitlines() if line.startswith(prefix)]
    print(*errors, sep="\n")
    assert len(errors) == 1, f"expected one line starting with {prefix!r}, got {errors}\n{res.output[-3000:]}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def snapshot(folder: Path, *, root_mtime: bool = True) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` (itself included) with its size and mtime in ns.

    ``root_mtime=False`` leaves out the mtime of ``folder`` itself: on several ranks the checkpoint
    manager creates and removes a ``.probe-*`` file there to learn which ranks share storage, which
    bumps the folder's mtime though nothing in it changes.
    """
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in [".", *dirs, *files]:
            p = Path(root) / name
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    if not root_mtime:
        out["."] = (0, 0)
    return out


def rows(n: int) -> str:
    return "\n".join((DATA / "sft.jsonl").read_text().splitlines()[:n]) + "\n"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "sft16.jsonl"
    path.write_text(rows(16))
    return path


@pytest.fixture(scope="module")
def saved_ckpt(tmp_path_factory, tiny_model_dir, small_data) -> Path:
    """A real checkpoint from a short successful 2-rank run (16 rows, global batch 4: 4 steps, saves at 2 and 4)."""
    tmp = tmp_path_factory.mktemp("saved")
    res = launch(sft_args(tiny_model_dir, small_data, tmp, "--save_steps", "2", "--load_checkpoint"), ranks=2)
    assert res.returncode == 0, res.output[-3000:]
    assert committed(tmp / "ckpt") == ["global_step2", "global_step4"]
    return tmp / "ckpt"


# ---------------------------------------------------------------- data


def test_missing_dataset(tmp_path, tiny_model_dir):
    missing = tmp_path / "nope" / "train.jsonl"
    res = launch(sft_args(tiny_model_dir, missing, tmp_path))
    assert_one_error(res, "--dataset", str(missing), "no such file")


@pytest.mark.parametrize("kind", ["not_utf8", "bad_parquet", "no_permission"])
def test_unreadable_dataset(kind, tmp_path, tiny_model_dir):
    if kind == "not_utf8":
        path = tmp_path / "data.jsonl"
        path.write_bytes(b'{"question": "caf\xe9", "response": "ok"}\n')
        needles = [str(path), "not UTF-8"]
    elif kind == "bad_parquet":
        path = tmp_path / "data.parquet"
        path.write_bytes(b"this is not parquet at all")
        needles = [str(path), "not a valid parquet file"]
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads files whatever their mode")
        path = tmp_path / "data.jsonl"
        path.write_text(rows(4))
        path.chmod(0)
        needles = [str(path), "cannot read"]
    res = launch(sft_args(tiny_model_dir, path, tmp_path))
    assert_one_error(res, *needles)


@pytest.mark.parametrize("ranks", [0, 2])
def test_line_not_json_names_file_and_line(ranks, tmp_path, tiny_model_dir):
    path = tmp_path / "broken.jsonl"
    good = rows(6).splitlines()
    path.write_text("\n".join([*good[:4], '{"question": "cut off', *good[4:]]) + "\n")
    res = launch(sft_args(tiny_model_dir, path, tmp_path), ranks=ranks)
    assert_one_error(res, f"{path} line 5", "not valid JSON")


@pytest.mark.parametrize("flag", ["--input_key", "--output_key"])
def test_key_absent_from_data(flag, tmp_path, tiny_model_dir, small_data):
    res = launch(sft_args(tiny_model_dir, small_data, tmp_path, flag, "prompt_text"))
    line = assert_one_error(res, flag, "prompt_text")
    assert "question" in line and "response" in line, "the message lists the columns that do exist"


def test_empty_dataset(tmp_path, tiny_model_dir):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    res = launch(sft_args(tiny_model_dir, path, tmp_path))
    assert_one_error(res, "--dataset", "no rows", str(path))


def test_empty_after_length_filter_gives_counts(tmp_path, tiny_model_dir, small_data):
    res = launch(sft_args(tiny_model_dir, small_data, tmp_path, "--max_len", "3"))
    line = assert_one_error(res, str(small_data), "all 16 rows were dropped")
    assert re.search(r"16 prompts longer than --max_len 3", line), line
    assert "0 empty responses" in line


def test_dataset_smaller_than_one_global_batch_trains_and_says_so(tmp_path, tiny_model_dir):
    path = tmp_path / "five.jsonl"
    path.write_text(rows(5))
    res = launch(sft_args(tiny_model_dir, path, tmp_path, "--train_batch_size", "8"))
    assert res.returncode == 0, res.output[-3000:]
    assert "Traceback" not in res.output
    explained = res.lines("not a multiple of the global batch")
    assert explained and "5 samples" in explained[0] and "8" in explained[0], res.output[-3000:]
    assert (tmp_path / "out" / "config.json").exists()


# ---------------------------------------------------------------- flags and paths


def test_batch_size_not_divisible_by_micro_times_world(tmp_path, tiny_model_dir, small_data):
    # 6 = 2 x 3 would do on one process; on 2 ranks it needs a multiple of 2 x 2 = 4
    res = launch(sft_args(tiny_model_dir, small_data, tmp_path, "--train_batch_size", "6"), ranks=2)
    assert_one_error(res, "--train_batch_size 6", "--micro_train_batch_size 2", "world size 2", "= 4")


@pytest.mark.parametrize("kind", ["missing", "empty", "tokenizer_only", "config_without_weights"])
def test_pretrain_folder_without_model(kind, tmp_path, tiny_model_dir, tiny_tokenizer_dir, small_data):
    folder = tmp_path / "model"
    if kind == "empty":
        folder.mkdir()
    elif kind == "tokenizer_only":
        folder = Path(tiny_tokenizer_dir)
        assert not (folder / "config.json").exists()
    elif kind == "config_without_weights":
        shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    res = launch(sft_args(str(folder), small_data, tmp_path))
    line = assert_one_error(res, f"--pretrain {folder}")
    assert {"missing": "no such directory", "empty": "holds no model", "tokenizer_only": "holds no model",
            "config_without_weights": "cannot load"}[kind] in line


@pytest.mark.parametrize("kind", ["a_file", "under_a_file"])
def test_ckpt_path_that_cannot_be_a_directory(kind, tmp_path, tiny_model_dir, small_data):
    blocker = tmp_path / "ckpt_file"
    blocker.write_text("not a folder\n")
    ckpt = blocker if kind == "a_file" else blocker / "sub"
    before = snapshot(tmp_path)
    res = launch(sft_args(tiny_model_dir, small_data, tmp_path, "--save_steps", "2", "--load_checkpoint",
                          ckpt=ckpt))
    assert_one_error(res, f"--ckpt_path {ckpt}")
    assert snapshot(tmp_path) == before
    assert blocker.read_text() == "not a folder\n"


def test_flash_attn_without_the_package(tmp_path, tiny_model_dir, small_data):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    res = launch(sft_args(tiny_model_dir, small_data, tmp_path, "--flash_attn"))
    assert_one_error(res, "--flash_attn", "flash-attn")


def test_load_in_4bit_on_cpu(tmp_path, tiny_model_dir, small_data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = launch(sft_args(tiny_model_dir, small_data, tmp_path, "--load_in_4bit", "--lora_rank", "8"))
    assert_one_error(res, "--load_in_4bit", "GPU")


def test_argparse_error_is_one_line(tmp_path, tiny_model_dir, small_data):
    res = launch(sft_args(tiny_model_dir, small_data, tmp_path, "--train_batch_size", "many"), ranks=0)
    assert_one_error(res, "--train_batch_size", "many", prefix="train_sft: error:")


# ---------------------------------------------------------------- incompatible checkpoints (2 ranks)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> str:
    from openrl_ckpt.utils.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("other_model")), tiny_tokenizer_dir, hidden_size=32)


@pytest.mark.parametrize("change", ["train_batch_size", "model"])
def test_incompatible_checkpoint_is_refused_untouched(change, tmp_path, tiny_model_dir, other_model_dir,
                                                     small_data, saved_ckpt):
    before = snapshot(saved_ckpt, root_mtime=False)
    if change == "model":
        args = sft_args(other_model_dir, small_data, tmp_path, "--save_steps", "2", "--load_checkpoint",
                        ckpt=saved_ckpt)
        needles = ["different model", "--pretrain"]
    else:
        args = sft_args(tiny_model_dir, small_data, tmp_path, "--save_steps", "2", "--load_checkpoint",
                        "--train_batch_size", "8", ckpt=saved_ckpt)
        needles = ["--train_batch_size 4", "uses 8"]
    res = launch(args, ranks=2)
    assert_one_error(res, "--load_checkpoint", str(saved_ckpt / "global_step4"), "cannot continue", *needles)
    assert snapshot(saved_ckpt, root_mtime=False) == before, "the checkpoint folder must not change"
    assert not (tmp_path / "out").exists()
