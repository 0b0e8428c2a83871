"""The checkpoint contract: commit protocol, discovery, verification, fallback, rotation.

Layout under ``ckpt_path``::

    global_step<N>/        a committed checkpoint: engine folders, train_state.json, manifest.json
    .tmp-global_step<N>/   a save in progress (removed at the next start if a crash left it)
    latest                 names the newest committed step (a convenience; discovery scans folders)

A folder counts as a checkpoint only once it is named ``global_step<N>`` and holds a manifest,
and it is only ever named so by an atomic rename after every file and the manifest are fsynced.
The manager knows files and ranks, not algorithms: engines are written and read by callbacks.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from openrl_ckpt.checkpoint.comm import Comm
from openrl_ckpt.checkpoint.faults import fault_point
from openrl_ckpt.checkpoint.state import STATE_FILE, TrainState, capture_rng
from openrl_ckpt.errors import UserError

log = logging.getLogger("openrl_ckpt")

MANIFEST = "manifest.json"
LATEST = "latest"
STEP_DIR = re.compile(r"^global_step(\d+)$")
TMP_PREFIX = ".tmp-"
DEL_PREFIX = ".del-"
HASH_ALGO = "crc32"
_CHUNK = 8 << 20


class CheckpointError(Exception):
    """A save or load that failed for a reason outside the user's flags (I/O, damage)."""


def step_dir_name(step: int) -> str:
    return f"global_step{step}"


def _libc_sync_file_range() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writing the dirty pages back; do not wait


def start_writeback(path: str | os.PathLike[str]) -> None:
    """Ask the kernel to start writing ``path`` to disk now, so the fsync that commits it later finds
    most of it written (the disk works while we serialize and checksum). Advisory: a no-op off Linux
    or on any error; durability still comes from the fsync."""
    if _SYNC_FILE_RANGE is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
    finally:
        os.close(fd)


