"""Fixtures for the integration tests (launch helpers live in launch.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from launch import DATA, SFT_MODULE, committed, launch_cmd, run, sft_args


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> Path:
    """90 rows of the shipped SFT data: not a multiple of the global batch of 8."""
    path = tmp_path_factory.mktemp("data") / "sft90.jsonl"
    rows = (DATA / "sft.jsonl").read_text().splitlines()[:90]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_model_dir, sft_data) -> Path:
    """The uninterrupted 2-rank SFT run of ``launch.sft_args`` (test_fault_tolerance, test_multinode):
    checkpoints every 5 steps (all kept), its samples per step, its curves."""
    tmp = tmp_path_factory.mktemp("reference")
    res = run(launch_cmd(SFT_MODULE, sft_args(tiny_model_dir, sft_data, tmp / "ckpt", tmp / "out",
                                          "--use_tensorboard", str(tmp / "tb"))),
              OPENRL_SAMPLE_LOG=str(tmp / "samples"))
    assert res.returncode == 0, res.output[-3000:]
    assert committed(tmp / "ckpt") == [f"global_step{s}" for s in (5, 10, 15, 20, 24)]
    return tmp
