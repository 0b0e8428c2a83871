"""Bad input to train_rm / train_dpo / train_kto: one ``error:`` line naming the culprit and a non-zero
exit, or, for recoverable data problems, a warning with the count and a finished run. Each case is one
process: ``python -m`` forked from this one (forked.py: the imports are paid once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from forked import run_module
from launch import DATA
from test_sft_errors import assert_one_error

pytestmark = pytest.mark.slow


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(n: int) -> list[dict]:
    return [json.loads(line) for line in (DATA / "preference.jsonl").read_text().splitlines()[:n]]


def launch(module: str, model: str, data: Path, tmp: Path, *extra: str):
    args = ["--pretrain", model, "--dataset", str(data), "--max_len", "128", "--train_batch_size", "2",
            "--micro_train_batch_size", "2", "--max_epochs", "1", "--save_path", str(tmp / "out"),
            "--ckpt_path", str(tmp / "ckpt"), *extra]
    return run_module(f"openrl_ckpt.cli.{module}", args, timeout=180)


@pytest.mark.parametrize("module", ["train_rm", "train_dpo", "train_kto"])
def test_missing_chosen_or_rejected_key_is_named(module, tmp_path, tiny_model_dir):
    data = write(tmp_path / "p.jsonl", [{k: v for k, v in row.items() if k != "rejected"} | {"worse": row["rejected"]}
                                        for row in pairs(4)])
    res = launch(module, tiny_model_dir, data, tmp_path, "--prompt_key", "prompt")
    assert_one_error(res, str(data), "no column 'rejected' (--rejected_key)", "worse")


def test_identical_pairs_are_counted_and_warned_and_training_goes_on(tmp_path, tiny_model_dir):
    rows = pairs(4)
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[3]["rejected"] = rows[3]["chosen"]
    res = launch("train_dpo", tiny_model_dir, write(tmp_path / "p.jsonl", rows), tmp_path, "--prompt_key", "prompt")
    assert res.returncode == 0, res.output[-3000:]
    assert res.lines("2 pairs have the same chosen and rejected answer"), res.output[-3000:]
    assert "dropped_identical=2" in res.output and (tmp_path / "out" / "model.safetensors").exists()


def test_prompts_longer_than_max_len_are_dropped_with_a_count(tmp_path, tiny_model_dir):
    rows = pairs(6)
    rows[0]["prompt"] = rows[1]["prompt"] = "word " * 200
    res = launch("train_rm", tiny_model_dir, write(tmp_path / "p.jsonl", rows), tmp_path, "--prompt_key", "prompt")
    assert res.returncode == 0, res.output[-3000:]
    assert "kept=4, dropped_prompt_too_long=2" in res.output
    res = launch("train_rm", tiny_model_dir, write(tmp_path / "p.jsonl", rows[:2]), tmp_path, "--prompt_key", "prompt")
    assert_one_error(res, "all 2 pairs were dropped: 2 prompts too long for --max_len 128")


def test_kto_label_that_is_not_boolean_names_the_row(tmp_path, tiny_model_dir):
    rows = [{"prompt": "q", "completion": "a", "label": label} for label in (1, 0, 1, 3)]
    res = launch("train_kto", tiny_model_dir, write(tmp_path / "k.jsonl", rows), tmp_path, "--unpaired_preference",
                 "--input_key", "prompt", "--output_key", "completion")
    assert_one_error(res, "k.jsonl row 4", "'label' (--label_key) must be true/false or 0/1, got 3")


def test_reward_model_head_prefix_must_match_the_saved_head(tmp_path, tiny_model_dir):
    from openrl_ckpt.models.actor import ModelConfig, load_tokenizer
    from openrl_ckpt.models.reward import load_reward_model

    rm = tmp_path / "rm"
    load_reward_model(ModelConfig(pretrain=tiny_model_dir), "score", require_head=False).save_pretrained(rm)
    load_tokenizer(tiny_model_dir).save_pretrained(rm)
    data = write(tmp_path / "p.jsonl", pairs(4))
    res = launch("train_rm", str(rm), data, tmp_path, "--prompt_key", "prompt", "--head_prefix", "value_head")
    assert_one_error(res, "--value_head_prefix value_head", "head is 'score'", "pass --value_head_prefix score")


@pytest.mark.parametrize("module, flags, needle", [
    ("train_rm", ["--normalize_reward"], "--normalize_reward needs --eval_dataset"),
    ("train_dpo", ["--beta", "0"], "--beta must be positive"),
    ("train_dpo", ["--ipo", "--label_smoothing", "0.1"], "not to --ipo"),
    ("train_kto", ["--unpaired_preference", "--vanilla_loss", "--output_key", "chosen"],
     "--vanilla_loss needs paired data"),
])
def test_conflicting_flags(module, flags, needle, tmp_path, tiny_model_dir):
    res = launch(module, tiny_model_dir, write(tmp_path / "p.jsonl", pairs(2)), tmp_path, *flags)
    assert_one_error(res, needle)
