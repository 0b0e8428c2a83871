"""train_kd end to end on 2 CPU ranks: the same command, started in a fresh folder holding a copy of an
uninterrupted run's step-4 checkpoint, resumes there and ends with that run's weights to the bit; the
distillation loss falls; and a teacher with another tokenizer is refused in one line. (A kill -9 of the
same Trainer and Checkpointer is test_sft_resume.py's and test_fault_tolerance.py's.)"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from forked import run_module
from launch import assert_bitwise_equal, committed, launch_cmd, run, weights
from test_sft_errors import assert_one_error

pytestmark = pytest.mark.slow

MODULE = "openrl_ckpt.cli.train_kd"


def kd_args(student: str, teacher: str, data: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    # 90 rows, global batch 8: 12 steps in one epoch (the last one wrapped), saves every 4
    return ["--pretrain", student, "--teacher_model", teacher, "--dataset", str(data), "--input_key", "question",
            "--output_key", "response", "--max_len", "256", "--train_batch_size", "8",
            "--micro_train_batch_size", "2", "--max_epochs", "1", "--learning_rate", "5e-4",
            "--zero_stage", "2", "--save_steps", "4", "--ckpt_path", str(ckpt), "--load_checkpoint",
            "--save_path", str(out), "--seed", "7", *extra]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer_dir) -> str:
    """A wider, deeper random model with the students' tokenizer."""
    from openrl_ckpt.utils.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("teacher")), tiny_tokenizer_dir, hidden_size=96, num_layers=3,
                            seed=1)


def test_kd_resumed_from_a_copied_checkpoint_gives_identical_weights(tmp_path, tiny_dropout_model_dir,
                                                                     teacher_dir, sft_data):
    ref_out, ref_ckpt = tmp_path / "ref_out", tmp_path / "ref_ckpt"
    ref = run(launch_cmd(MODULE, kd_args(tiny_dropout_model_dir, teacher_dir, sft_data, ref_ckpt,
                                         ref_out, "--kd_loss", "reverse", "--kd_coef", "1")))
    assert ref.returncode == 0, ref.output[-3000:]
    kd = [float(m) for m in re.findall(r"^step \d+/\d+ .*? kd_loss ([0-9.e+-]+)", ref.output, re.M)]
    assert kd[-1] < kd[0], "pure distillation (--kd_coef 1) moves the student towards the teacher"
    assert committed(ref_ckpt) == ["global_step4", "global_step8", "global_step12"]

    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    shutil.copytree(ref_ckpt / "global_step4", ckpt / "global_step4")
    second = run(launch_cmd(MODULE, kd_args(tiny_dropout_model_dir, teacher_dir, sft_data, ckpt, out,
                                            "--kd_loss", "reverse", "--kd_coef", "1")))
    assert second.returncode == 0, second.output[-3000:]
    assert "step 4/12, epoch 0, 32 samples consumed" in second.output
    assert_bitwise_equal(weights(ref_out), weights(out))


def test_teacher_with_another_tokenizer_is_refused(tmp_path, tiny_model_dir, sft_data):
    from openrl_ckpt.utils.tiny import build_tiny_model, build_tiny_tokenizer, example_texts

    build_tiny_tokenizer(str(tmp_path / "tok"), example_texts(), vocab_size=300)
    teacher = build_tiny_model(str(tmp_path / "teacher"), str(tmp_path / "tok"))
    res = run_module(MODULE, kd_args(tiny_model_dir, teacher, sft_data, tmp_path / "ckpt", tmp_path / "out"),
                     timeout=180)  # one process, forked from this one
    assert_one_error(res, f"--teacher_model {teacher}: its tokenizer differs from --pretrain's",
                     "vocabulary sizes 512 and 300")