def file_checksum(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
        os.fsync(f.fileno())  # flushes this file's dirty pages too (Linux allows it on a read fd)
    return f"{crc:08x}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see either the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def list_files(root: Path) -> list[str]:
    """Every regular file below root, as sorted relative posix paths (the manifest itself excluded)."""
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """The manifest, or CheckpointError saying why it can't be used."""
    try:
        manifest = json.loads((ckpt_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt_dir}/{MANIFEST}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{ckpt_dir}/{MANIFEST}: not a manifest")
    return manifest


def check_files(ckpt_dir: Path, files: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """Problems found in ``names`` (a subset of the manifest's files): missing, size, checksum."""
    problems = []
    for name in names:
        want = files[name]
        path = ckpt_dir / name
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{name}: missing")
            continue
        if size != want["size"]:
            problems.append(f"{name}: size {size} != {want['size']}")
        elif file_checksum(path) != want[HASH_ALGO]:
            problems.append(f"{name}: {HASH_ALGO} mismatch")
    return problems


def dir_size(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                total += (Path(dirpath) / name).stat().st_size
            except OSError:
                pass
    return total


def committed_steps(root: Path) -> list[int]:
    """Steps of committed folders (named global_step<N> and holding a manifest), newest first.

    Needs no process group: the `ckpt` tool reads checkpoint folders with it too.
    """
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / MANIFEST).exists():
            steps.append(int(m.group(1)))
    return sorted(steps, reverse=True)


def plan_rotation(
    committed: list[tuple[int, int]], keep: int, max_num: int, max_bytes: float, pinned: frozenset[int] = frozenset()
) -> list[int]:
    """Steps to delete, oldest first, until at most ``max_num`` remain within ``max_bytes``.

    ``committed`` is (step, size in bytes) for every committed checkpoint. The checkpoint
    just written (``keep``) and pinned ones are never deleted, so at least one always remains.
    """
    alive = sorted(committed)
    doomed: list[int] = []
    for step, size in alive:
        count = len(alive) - len(doomed)
        total = sum(s for st, s in alive if st not in doomed)
        if count <= max_num and total <= max_bytes:
            break
        if step == keep or step in pinned:
            continue
        doomed.append(step)
    return doomed


# stage(tmp) writes the engine files into tmp, or captures them and returns the flush that writes them
Stage = Callable[[Path], "Callable[[], None] | None"]


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
        """The newest checkpoint that verifies, falling back past damaged ones with a warning."""
        candidates = self.comm.broadcast_object(self.committed_steps() if self.comm.rank == 0 else None)
        for step in candidates:
            path = self.root / step_dir_name(step)
            problems = self._verify(path)
            if problems:
                if self.comm.rank == 0:
                    log.warning("checkpoint %s is damaged, skipping it: %s", path, "; ".join(problems[:5]))
                continue
            try:
                state = TrainState.from_json((path / STATE_FILE).read_text())
            except (OSError, ValueError, TypeError) as e:
                if self.comm.rank == 0:
                    log.warning("checkpoint %s has an unreadable %s (%s), skipping it", path, STATE_FILE, e)
                continue
            return Resumed(step=step, path=path, state=state)
        return None

    # ------------------------------------------------------------------ save
    def save(
        self,
        state: TrainState,
        stage: Stage,
        meta: dict[str, Any],
        pinned: frozenset[int] = frozenset(),
        *,
        background: bool = False,
    ) -> Path:
        """Write, verify and commit ``global_step<state.global_step>``; then rotate.

        ``stage(tmp)`` runs collectively on the calling thread and either writes the engine files
        itself or returns a ``flush`` that writes what it captured. With ``background=True`` the
        flush, checksums, manifest, commit and rotation run in a thread (over ``background_comm``)
        and this returns once the state is staged; ``wait()`` joins it. Any crash before the rename
        leaves only a ``.tmp-`` folder; the previous committed checkpoint is never touched until the
        new one is committed.
        """
        self.wait()  # one save at a time: a running background save commits (or fails) first
        if background and self.background_comm is None:
            raise ValueError("a background save needs a background_comm")
        step = state.global_step
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{TMP_PREFIX}{step_dir_name(step)}"
        started = time.perf_counter()

        self._leader_fs(self.comm, lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir()), tmp, "create")
        try:
            flush = stage(tmp)
        except BaseException:
            if self.is_leader:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Every rank's RNG goes into the one JSON state file, captured now (training moves on).
        state.rng = self.comm.all_gather_object(capture_rng())
        state.world_size = self.comm.world_size
        job = partial(self._write_and_commit, step=step, tmp=tmp, final=final, flush=flush,
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

    def _run_background(self, pending: "_Pending", job: Callable[[Comm], Path], comm: Comm) -> None:
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

    def _write_and_commit(self, comm: Comm, *, step: int, tmp: Path, final: Path, flush: Callable[[], None] | None,
                          state_json: str, meta: dict[str, Any], pinned: frozenset[int], started: float) -> Path:
        # Engine files and the train state. An I/O error on any rank is gathered, so all ranks fail the
        # save together instead of hanging, and the message names the path that failed.
        err = None
        try:
            fault_point("write", step)
            if flush is not None:
                flush()
            fault_point("after_engines", step)
            if self.is_leader:
                write_atomic(tmp / STATE_FILE, state_json)
        except OSError as e:
            err = f"checkpoint save failed: cannot write {e.filename or tmp} ({e.strerror or e})"
        self._fail_together(comm, err, tmp)

        # Each rank lists its own storage (node-local storage differs per node) and hashes its share.
        err, sums = None, {}
        try:
            sizes = {n: (tmp / n).stat().st_size for n in list_files(tmp)}
            mine = self._my_share(sizes)
            for n in mine:  # the disk writes them while we checksum
                start_writeback(tmp / n)
            sums = {n: {"size": sizes[n], HASH_ALGO: file_checksum(tmp / n)} for n in mine}
            fault_point("before_commit", step)
        except OSError as e:
            err = f"checkpoint save failed: cannot checksum {tmp} ({e.strerror or e})"
        parts = comm.all_gather_object((err, sums))
        self._fail_together(comm, next((e for e, _ in parts if e), None), tmp, gathered=True)
        files: dict[str, Any] = {}
        for r in self._group:
            files.update(parts[r][1])
        manifest = {
            "format": 1,
            "step": step,
            "hash": HASH_ALGO,
            "created_unix": time.time(),
            "total_bytes": sum(f["size"] for f in files.values()),
            "files": dict(sorted(files.items())),
            "meta": meta,
        }

        def commit() -> None:
            write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
            for dirpath, _, _ in os.walk(tmp):
                fsync_dir(Path(dirpath))
            # A step saved again (a rerun that fell back past a damaged copy of it): move the old copy
            # aside, commit the new one, then delete; a crash in between leaves one of them in place.
            old = self.root / f"{DEL_PREFIX}{final.name}"
            if final.exists():
                os.rename(final, old)
            os.rename(tmp, final)
            fsync_dir(self.root)
            write_atomic(self.root / LATEST, step_dir_name(step) + "\n")
            shutil.rmtree(old, ignore_errors=True)

        self._leader_fs(comm, commit, tmp, "commit")
        fault_point("after_commit", step)
        self.rotate(keep=step, pinned=pinned, comm=comm)
        if comm.rank == 0:
            log.info("saved checkpoint %s (%.2f GB, %.2fs%s)", final, manifest["total_bytes"] / 1e9,
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
        self._fail_together(comm, err, tmp)

    # ------------------------------------------------------------------ rotation
    def rotate(self, keep: int, pinned: frozenset[int] = frozenset(), comm: Comm | None = None) -> list[int]:
        """Delete the oldest committed checkpoints beyond --max_ckpt_num / --max_ckpt_mem.

        A deletion that fails (permissions) is a warning: the new checkpoint is committed already.
        """
        doomed: list[int] = []
        if self.is_leader:
            committed = [(s, self._size(s)) for s in self.committed_steps()]
            doomed = plan_rotation(committed, keep, self.max_ckpt_num, self.max_bytes, pinned)
            for s in doomed:
                path = self.root / step_dir_name(s)
                # Un-commit by rename first: a crash mid-delete never leaves a half folder that looks committed.
                trash = self.root / f"{DEL_PREFIX}{path.name}"
                try:
                    os.rename(path, trash)
                except OSError as e:
                    log.warning("cannot rotate out checkpoint %s (%s); it stays", path, e.strerror or e)
                    continue
                shutil.rmtree(trash, ignore_errors=True)
                log.info("rotated out checkpoint %s", path)
            total = sum(size for s, size in committed if s not in doomed)
            if total > self.max_bytes:
                log.warning("checkpoints in %s take %.2f GB, above --max_ckpt_mem %.2f GB, but the newest "
                            "is always kept", self.root, total / 1e9, self.max_bytes / 1e9)
        (comm or self.comm).barrier()
        return doomed

    def _size(self, step: int) -> int:
        path = self.root / step_dir_name(step)
        try:
            return int(read_manifest(path).get("total_bytes") or dir_size(path))
        except CheckpointError:
            return dir_size(path)
