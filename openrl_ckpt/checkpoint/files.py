"""The files of a checkpoint folder: layout, checksums, manifests, discovery and rotation planning.

Layout under ``ckpt_path``::

    global_step<N>/        a committed checkpoint: engine folders, train_state.json, manifest.json
    .tmp-global_step<N>/   a save in progress (removed at the next start if a crash left it)
    .del-global_step<N>/   a checkpoint being deleted (un-committed by the rename first)
    set_aside/<branch>/    checkpoints newer than a --resume_from step, kept and never rotated
    latest                 names the newest committed step (a convenience; discovery scans folders)

A folder counts as a checkpoint only once it is named ``global_step<N>`` and holds a manifest.
Nothing here needs a process group: training runs, the commit and the ``ckpt`` tool share it.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
LATEST = "latest"
STEP_DIR = re.compile(r"^global_step(\d+)$")
SET_ASIDE_DIR = "set_aside"  # set_aside/<branch>/global_step<N>/: checkpoints a --resume_from left behind
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


def check_sizes(folder: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """Problems found by sizes alone (cheap): files missing or of another size than recorded."""
    problems = []
    for name, want in files.items():
        try:
            size = (folder / name).stat().st_size
        except OSError:
            problems.append(f"{name}: missing")
            continue
        if size != want["size"]:
            problems.append(f"{name}: size {size} != {want['size']}")
    return problems


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
    for step, _ in alive:
        count = len(alive) - len(doomed)
        total = sum(s for st, s in alive if st not in doomed)
        if count <= max_num and total <= max_bytes:
            break
        if step == keep or step in pinned:
            continue
        doomed.append(step)
    return doomed


def set_aside_dirs(root: Path) -> list[Path]:
    """The checkpoints a --resume_from moved aside (``set_aside/<branch>/global_step<N>``), oldest branch first."""
    folder = root / SET_ASIDE_DIR
    if not folder.is_dir():
        return []
    return sorted(p for branch in sorted(folder.iterdir()) if branch.is_dir() for p in sorted(branch.iterdir())
                  if STEP_DIR.match(p.name))
