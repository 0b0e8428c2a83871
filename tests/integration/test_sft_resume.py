"""The promise: kill -9 at any moment, rerun the same command, end with the same weights to the bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import assert_bitwise_equal, committed, launch_cmd, run, weights

pytestmark = pytest.mark.slow


def sft_args(model: str, data: Path, ckpt: Path, out: Path, zero: int, max_ckpt_num: int) -> list[str]:
    # 90 rows, global batch 8 (12 steps/epoch, the last one wrapped), micro 2 x 2 ranks = 2 accumulation
    # steps, 2 epochs, a dropout model so RNG restore matters.
    return ["--pretrain", model, "--dataset", str(data), "--input_key", "question", "--output_key", "response",
            "--input_template", "User: {}\nAssistant: ", "--max_len", "256", "--train_batch_size", "8",
            "--micro_train_batch_size", "2", "--max_epochs", "2", "--learning_rate", "5e-4",
            "--zero_stage", str(zero), "--save_steps", "5", "--ckpt_path", str(ckpt), "--load_checkpoint",
            "--max_ckpt_num", str(max_ckpt_num), "--max_ckpt_mem", "10", "--save_path", str(out),
            "--logging_steps", "1", "--seed", "3"]


def test_kill9_anywhere_then_rerun_gives_identical_weights(tmp_path, tiny_dropout_model_dir, sft_data):
    # ZeRO-2 here; a kill -9 and bitwise resume under ZeRO-3 (partitioned weights) is
    # test_dpo_learns_and_resumes_bitwise_under_zero3, and the commit/damage logic is stage-independent.
    zero = 2
    ref_ckpt, ref_out = tmp_path / "ref_ckpt", tmp_path / "ref_out"
    ref = run(launch_cmd("openrl_ckpt.cli.train_sft",
                         sft_args(tiny_dropout_model_dir, sft_data, ref_ckpt, ref_out, zero, max_ckpt_num=1)))
    assert ref.returncode == 0, ref.output[-3000:]
    assert ref.lines("no checkpoint in"), "a fresh --load_checkpoint run says it starts fresh"
    assert committed(ref_ckpt) == ["global_step24"], "--max_ckpt_num 1 keeps only the newest"

    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    cmd = launch_cmd("openrl_ckpt.cli.train_sft", sft_args(tiny_dropout_model_dir, sft_data, ckpt, out, zero, 2))

    # 1) SIGKILL the whole run in the middle of epoch 2 training
    first = run(cmd, kill_when="step 13/24")
    assert first.returncode != 0 and not out.exists()
    assert committed(ckpt)[-1] == "global_step10"

    # 2) rerun; this time every rank dies in the middle of saving step 20 (files written, not committed)
    cmd2 = launch_cmd("openrl_ckpt.cli.train_sft", sft_args(tiny_dropout_model_dir, sft_data, ckpt, out, zero, 2))
    second = run(cmd2, OPENRL_FAULT="before_commit@20:kill")
    assert second.returncode != 0
    assert second.lines("resumed from") and "step 10/24, epoch 0, 80 samples consumed" in second.output
    assert (ckpt / ".tmp-global_step20").exists(), "the kill landed inside the save"
    assert committed(ckpt)[-1] == "global_step15"

    # 3) rerun the same command to the end
    third = run(launch_cmd("openrl_ckpt.cli.train_sft",
                           sft_args(tiny_dropout_model_dir, sft_data, ckpt, out, zero, 2)))
    assert third.returncode == 0, third.output[-3000:]
    assert "step 15/24, epoch 1, 120 samples consumed" in third.output
    assert not (ckpt / ".tmp-global_step20").exists(), "the temp dir of the interrupted save is cleaned up"
    assert committed(ckpt) == ["global_step20", "global_step24"]
    assert_bitwise_equal(weights(ref_out), weights(out))

    # 4) damage the newest checkpoint: the rerun says so, falls back to step 20 and still ends identical
    newest = ckpt / "global_step24"
    manifest = json.loads((newest / "manifest.json").read_text())
    victim = max(manifest["files"], key=lambda n: manifest["files"][n]["size"])
    data = bytearray((newest / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (newest / victim).write_bytes(bytes(data))
    fourth = run(launch_cmd("openrl_ckpt.cli.train_sft",
                            sft_args(tiny_dropout_model_dir, sft_data, ckpt, out, zero, 2)))
    assert fourth.returncode == 0, fourth.output[-3000:]
    assert fourth.lines("is damaged, skipping it") and "crc32 mismatch" in fourth.output
    assert "resumed from" in fourth.output and "step 20/24" in fourth.output
    assert_bitwise_equal(weights(ref_out), weights(out))
