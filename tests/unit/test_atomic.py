"""utils.atomic: a folder written atomically lands whole, also where its parent does not exist yet."""

from __future__ import annotations

from pathlib import Path

import pytest

from openrl_ckpt.utils.atomic import atomic_folder


def test_atomic_folder_creates_missing_parents(tmp_path: Path) -> None:
    target = tmp_path / "fresh" / "ckpt" / "model"  # --save_path ./ckpt/model in a new directory
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


def test_atomic_folder_failure_leaves_the_previous_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target, replace=True) as tmp:
        (tmp / "weights").write_text("new, half written")
        raise RuntimeError("killed mid-write")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
