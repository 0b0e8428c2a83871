"""Commit protocol, discovery, verification, fallback and rotation, without a process group."""

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from openrl_ckpt.checkpoint.comm import SingleProcessComm
from openrl_ckpt.checkpoint.contents import BytesFile, CheckpointContents
from openrl_ckpt.checkpoint.files import LATEST, MANIFEST, CheckpointError, plan_rotation, start_writeback
from openrl_ckpt.checkpoint.manager import CheckpointManager
from openrl_ckpt.checkpoint.state import STATE_FILE, TrainState
from openrl_ckpt.errors import UserError


def make_state(step):
    return TrainState(algorithm="sft", global_batch_size=8, world_size=1, model_fingerprint="abc",
                      global_step=step, consumed_samples=8 * step)


def writer(payload_bytes=100):
    return CheckpointContents([BytesFile("model/weights.bin", os.urandom(payload_bytes)),
                               BytesFile("model/small.txt", b"x")])


def manager(tmp_path, num=3, mem=1e8):
    m = CheckpointManager(str(tmp_path / "ckpt"), SingleProcessComm(), max_ckpt_num=num, max_ckpt_mem_gb=mem)
    m.prepare()
    return m


def test_save_commits_a_manifest_state_and_latest(tmp_path):
    m = manager(tmp_path)
    path = m.save(make_state(5), writer(), meta={"zero_stage": 2})
    assert path.name == "global_step5"
    assert sorted(os.listdir(path)) == ["manifest.json", "model", STATE_FILE]
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"model/weights.bin", "model/small.txt", STATE_FILE}
    assert manifest["files"]["model/weights.bin"]["size"] == 100
    assert manifest["meta"] == {"zero_stage": 2}
    assert (m.root / LATEST).read_text().strip() == "global_step5"
    state = json.loads((path / STATE_FILE).read_text())
    assert state["global_step"] == 5 and len(state["rng"]) == 1
    assert not [p for p in m.root.iterdir() if p.name.startswith(".")]


def test_find_resumable_takes_the_newest_valid(tmp_path):
    m = manager(tmp_path)
    for step in (2, 4, 6):
        m.save(make_state(step), writer(), meta={})
    r = m.find_resumable()
    assert r is not None and r.step == 6 and r.state.consumed_samples == 48


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "no_manifest", "bad_manifest", "bad_state"])
def test_damaged_newest_falls_back_to_previous(tmp_path, damage, caplog):
    m = manager(tmp_path)
    m.save(make_state(2), writer(), meta={})
    newest = m.save(make_state(4), writer(), meta={})
    weights = newest / "model" / "weights.bin"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:50])
    elif damage == "delete":
        weights.unlink()
    elif damage == "no_manifest":
        (newest / MANIFEST).unlink()
    elif damage == "bad_manifest":
        (newest / MANIFEST).write_text("{not json")
    elif damage == "bad_state":
        # a state file that no longer matches its checksum is caught by verification
        (newest / STATE_FILE).write_text("{}")
    caplog.set_level("WARNING", logger="openrl_ckpt")
    r = m.find_resumable()
    assert r is not None and r.step == 2
    if damage != "no_manifest":  # without a manifest the folder was never committed: skipped silently
        assert "damaged" in caplog.text


def test_nothing_to_resume(tmp_path):
    assert manager(tmp_path).find_resumable() is None


def test_leftover_temp_dirs_are_removed_at_start(tmp_path):
    root = tmp_path / "ckpt"
    (root / ".tmp-global_step9" / "model").mkdir(parents=True)
    (root / ".del-global_step1").mkdir()
    (root / "notes.txt").write_text("mine")
    manager(tmp_path)
    assert sorted(os.listdir(root)) == ["notes.txt"]


def test_uncommitted_folder_is_not_a_checkpoint(tmp_path):
    m = manager(tmp_path)
    m.save(make_state(2), writer(), meta={})
    (m.root / "global_step8").mkdir()  # e.g. copied by hand, no manifest
    assert m.committed_steps() == [2]


