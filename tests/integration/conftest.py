"""Fixtures for the integration tests (launch helpers live in launch.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from launch import DATA


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> Path:
    """90 rows of the shipped SFT data: not a multiple of the global batch of 8."""
    path = tmp_path_factory.mktemp("data") / "sft90.jsonl"
    rows = (DATA / "sft.jsonl").read_text().splitlines()[:90]
    path.write_text("\n".join(rows) + "\n")
    return path
