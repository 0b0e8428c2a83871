"""The commit protocol shared by several process groups: each group writes and reports its files,
one committer commits once. Groups run here as real processes, so a crash is a real SIGKILL."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from openrl_ckpt.checkpoint.comm import SingleProcessComm
from openrl_ckpt.checkpoint.commit import begin_staging, commit_checkpoint, write_group
from openrl_ckpt.checkpoint.contents import BytesFile, CheckpointContents, GroupFiles
from openrl_ckpt.checkpoint.files import LATEST, MANIFEST, CheckpointError, committed_steps
from openrl_ckpt.checkpoint.inspect import verify
from openrl_ckpt.checkpoint.manager import CheckpointManager
from openrl_ckpt.checkpoint.state import STATE_FILE, TrainState

GROUPS = {"actor", "critic"}


def state_json(step: int) -> str:
    return TrainState(algorithm="ppo", global_batch_size=8, world_size=4, model_fingerprint="f",
                      global_step=step).to_json()


class KilledMidWrite:
    """A staged file whose write dies half way, as a process killed by the OOM killer would."""

    path = "critic/optim_states.pt"

    def write(self, folder: Path) -> None:
        (folder / "critic").mkdir(parents=True, exist_ok=True)
        (folder / self.path).write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)


def group_process(staging: Path, group: str, crash: bool, reports: multiprocessing.Queue) -> None:
    items = [BytesFile(f"{group}/model_states.pt", os.urandom(1000)), BytesFile(f"hf/{group}/config.json", b"{}")]
    if crash:
        items.append(KilledMidWrite())
    reports.put(write_group(staging, group, CheckpointContents(items)).to_json())


def run_groups(root: Path, step: int, crash: str | None = None) -> list[GroupFiles]:
    """Both groups write into the step's staging folder at the same time; the reports that arrive."""
    staging = begin_staging(root, step)
    (staging / "zero_to_fp32.py").write_text("# written beside the engines, as DeepSpeed does")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=group_process, args=(staging, g, g == crash, queue)) for g in sorted(GROUPS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [-signal.SIGKILL if g == crash else 0 for g in sorted(GROUPS)]
    reports = [GroupFiles.from_json(queue.get(timeout=5)) for g in sorted(GROUPS) if g != crash]
    return sorted(reports, key=lambda r: r.group)


def test_two_groups_stage_into_one_checkpoint_that_one_committer_commits(tmp_path):
    reports = run_groups(tmp_path, 3)
    assert {r.group for r in reports} == GROUPS
    path = commit_checkpoint(tmp_path, 3, reports, GROUPS, state_json(3), meta={"algorithm": "ppo"})
    assert path == tmp_path / "global_step3" and (tmp_path / LATEST).read_text() == "global_step3\n"
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert sorted(files) == sorted(["actor/model_states.pt", "critic/model_states.pt", "hf/actor/config.json",
                                    "hf/critic/config.json", "zero_to_fp32.py", STATE_FILE]), \
        "each group's files, what was written beside them and the committer's train state"
    assert verify(path) == []
    manager = CheckpointManager(str(tmp_path), SingleProcessComm(), max_ckpt_num=3, max_ckpt_mem_gb=1)
    manager.prepare()
    assert manager.find_resumable().step == 3


@pytest.mark.parametrize("crash", sorted(GROUPS))
def test_a_group_killed_before_the_commit_leaves_the_previous_checkpoint_the_newest(tmp_path, crash):
    commit_checkpoint(tmp_path, 2, run_groups(tmp_path, 2), GROUPS, state_json(2), meta={})
    reports = run_groups(tmp_path, 4, crash=crash)
    with pytest.raises(CheckpointError, match=f"checkpoint step 4 not committed: no files reported by {crash}"):
        commit_checkpoint(tmp_path, 4, reports, GROUPS, state_json(4), meta={})
    assert committed_steps(tmp_path) == [2] and (tmp_path / LATEST).read_text() == "global_step2\n"
    manager = CheckpointManager(str(tmp_path), SingleProcessComm(), max_ckpt_num=3, max_ckpt_mem_gb=1)
    manager.prepare()  # the next start removes the half-written staging folder
    assert manager.find_resumable().step == 2 and not (tmp_path / ".tmp-global_step4").exists()


def test_reports_that_do_not_match_the_folder_are_refused(tmp_path):
    reports = run_groups(tmp_path, 5)
    (tmp_path / ".tmp-global_step5" / "actor" / "model_states.pt").write_bytes(b"cut")
    with pytest.raises(CheckpointError, match=r"not committed: actor/model_states.pt: size 3 != 1000"):
        commit_checkpoint(tmp_path, 5, reports, GROUPS, state_json(5), meta={})
    twice = [reports[0], GroupFiles("critic", {**reports[1].files, "actor/model_states.pt": {"size": 3,
                                                                                          "crc32": "0"}})]
    with pytest.raises(CheckpointError, match="actor/model_states.pt reported twice with different contents"):
        commit_checkpoint(tmp_path, 5, twice, GROUPS, state_json(5), meta={})
    assert committed_steps(tmp_path) == []
