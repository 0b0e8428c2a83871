"""bench/soak_kill.py in small: an SFT ZeRO-2 reference run and one trial, killed -9 at a seeded random moment
and rerun with the same command, ends bitwise equal to the reference (three launches; the closing figures of
the soak come from the bench itself with N >= 20)."""

from __future__ import annotations

import sys

import pytest
from launch import REPO

sys.path.insert(0, str(REPO / "bench"))
from soak_kill import soak, summary  # noqa: E402

pytestmark = pytest.mark.slow


def test_soak_sft_zero2_a_kill_at_a_random_moment_ends_bitwise_equal(tmp_path):
    result = soak("sft", 2, trials=1, seed=1, workdir=tmp_path)
    report = summary(result)
    assert len(result.trials) == 1, report
    for trial in result.trials:
        assert trial.failure is None, report
        assert trial.rerun_exit_code == 0, report
        assert trial.bitwise_equal, report
    assert result.equal_share == 1.0 and result.ok, report
