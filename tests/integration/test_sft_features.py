"""The SFT CLI's features as a new user meets them: ZeRO stages, single process, eval and trackers,
packing, data formats, bf16, gradient checkpointing, Adam offload, and the progress line.

Every launch is short (tiny model, a few steps, one epoch); launches shared by several tests are
module-scoped fixtures, so each runs once. The two one-process runs are ``python -m`` forked from this
process (forked.py: the same run, without paying the imports again).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from forked import run_module
from launch import DATA, Result, assert_bitwise_equal, launch_cmd, run, weights

pytestmark = pytest.mark.slow

SFT = "openrl_ckpt.cli.train_sft"
STEP_LINE = re.compile(r"step (\d+)/(\d+) (.+)$")


def sft_args(model: str | Path, data: str | Path, out: Path, *, zero: int = 2, samples: int = 48,
             lr: str = "5e-3", seed: int = 7, extra: tuple[str, ...] = ()) -> list[str]:
    """Question/response SFT, global batch 8 (micro 2), one epoch of ``samples`` rows."""
    return ["--pretrain", str(model), "--dataset", str(data), "--input_key", "question", "--output_key", "response",
            "--input_template", "User: {}\nAssistant: ", "--max_len", "256", "--max_samples", str(samples),
            "--train_batch_size", "8", "--micro_train_batch_size", "2", "--max_epochs", "1",
            "--learning_rate", lr, "--lr_warmup_ratio", "0", "--zero_stage", str(zero), "--save_path", str(out),
            "--logging_steps", "1", "--seed", str(seed), *extra]


def step_metrics(result: Result, key: str = "loss") -> dict[int, dict[str, float]]:
    """{step: {metric: value}} of every rank-0 log line ``step N/M k v k v ...`` that holds ``key``."""
    out: dict[int, dict[str, float]] = {}
    for line in result.output.splitlines():
        m = STEP_LINE.search(line)
        if not m:
            continue
        words = m.group(3).split()
        metrics = {k: float(v) for k, v in zip(words[::2], words[1::2])}
        if key in metrics:
            out.setdefault(int(m.group(1)), {}).update(metrics)
    return out


def tb_scalars(logdir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one scalar in a tensorboard folder (float32, full precision)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert tag in acc.Tags()["scalars"], f"no '{tag}' scalar in {logdir}: {acc.Tags()['scalars']}"
    return {e.step: e.value for e in acc.Scalars(tag)}


def assert_ok(result: Result) -> None:
    assert result.returncode == 0, result.output[-4000:]


def assert_hf_folder(folder: Path) -> None:
    """What a user does with --save_path: load it with transformers, weights stored as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert list(folder.glob("*.safetensors")), f"no safetensors in {folder}: {sorted(p.name for p in folder.iterdir())}"
    assert not list(folder.glob("*.bin")), "weights must be safetensors, not pickle"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("User: hi\nAssistant: ", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------- launches
@pytest.fixture(scope="module")
def zero1_run(tmp_path_factory, tiny_model_dir, sft_data) -> tuple[Result, Path]:
    """2 ranks, ZeRO-1, fp32: 6 steps from the random tiny model."""
    out = tmp_path_factory.mktemp("zero1") / "model"
    return run(launch_cmd(SFT, sft_args(tiny_model_dir, sft_data, out, zero=1))), out


@pytest.fixture(scope="module")
def trained_model(zero1_run) -> Path:
    """The ZeRO-1 run's export: a model with sharper predictions, so a packing bug shows in the loss."""
    result, out = zero1_run
    assert_ok(result)
    return out


def _zero0(root: Path, model: str | Path, data: Path, *flags: str, samples: int = 48) -> tuple[Result, Path, Path]:
    """2 ranks, ZeRO-0, fp32, tensorboard on: the runs compared with each other differ only in ``flags``."""
    out, tb = root / "model", root / "tb"
    result = run(launch_cmd(SFT, sft_args(model, data, out, zero=0, samples=samples,
                                          extra=("--use_tensorboard", str(tb), *flags))))
    return result, out, tb


@pytest.fixture(scope="module")
def zero0_run(tmp_path_factory, tiny_model_dir, sft_data) -> tuple[Result, Path, Path]:
    """6 steps from the random tiny model; the baseline of the gradient-checkpointing run."""
    return _zero0(tmp_path_factory.mktemp("zero0"), tiny_model_dir, sft_data)


# ---------------------------------------------------------------------------------------------- 1. ZeRO 0/1
@pytest.mark.parametrize("zero", [0, 1])
def test_zero_stage_trains_and_exports_a_loadable_hf_model(zero, request):
    result, out, *_ = request.getfixturevalue(f"zero{zero}_run")
    assert_ok(result)
    assert [line for line in result.lines("optimizer: ") if line.endswith(f"optimizer: AdamW, ZeRO stage {zero}, fp32")]
    assert_hf_folder(out)
    losses = step_metrics(result)
    assert sorted(losses) == list(range(1, 7)), f"48 rows / global batch 8 = 6 logged steps, got {sorted(losses)}"
    first, last = losses[1]["loss"], losses[6]["loss"]
    assert last < first - 0.05, f"loss should go down: step 1 {first}, step 6 {last}"


# ---------------------------------------------------------------------------------------------- 7. progress line
def assert_progress(result: Result, steps: int) -> dict[int, dict[str, float]]:
    """Every step's log line carries finite loss, lr, grad_norm and tokens_per_s."""
    logged = step_metrics(result)
    assert sorted(logged) == list(range(1, steps + 1)), f"expected steps 1..{steps}: {result.lines('step ')}"
    for step, m in logged.items():
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            assert key in m, f"step {step} lacks {key}: {m}"
            assert math.isfinite(m[key]), f"step {step}: {key} = {m[key]}"
        assert m["tokens_per_s"] > 0 and m["grad_norm"] > 0 and m["loss"] > 0 and m["lr"] > 0, m
    return logged


@pytest.mark.parametrize("zero", [0, 1])
def test_every_logged_step_reports_throughput_lr_grad_norm_and_loss(zero, request):
    result, *_ = request.getfixturevalue(f"zero{zero}_run")
    assert_ok(result)
    logged = assert_progress(result, 6)
    assert all(m["lr"] <= 5e-3 for m in logged.values())


def test_grad_norm_means_the_same_under_every_zero_stage(zero0_run, zero1_run):
    """ZeRO-0 in fp32 has no DeepSpeed-reported norm (the strategy measures it): step 1 of both runs
    sees the same model and rows, so the pre-clipping global norm must agree."""
    (r0, *_), (r1, *_) = zero0_run, zero1_run
    assert_ok(r0)
    assert_ok(r1)
    g0, g1 = step_metrics(r0)[1]["grad_norm"], step_metrics(r1)[1]["grad_norm"]
    assert g0 == pytest.approx(g1, rel=2e-3), f"step-1 grad_norm: ZeRO-0 {g0}, ZeRO-1 {g1}"
    assert g0 > 1.0, "the norm before clipping (--max_norm 1.0) is logged"


# ---------------------------------------------------------------------------------------------- 2. one process
def test_single_process_zero2_with_eval_tensorboard_wandb_and_no_interim_checkpoints(tmp_path, tiny_model_dir):
    out, tb, ckpt, wandb_dir = tmp_path / "model", tmp_path / "tb", tmp_path / "ckpt", tmp_path / "wandb_root"
    wandb_dir.mkdir()
    # one process: global batch 4 = micro 4, 40 rows -> 10 steps, eval at steps 5 and 10
    args = sft_args(tiny_model_dir, DATA / "sft.jsonl", out, zero=2, samples=40, extra=(
        "--eval_dataset", str(DATA / "eval_sft.jsonl"), "--eval_steps", "5", "--use_tensorboard", str(tb),
        "--use_wandb", "True", "--save_steps", "-1", "--ckpt_path", str(ckpt)))
    args[args.index("--train_batch_size") + 1] = "4"
    args[args.index("--micro_train_batch_size") + 1] = "4"
    result = run_module(SFT, args, WANDB_MODE="offline", WANDB_DIR=str(wandb_dir))
    assert_ok(result)
    assert_hf_folder(out)

    evals = step_metrics(result, "eval_loss")
    assert sorted(evals) == [5, 10], f"--eval_steps 5 over 10 steps: {result.lines('eval_loss')}"
    assert all(0 < m["eval_loss"] < 20 for m in evals.values())

    loss = tb_scalars(tb, "loss")
    assert sorted(loss) == list(range(1, 11))
    assert sorted(tb_scalars(tb, "eval_loss")) == [5, 10]
    logged = assert_progress(result, 10)
    assert loss[1] == pytest.approx(logged[1]["loss"], rel=1e-3), "tensorboard holds the logged values"

    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"one offline wandb run under WANDB_DIR: {list(wandb_dir.rglob('*'))[:20]}"
    assert list(runs[0].glob("*.wandb")), "the offline run holds its history file"

    written = list(ckpt.rglob("global_step*")) if ckpt.exists() else []
    assert written == [], f"--save_steps -1 writes no checkpoint: {written}"


# ---------------------------------------------------------------------------------------------- 3. packing
def test_packing_samples_changes_batching_not_the_loss(tmp_path, trained_model, sft_data):
    """Step 1's loss is computed before any update, on the same rows (same seed, same sampler) and as
    the same token mean per micro batch: packing each micro batch into one row must give the same
    number up to float rounding, whatever the learning rate.

    Method: the values are read from tensorboard (float32) rather than the 4-digit log line, and the
    model is the trained ZeRO-1 export: on it, letting packed samples attend to each other (the bug
    this guards against) moved a 4-sample micro batch's loss by 8e-4 relative when measured, 80x the
    tolerance, while packed and padded differed by 2e-7 (on the random model the leak moves it by
    only 6e-5). The 4-digit log line alone could not tell these apart.
    """
    padded, _, padded_tb = _zero0(tmp_path / "padded", trained_model, sft_data, samples=16)
    assert_ok(padded)
    packed, out, tb = _zero0(tmp_path / "packed", trained_model, sft_data, "--packing_samples", samples=16)
    assert_ok(packed)
    assert_hf_folder(out)
    a, b = tb_scalars(padded_tb, "loss"), tb_scalars(tb, "loss")
    assert sorted(a) == sorted(b) == [1, 2]
    assert a[1] < math.log(512) - 0.5, f"the baseline model is trained (step-1 loss {a[1]})"
    assert b[1] == pytest.approx(a[1], rel=1e-5), f"step-1 loss packed {b[1]} vs padded {a[1]}"
    # step 2 starts from weights that differ by float rounding only: the curves stay together
    assert b[2] == pytest.approx(a[2], rel=1e-4), f"step-2 loss packed {b[2]} vs padded {a[2]}"
    steps_a, steps_b = step_metrics(padded), step_metrics(packed)
    assert steps_b[1]["loss"] == pytest.approx(steps_a[1]["loss"], rel=1e-3), "the 4-digit log lines agree"
    assert steps_b[1]["tokens_per_s"] > 0


# ---------------------------------------------------------------------------------------------- 4. data via the CLI
def test_parquet_and_saved_dataset_blended_with_chat_template_and_max_samples(tmp_path, tiny_model_dir):
    import datasets

    rows = [json.loads(line) for line in (DATA / "sft_messages.jsonl").read_text().splitlines()]
    parquet, saved = tmp_path / "part_a.parquet", tmp_path / "part_b"
    datasets.Dataset.from_list(rows[:60]).to_parquet(str(parquet))
    datasets.Dataset.from_list(rows[60:]).save_to_disk(str(saved))
    out = tmp_path / "model"
    args = ["--pretrain", tiny_model_dir, "--dataset", f"{parquet},{saved}", "--dataset_probs", "0.7,0.3",
            "--apply_chat_template", "--input_key", "messages", "--max_samples", "24", "--max_len", "512",
            "--train_batch_size", "8", "--micro_train_batch_size", "4", "--max_epochs", "1",
            "--learning_rate", "1e-3", "--zero_stage", "2", "--save_path", str(out), "--logging_steps", "1"]
    result = run_module(SFT, args)
    assert_ok(result)
    data_line = result.lines("train data:")
    assert len(data_line) == 1 and "total=24, kept=24," in data_line[0], data_line
    assert_progress(result, 3)  # 24 rows / global batch 8
    assert_hf_folder(out)


# ---------------------------------------------------------------------------------------------- 5. bf16, checkpointing
def test_bf16_zero2_saves_bf16_safetensors(tmp_path, tiny_model_dir, sft_data):
    out = tmp_path / "model"
    result = run(launch_cmd(SFT, sft_args(tiny_model_dir, sft_data, out, zero=2, samples=16, extra=("--bf16",))))
    assert_ok(result)
    assert result.lines("optimizer: AdamW, ZeRO stage 2, bf16")
    saved = weights(out)
    dtypes = {v.dtype for v in saved.values()}
    assert dtypes == {torch.bfloat16}, f"--bf16 exports bf16 weights, got {dtypes}"
    assert_progress(result, 2)
    assert_hf_folder(out)


def test_gradient_checkpointing_gives_bitwise_the_same_weights(tmp_path, tiny_model_dir, sft_data, zero0_run):
    """Recomputing activations in backward must not change a single bit of the result (fp32, CPU)."""
    plain, plain_out, plain_tb = zero0_run
    assert_ok(plain)
    result, out, tb = _zero0(tmp_path, tiny_model_dir, sft_data, "--gradient_checkpointing")
    assert_ok(result)
    assert result.lines("optimizer: AdamW, ZeRO stage 0, fp32, gradient checkpointing"), "the flag took effect"
    assert not plain.lines("gradient checkpointing")
    base = weights(plain_out)
    assert any(not torch.equal(base[k], v) for k, v in weights(Path(tiny_model_dir)).items()), "it trained"
    assert tb_scalars(tb, "loss") == tb_scalars(plain_tb, "loss"), "the same loss at every step, to the bit"
    assert_bitwise_equal(base, weights(out))


# ---------------------------------------------------------------------------------------------- 6. adam offload
def test_adam_offload_zero2_trains(tmp_path, tiny_model_dir, sft_data):
    """DeepSpeedCPUAdam's C++ op is compiled on first use (~3 min on 2 cores, then cached in
    ~/.cache/torch_extensions): the first run on a fresh machine pays that once."""
    out = tmp_path / "model"
    result = run(launch_cmd(SFT, sft_args(tiny_model_dir, sft_data, out, samples=16, extra=("--adam_offload",))))
    assert_ok(result)
    assert result.lines("optimizer: DeepSpeedCPUAdam, ZeRO stage 2, fp32, optimizer states offloaded to the CPU")
    logged = assert_progress(result, 2)
    assert logged[2]["loss"] < logged[1]["loss"]
    assert_hf_folder(out)