def test_rotation_by_count_keeps_newest_and_foreign_files(tmp_path):
    m = manager(tmp_path, num=2)
    (m.root / "global_stepX").mkdir()
    (m.root / "my_notes").mkdir()
    for step in (1, 2, 3, 4):
        m.save(make_state(step), writer(), meta={})
    assert m.committed_steps() == [4, 3]
    assert (m.root / "global_stepX").exists() and (m.root / "my_notes").exists()


def test_rotation_by_size(tmp_path):
    m = manager(tmp_path, num=10)
    one = json.loads(m.save(make_state(1), writer(100_000), meta={}).joinpath(MANIFEST).read_text())["total_bytes"]
    m.max_bytes = 2.5 * one  # room for two checkpoints, not three
    for step in (2, 3):
        m.save(make_state(step), writer(100_000), meta={})
    assert m.committed_steps() == [3, 2]


def test_rotation_never_deletes_the_only_checkpoint(tmp_path):
    m = manager(tmp_path, num=1, mem=1e-9)
    m.save(make_state(1), writer(), meta={})
    m.save(make_state(2), writer(), meta={})
    assert m.committed_steps() == [2]


@pytest.mark.parametrize("committed,keep,num,mem,pinned,expected", [
    ([(1, 10), (2, 10), (3, 10)], 3, 2, 1e9, (), [1]),
    ([(1, 10), (2, 10), (3, 10)], 3, 5, 15, (), [1, 2]),
    ([(1, 10), (2, 10), (3, 10)], 3, 1, 1e9, (1,), [2]),
    ([(5, 10)], 5, 1, 1, (), []),
    ([(1, 10), (2, 10), (3, 10)], 3, 3, 1e9, (), []),
])
def test_plan_rotation(committed, keep, num, mem, pinned, expected):
    assert plan_rotation(committed, keep, num, mem, frozenset(pinned)) == expected


def test_ckpt_path_that_is_a_file_is_a_user_error(tmp_path):
    f = tmp_path / "ckpt"
    f.write_text("not a dir")
    with pytest.raises(UserError, match="not a directory"):
        CheckpointManager(str(f), SingleProcessComm(), max_ckpt_num=1, max_ckpt_mem_gb=1).prepare()


def test_failed_write_keeps_previous_checkpoint_and_cleans_temp(tmp_path, monkeypatch):
    m = manager(tmp_path)
    m.save(make_state(1), writer(), meta={})
    monkeypatch.setenv("OPENRL_FAULT", "before_commit:raise=ENOSPC")
    with pytest.raises(CheckpointError, match=r"checkpoint save failed: .*\.tmp-global_step2.*No space left"):
        m.save(make_state(2), writer(), meta={})
    monkeypatch.delenv("OPENRL_FAULT")
    assert m.committed_steps() == [1]
    assert not [p for p in m.root.iterdir() if p.name.startswith(".tmp")], "the failed save cleans up itself"
    assert m.find_resumable().step == 1


def test_bad_limits_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--max_ckpt_num"):
        CheckpointManager(str(tmp_path), SingleProcessComm(), max_ckpt_num=0, max_ckpt_mem_gb=1)
    with pytest.raises(UserError, match="--max_ckpt_mem"):
        CheckpointManager(str(tmp_path), SingleProcessComm(), max_ckpt_num=1, max_ckpt_mem_gb=0)


# ---------------------------------------------------------------- background saves and I/O faults


def bg_manager(tmp_path, num=3):
    m = CheckpointManager(str(tmp_path / "ckpt"), SingleProcessComm(), max_ckpt_num=num, max_ckpt_mem_gb=1e8,
                          background_comm=SingleProcessComm())
    m.prepare()
    return m


