"""bench/soak_kill.py in small: an SFT ZeRO-2 reference run and two trials, each killed -9 at a seeded random
moment and rerun with the same command, end bitwise equal to the reference (a reference plus 2 x (kill +
rerun) launches: 6.8 minutes measured on 2 CPU cores shared with other test runs, about 2.5 expected on idle
cores)."""

from __future__ import annotations

import sys

import pytest
from launch import REPO

sys.path.insert(0, str(REPO / "bench"))
from soak_kill import soak, summary  # noqa: E402

pytestmark = pytest.mark.slow


def test_soak_sft_zero2_two_kills_end_bitwise_equal(tmp_path):
    result = soak("sft", 2, trials=2, seed=1, workdir=tmp_path)
    report = summary(result)
    assert len(result.trials) == 2, report
    for trial in result.trials:
        assert trial.failure is None, report
        assert trial.rerun_exit_code == 0, report
        assert trial.bitwise_equal, report
    assert result.equal_share == 1.0 and result.ok, report
