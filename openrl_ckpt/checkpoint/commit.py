"""The commit protocol, callable by one committer with files that other processes wrote.

1. ``begin_staging`` creates ``<root>/.tmp-global_step<N>/`` afresh;
2. every process group writes its files there and reports them as ``GroupFiles`` (relative names,
   sizes, checksums; plain JSON, so a report can cross process and machine boundaries);
3. one committer calls ``commit_checkpoint``: every expected group must have reported and every
   reported file must be there with its size; files no group reported (DeepSpeed copies its
   recovery scripts beside the engine folders) are hashed by the committer; then the train state
   and the manifest are written and fsynced, the folder is renamed to ``global_step<N>`` (the
   commit) and ``latest`` is pointed at it;
4. ``rotate_checkpoints`` then deletes the oldest committed checkpoints beyond the limits.

A crash of any process before the rename leaves only the ``.tmp-`` folder: the previous committed
checkpoint stays the newest. A single process group (every trainer but Ray PPO) is one group whose
ranks split the checksums (``CheckpointManager``); nothing here needs a process group.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from openrl_ckpt.checkpoint.contents import CheckpointContents, GroupFiles
from openrl_ckpt.checkpoint.faults import fault_point
from openrl_ckpt.checkpoint.files import (
    DEL_PREFIX,
    HASH_ALGO,
    LATEST,
    MANIFEST,
    TMP_PREFIX,
    CheckpointError,
    check_sizes,
    committed_steps,
    dir_size,
    file_checksum,
    list_files,
    plan_rotation,
    read_manifest,
    step_dir_name,
)
from openrl_ckpt.checkpoint.state import STATE_FILE
from openrl_ckpt.utils.atomic import fsync_dir, write_file_atomic

log = logging.getLogger("openrl_ckpt")

MANIFEST_FORMAT = 1


def staging_path(root: Path, step: int) -> Path:
    return root / f"{TMP_PREFIX}{step_dir_name(step)}"


def begin_staging(root: Path, step: int) -> Path:
    """A fresh, empty staging folder for ``step`` (whatever an interrupted save of it left is removed)."""
    staging = staging_path(root, step)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def hash_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and checksum of each named file below ``folder`` (each fsynced on the way)."""
    return {n: {"size": (folder / n).stat().st_size, HASH_ALGO: file_checksum(folder / n)} for n in names}


def write_group(staging: Path, group: str, contents: CheckpointContents) -> GroupFiles:
    """One group's part of a save: write its staged items into ``staging`` and report every file they
    made (an item's path names a file or a folder). Other groups may be writing beside it."""
    paths = [p.rstrip("/") for p in contents.paths]
    contents.write_into(staging)  # items written by other groups report themselves; one group writes its own
    names = [n for n in list_files(staging) if any(n == p or n.startswith(p + "/") for p in paths)]
    return GroupFiles(group, hash_files(staging, names))


def _merge_reports(step: int, reports: list[GroupFiles], expected_groups: set[str]) -> dict[str, dict[str, Any]]:
    missing = sorted(expected_groups - {r.group for r in reports})
    if missing:
        raise CheckpointError(f"checkpoint step {step} not committed: no files reported by {', '.join(missing)}")
    files: dict[str, dict[str, Any]] = {}
    for report in reports:
        for name, entry in report.files.items():
            if files.setdefault(name, entry) != entry:
                raise CheckpointError(f"checkpoint step {step} not committed: {name} reported twice with "
                                      "different contents")
    return files


def commit_checkpoint(root: Path, step: int, reports: list[GroupFiles], expected_groups: set[str], state_json: str,
                      meta: dict[str, Any]) -> Path:
    """Commit the staging folder of ``step`` with the groups' reports; returns ``<root>/global_step<N>``.

    Raises CheckpointError when the reports are incomplete or do not match the folder (nothing is
    committed), OSError when the file system fails (nothing is committed either).
    """
    staging, final = staging_path(root, step), root / step_dir_name(step)
    files = _merge_reports(step, reports, expected_groups)
    problems = check_sizes(staging, files)
    if problems:
        raise CheckpointError(f"checkpoint step {step} not committed: {'; '.join(problems[:5])}")
    write_file_atomic(staging / STATE_FILE, state_json)
    files.update(hash_files(staging, [n for n in list_files(staging) if n not in files]))
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "hash": HASH_ALGO,
        "created_unix": time.time(),
        "total_bytes": sum(f["size"] for f in files.values()),
        "files": dict(sorted(files.items())),
        "meta": meta,
    }
    write_file_atomic(staging / MANIFEST, json.dumps(manifest, indent=1))
    for dirpath, _, _ in os.walk(staging):
        fsync_dir(Path(dirpath))
    # A step saved again (a rerun that fell back past a damaged copy of it): move the old copy aside,
    # commit the new one, then delete; a crash in between leaves one of them in place.
    old = root / f"{DEL_PREFIX}{final.name}"
    if final.exists():
        os.rename(final, old)
    os.rename(staging, final)
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    point_latest(root, step)
    return final


def point_latest(root: Path, step: int) -> None:
    """``latest`` names the newest commit, for people and DeepSpeed's tools; resume finds checkpoints by
    their folders and manifests, so a ``latest`` that cannot be written (a full disk) is only a warning."""
    try:
        fault_point("latest", step)
        write_file_atomic(root / LATEST, step_dir_name(step) + "\n")
    except OSError as e:
        log.warning("checkpoint %s is committed, but %s could not be updated (%s): it names an older step until "
                    "the next save; resume does not read it", root / step_dir_name(step), root / LATEST,
                    e.strerror or e)


def checkpoint_size(root: Path, step: int) -> int:
    path = root / step_dir_name(step)
    try:
        return int(read_manifest(path).get("total_bytes") or dir_size(path))
    except CheckpointError:
        return dir_size(path)


def rotate_checkpoints(root: Path, keep: int, max_num: int, max_bytes: float,
                       pinned: frozenset[int] = frozenset()) -> list[int]:
    """Delete the oldest committed checkpoints beyond ``max_num`` / ``max_bytes``; ``keep`` (the one just
    written) and ``pinned`` ones stay. Each is un-committed by a rename first, so a crash mid-delete never
    leaves a half folder that looks committed. A rename that fails (permissions) is a warning: the new
    checkpoint is committed already. Returns the deleted steps."""
    committed = [(s, checkpoint_size(root, s)) for s in committed_steps(root)]
    doomed = []
    for step in plan_rotation(committed, keep, max_num, max_bytes, pinned):
        path = root / step_dir_name(step)
        trash = root / f"{DEL_PREFIX}{path.name}"
        try:
            os.rename(path, trash)
        except OSError as e:
            log.warning("cannot rotate out checkpoint %s (%s); it stays", path, e.strerror or e)
            continue
        shutil.rmtree(trash, ignore_errors=True)
        doomed.append(step)
        log.info("rotated out checkpoint %s", path)
    total = sum(size for s, size in committed if s not in doomed)
    if total > max_bytes:
        log.warning("checkpoints in %s take %.2f GB, above --max_ckpt_mem %.2f GB, but the newest is always kept",
                    root, total / 1e9, max_bytes / 1e9)
    return doomed
