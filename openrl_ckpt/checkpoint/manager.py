"""CheckpointManager: the checkpoint contract for one process group, every method collective.

It stages, writes, verifies and commits ``global_step<N>`` through the shared commit protocol
(``checkpoint/commit.py``) as a single group whose ranks split the checksums, finds the newest
checkpoint that verifies (falling back past damaged ones) and rotates old ones. It knows files and
ranks, not algorithms: what a checkpoint holds arrives as a ``CheckpointContents`` list.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from openrl_ckpt.checkpoint.comm import Comm, SingleProcessComm
from openrl_ckpt.checkpoint.commit import (
    begin_staging,
    commit_checkpoint,
    hash_files,
    rotate_checkpoints,
    staging_path,
)
from openrl_ckpt.checkpoint.contents import CheckpointContents, GroupFiles
from openrl_ckpt.checkpoint.faults import fault_point
from openrl_ckpt.checkpoint.files import (
    DEL_PREFIX,
    LATEST,
    SET_ASIDE_DIR,
    TMP_PREFIX,
    CheckpointError,
    check_files,
    committed_steps,
    list_files,
    read_manifest,
    start_writeback,
    step_dir_name,
)
from openrl_ckpt.checkpoint.state import STATE_FILE, TrainState, capture_rng
from openrl_ckpt.errors import UserError
from openrl_ckpt.utils.atomic import fsync_dir, write_file_atomic

log = logging.getLogger("openrl_ckpt")

SINGLE_GROUP = "all ranks"  # the one group of a single-process-group run, in its commit report


@dataclass(frozen=True)
class Resumed:
    step: int
    path: Path
    state: TrainState


@dataclass
class _Pending:
    """A background save in flight."""

    step: int
    path: Path
    thread: threading.Thread | None = None
    error: Exception | None = None


class CheckpointManager:
    """Save, find and rotate checkpoints; every public method is called on all ranks together.

    File-system steps (create, manifest, rename, rotate) are done by one *leader* per storage:
    global rank 0 on shared storage, and the lowest rank of each node that cannot see rank 0's
    files on node-local storage. Checksums are split across the ranks that share a storage.
    """

    def __init__(self, ckpt_path: str, comm: Comm, *, max_ckpt_num: int, max_ckpt_mem_gb: float,
                 background_comm: Comm | None = None) -> None:
        if max_ckpt_num < 1:
            raise UserError(f"--max_ckpt_num must be at least 1, got {max_ckpt_num}")
        if max_ckpt_mem_gb <= 0:
            raise UserError(f"--max_ckpt_mem must be positive (GB), got {max_ckpt_mem_gb}")
        self.root = Path(ckpt_path)
        self.comm = comm
        self.max_ckpt_num = max_ckpt_num
        self.max_bytes = max_ckpt_mem_gb * 1e9
        self._group: list[int] = [comm.rank]
        # The same ranks over a group of their own, for the collectives of background saves.
        self.background_comm = background_comm
        self._pending: _Pending | None = None
        # the step whose staging folder ``begin`` created, and when: a save's time counts from there, so the
        # staging of the contents (DeepSpeed's save_checkpoint, host copies) is part of what blocks training
        self._staging: tuple[int, float] | None = None

    @classmethod
    def single_process(cls, ckpt_path: str, *, max_ckpt_num: int, max_ckpt_mem_gb: float,
                       background: bool = False) -> CheckpointManager:
        """A prepared manager for one process that commits alone (the Ray PPO driver, in-process tests)."""
        manager = cls(ckpt_path, SingleProcessComm(), max_ckpt_num=max_ckpt_num, max_ckpt_mem_gb=max_ckpt_mem_gb,
                      background_comm=SingleProcessComm() if background else None)
        manager.prepare()
        return manager

    # ------------------------------------------------------------------ set-up
    @property
    def is_leader(self) -> bool:
        return self._group[0] == self.comm.rank

    @property
    def shared_storage(self) -> bool:
        """Whether every rank sees the same checkpoint folder (known after ``prepare``)."""
        return len(self._group) == self.comm.world_size

    def prepare(self) -> None:
        """Create the folder, find which ranks share storage, remove what a crash left behind."""
        err = None
        if self.comm.rank == 0:
            if self.root.exists() and not self.root.is_dir():
                err = f"--ckpt_path {self.root} exists and is not a directory"
            else:
                err = self._try(lambda: self.root.mkdir(parents=True, exist_ok=True), "create")
        err = self.comm.broadcast_object(err)
        if err:
            raise UserError(err)
        self._find_storage_groups()
        if self.is_leader:
            for child in self.root.iterdir():
                if child.is_dir() and child.name.startswith((TMP_PREFIX, DEL_PREFIX)):
                    log.warning("removing %s left by an interrupted save", child)
                    shutil.rmtree(child, ignore_errors=True)
        self.comm.barrier()

    def _try(self, fn: Callable[[], object], what: str) -> str | None:
        try:
            fn()
        except OSError as e:
            return f"--ckpt_path {self.root}: cannot {what} ({e.strerror or e})"
        return None

    def _find_storage_groups(self) -> None:
        if self.comm.world_size == 1:
            return
        nonce = uuid.uuid4().hex if self.comm.rank == 0 else None
        probe = self.root / f".probe-{self.comm.broadcast_object(nonce)}"
        if self.comm.rank == 0:
            probe.write_text("probe")
        self.comm.barrier()
        key = "shared" if probe.exists() else socket.gethostname()
        keys = self.comm.all_gather_object(key)
        self.comm.barrier()
        if self.comm.rank == 0:
            probe.unlink(missing_ok=True)
        self._group = [r for r, k in enumerate(keys) if k == key]

    def _my_share(self, sizes: dict[str, int]) -> list[str]:
        """This rank's files to checksum: largest first, dealt round-robin over the storage group."""
        names = sorted(sizes, key=lambda n: (-sizes[n], n))
        return names[self._group.index(self.comm.rank) :: len(self._group)]

    # ------------------------------------------------------------------ discovery
    def committed_steps(self) -> list[int]:
        return committed_steps(self.root)

    def _verify(self, ckpt_dir: Path) -> list[str]:
        """Collective: every rank of a storage group checks its share of the files."""
        try:
            manifest = read_manifest(ckpt_dir)
            sizes = {n: f["size"] for n, f in manifest["files"].items()}
            problems = check_files(ckpt_dir, manifest["files"], self._my_share(sizes))
        except CheckpointError as e:
            problems = [str(e)]
        gathered = self.comm.all_gather_object(problems)
        return sorted({p for ps in gathered for p in ps})

    def find_resumable(self) -> Resumed | None:
        """The newest checkpoint that verifies on every storage, falling back past damaged ones with a
        warning. On node-local storage each node lists its own checkpoints: only a step committed on every
        node is a candidate (a node that died mid-save may lack the newest), so all ranks resume the same
        step, never a mix."""
        listed = self.comm.all_gather_object(self.committed_steps() if self.is_leader else None)
        per_storage = [set(steps) for steps in listed if steps is not None]
        everywhere = set.intersection(*per_storage) if per_storage else set()
        candidates = sorted(everywhere, reverse=True)
        partial = sorted({s for steps in per_storage for s in steps} - everywhere, reverse=True)
        if partial and (not candidates or partial[0] > candidates[0]) and self.comm.rank == 0:
            log.warning("checkpoint steps %s are committed on the storage of some nodes only (a node stopped "
                        "before committing); resuming from the newest step every node holds%s",
                        ", ".join(map(str, partial)), f" ({candidates[0]})" if candidates else ": none, so afresh")
        for step in candidates:
            resumed = self.load_step(step)
            if isinstance(resumed, Resumed):
                return resumed
            if self.comm.rank == 0:
                log.warning("checkpoint %s is damaged, skipping it: %s", self.root / step_dir_name(step), resumed)
        return None

    def load_step(self, step: int) -> Resumed | str:
        """Collective: the committed checkpoint of ``step`` re-verified against its manifest, or what is wrong."""
        path = self.root / step_dir_name(step)
        problems = self._verify(path)
        if problems:
            return "; ".join(problems[:5])
        try:
            state = TrainState.from_json((path / STATE_FILE).read_text())
        except (OSError, ValueError, TypeError) as e:
            return f"unreadable {STATE_FILE} ({e})"
        return Resumed(step=step, path=path, state=state)

    def set_aside(self, steps: list[int], branch: str) -> Path:
        """Collective: move the committed checkpoints ``steps`` out of discovery and rotation, into
        ``set_aside/<branch>/`` (renames by the leaders), and point ``latest`` at the newest that stays."""
        folder = self.root / SET_ASIDE_DIR / branch

        def move() -> None:
            folder.mkdir(parents=True, exist_ok=True)
            for step in sorted(steps, reverse=True):  # newest first: a crash leaves the oldest in place
                os.rename(self.root / step_dir_name(step), folder / step_dir_name(step))
            fsync_dir(folder)
            fsync_dir(self.root)
            remaining = committed_steps(self.root)
            if remaining:
                write_file_atomic(self.root / LATEST, step_dir_name(remaining[0]) + "\n")

        self._leader_fs(self.comm, move, folder, "set aside checkpoints")
        return folder

    # ------------------------------------------------------------------ save
    def begin(self, step: int) -> Path:
        """Wait for a background save in flight (one save at a time), then create the staging folder of
        ``step`` (collective). Staging that writes some files there itself (DeepSpeed's ``save_checkpoint``)
        calls this first; ``save`` begins by itself otherwise."""
        self.wait()
        started = time.perf_counter()
        tmp = staging_path(self.root, step)
        self._leader_fs(self.comm, lambda: begin_staging(self.root, step), tmp, "create")
        self._staging = (step, started)
        return tmp

    def abort(self, step: int) -> None:
        """Staging failed before ``save``: remove the staging folder (collective)."""
        if self.is_leader:
            shutil.rmtree(staging_path(self.root, step), ignore_errors=True)
        self._staging = None

    def save(
        self,
        state: TrainState,
        contents: CheckpointContents,
        meta: dict[str, Any],
        pinned: frozenset[int] = frozenset(),
        *,
        background: bool = False,
    ) -> Path:
        """Write ``contents``, verify and commit ``global_step<state.global_step>``; then rotate.

        With ``background=True`` the writes, checksums, manifest, commit and rotation run in a thread
        (over ``background_comm``) and this returns once the state is captured; ``wait()`` joins it.
        Any crash before the rename leaves only a ``.tmp-`` folder; the previous committed checkpoint
        is never touched until the new one is committed.
        """
        if background and self.background_comm is None:
            raise ValueError("a background save needs a background_comm")
        step = state.global_step
        if self._staging is None or self._staging[0] != step:
            self.begin(step)
        assert self._staging is not None
        started, self._staging = self._staging[1], None
        tmp, final = staging_path(self.root, step), self.root / step_dir_name(step)
        # Every rank's RNG goes into the one JSON state file, captured now (training moves on).
        state.rng = self.comm.all_gather_object(capture_rng())
        state.world_size = self.comm.world_size
        job = partial(self._write_and_commit, step=step, tmp=tmp, final=final, contents=contents,
                      state_json=state.to_json(), meta=meta, pinned=pinned, started=started)
        if not background:
            return job(self.comm)
        assert self.background_comm is not None
        if self.comm.rank == 0:
            log.info("checkpoint step %d staged in host memory (training blocked %.2fs), writing %s in the "
                     "background", step, time.perf_counter() - started, final)
        pending = _Pending(step=step, path=final)
        pending.thread = threading.Thread(target=self._run_background, args=(pending, job, self.background_comm),
                                          name=f"checkpoint-save-{step}", daemon=True)
        self._pending = pending
        pending.thread.start()
        return final

    def _run_background(self, pending: _Pending, job: Callable[[Comm], Path], comm: Comm) -> None:
        try:
            job(comm)
        except Exception as e:  # handed to the training thread, which raises it at its next check
            pending.error = e
            if self.comm.rank == 0:
                log.error("%s", e)

    def wait(self) -> Path | None:
        """Block until the running background save has committed; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        assert pending.thread is not None
        if pending.thread.is_alive():
            started = time.perf_counter()
            pending.thread.join()
            if self.comm.rank == 0:
                log.info("waited %.2fs for the background save of %s", time.perf_counter() - started, pending.path)
        if pending.error is not None:
            raise pending.error
        return pending.path

    def background_failed(self) -> bool:
        """Whether a background save has finished with an error (not yet raised by ``wait``)."""
        p = self._pending
        return p is not None and p.thread is not None and not p.thread.is_alive() and p.error is not None

    def _write_and_commit(self, comm: Comm, *, step: int, tmp: Path, final: Path, contents: CheckpointContents,
                          state_json: str, meta: dict[str, Any], pinned: frozenset[int], started: float) -> Path:
        # The staged files. An I/O error on any rank is gathered, so all ranks fail the save together
        # instead of hanging, and the message names the path that failed.
        err, elsewhere = None, []
        try:
            fault_point("write", step)
            elsewhere = contents.write_into(tmp)  # reports of files other process groups wrote (Ray PPO)
            fault_point("after_engines", step)
        except OSError as e:
            err = f"checkpoint save failed: cannot write {e.filename or tmp} ({e.strerror or e})"
        except CheckpointError as e:
            err = str(e)
        self._fail_together(comm, err, tmp)
        reported = {n for r in elsewhere for n in r.files}

        # Each rank lists its own storage (node-local storage differs per node) and hashes its share.
        err, sums = None, {}
        try:
            sizes = {n: (tmp / n).stat().st_size for n in list_files(tmp) if n not in reported}
            mine = self._my_share(sizes)
            for n in mine:  # the disk writes them while we checksum
                start_writeback(tmp / n)
            sums = hash_files(tmp, mine)
            fault_point("before_commit", step)
        except OSError as e:
            err = f"checkpoint save failed: cannot checksum {tmp} ({e.strerror or e})"
        parts = comm.all_gather_object((err, sums))
        self._fail_together(comm, next((e for e, _ in parts if e), None), tmp, gathered=True)
        # One group reports the files of its storage; its leader commits them with the train state.
        report = GroupFiles(group=SINGLE_GROUP, files={n: f for r in self._group for n, f in parts[r][1].items()})
        reports = [report, *elsewhere]
        total_bytes = sum(f["size"] for r in reports for f in r.files.values()) + len(state_json.encode())
        expected = {SINGLE_GROUP} | {r.group for r in elsewhere}
        self._leader_fs(comm, lambda: commit_checkpoint(self.root, step, reports, expected, state_json, meta),
                        tmp, "commit")
        fault_point("after_commit", step)
        self.rotate(keep=step, pinned=pinned, comm=comm)
        if comm.rank == 0:
            log.info("saved checkpoint %s (%.2f GB, %.2fs%s)", final, total_bytes / 1e9,
                     time.perf_counter() - started, "" if comm is self.comm else ", written in the background")
        return final

    def _fail_together(self, comm: Comm, err: str | None, tmp: Path, gathered: bool = False) -> None:
        """If any rank failed, the leaders remove the temp dir and every rank raises the same error."""
        errors = [err] if gathered else comm.all_gather_object(err)
        first = next((e for e in errors if e), None)
        if first:
            if self.is_leader:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(first)

    def _leader_fs(self, comm: Comm, fn: Callable[[], object], tmp: Path, what: str) -> None:
        """Run a file-system step on the leaders; if any fails, all ranks raise the same error."""
        err = None
        if self.is_leader:
            try:
                fn()
            except OSError as e:
                err = f"checkpoint save failed: cannot {what} in {tmp} ({e.strerror or e})"
            except CheckpointError as e:
                err = str(e)
        self._fail_together(comm, err, tmp)

    # ------------------------------------------------------------------ rotation
    def rotate(self, keep: int, pinned: frozenset[int] = frozenset(), comm: Comm | None = None) -> list[int]:
        """Delete the oldest committed checkpoints beyond --max_ckpt_num / --max_ckpt_mem (the leaders
        of each storage), never ``keep`` or ``pinned``; returns the deleted steps."""
        doomed = []
        if self.is_leader:
            doomed = rotate_checkpoints(self.root, keep, self.max_ckpt_num, self.max_bytes, pinned)
        (comm or self.comm).barrier()
        return doomed