@dataclass(frozen=True)
class GatedFile:
    """A staged file whose write waits for ``gate`` (a background write still in progress)."""

    path: str
    data: bytes
    gate: Any = None

    def write(self, folder: Path) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        BytesFile(self.path, self.data).write(folder)


def deferred(payload: bytes, gate=None):
    """Contents captured now and written later (as the strategy's staged engine files are)."""
    return CheckpointContents([GatedFile("model/weights.bin", payload, gate)])


def test_background_save_commits_after_wait_and_keeps_the_state_of_its_step(tmp_path):
    import threading

    m = bg_manager(tmp_path)
    gate = threading.Event()
    state = make_state(4)
    path = m.save(state, deferred(b"w4", gate), meta={}, background=True)
    state.global_step = 5  # training moves on while the save is written
    assert m.committed_steps() == [] and (m.root / ".tmp-global_step4").is_dir()
    gate.set()
    assert m.wait() == path == m.root / "global_step4"
    assert m.committed_steps() == [4]
    assert json.loads((path / STATE_FILE).read_text())["global_step"] == 4
    assert m.find_resumable().step == 4
    assert m.wait() is None, "nothing in flight any more"


def test_next_save_waits_for_the_running_one(tmp_path):
    m = bg_manager(tmp_path, num=10)
    for step in (1, 2, 3):
        m.save(make_state(step), deferred(bytes([step])), meta={}, background=True)
    m.wait()
    assert m.committed_steps() == [3, 2, 1]


def test_failed_background_save_is_reported_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    m = bg_manager(tmp_path)
    m.save(make_state(1), deferred(b"ok"), meta={}, background=True)
    m.wait()
    monkeypatch.setenv("OPENRL_FAULT", "write@2:raise=ENOSPC")
    m.save(make_state(2), deferred(b"x"), meta={}, background=True)
    deadline = time.monotonic() + 10
    while not m.background_failed():
        assert time.monotonic() < deadline, "the failing background save did not end"
        time.sleep(0.01)
    with pytest.raises(CheckpointError, match=r"cannot write .*\.tmp-global_step2 \(No space left on device"):
        m.wait()
    assert not m.background_failed() and m.wait() is None, "an error is raised once"
    assert m.committed_steps() == [1] and not (m.root / ".tmp-global_step2").exists()


def test_a_failed_write_names_the_file(tmp_path):
    import errno

    m = manager(tmp_path)

    class Unwritable:
        path = "model/mp_rank_00_model_states.pt"

        def write(self, folder):
            raise OSError(errno.EACCES, "Permission denied", str(folder / self.path))
    stage = CheckpointContents([Unwritable()])
    with pytest.raises(CheckpointError, match=r"cannot write .*\.tmp-global_step3/model/mp_rank_00_model_states\.pt "
                                              r"\(Permission denied\)"):
        m.save(make_state(3), stage, meta={})
    assert not (m.root / ".tmp-global_step3").exists()


def test_a_rotation_that_cannot_delete_is_a_warning(tmp_path, monkeypatch, caplog):
    import openrl_ckpt.checkpoint.commit as M

    m = manager(tmp_path, num=1)
    m.save(make_state(1), writer(), meta={})
    real_rename = os.rename

    def rename(src, dst):
        if Path(dst).name.startswith(".del-"):
            raise PermissionError(13, "Permission denied")
        real_rename(src, dst)
    monkeypatch.setattr(M.os, "rename", rename)
    caplog.set_level("WARNING", logger="openrl_ckpt")
    m.save(make_state(2), writer(), meta={})
    assert m.committed_steps() == [2, 1] and "cannot rotate out checkpoint" in caplog.text


def test_start_writeback_is_advisory(tmp_path):
    f = tmp_path / "w.bin"
    data = os.urandom(1 << 16)
    f.write_bytes(data)
    start_writeback(f)  # Linux: sync_file_range(WRITE) starts the write-back; elsewhere a no-op
    start_writeback(tmp_path / "missing")  # never raises: durability comes from the fsync at commit
    assert f.read_bytes() == data
