"""Atomic files and folders: a reader (a resumed run, the next stage of a loop) sees the old content or
the new, never half of one. Every writer in the project goes through these two helpers.

- ``write_file_atomic``: a file written beside its target, fsynced, renamed over it, folder fsynced.
- ``atomic_folder``: a folder built beside its target and renamed into place when complete,
  optionally swapping out the folder it replaces.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


def temp_sibling(target: Path, kind: str = "tmp") -> Path:
    """A hidden name beside ``target`` that no reader takes for it: ``.<name>.<kind>-<random>``."""
    return target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}")


def stale_temp_siblings(target: Path, kind: str = "tmp") -> list[Path]:
    """The ``temp_sibling`` names beside ``target`` that exist: what killed writers left behind."""
    return sorted(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and every folder below ``root`` (and ``root`` itself)."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def write_file_atomic(path: Path, write: str | bytes | Callable[[IO[str]], None]) -> None:
    """Replace ``path`` with new content: ``write`` is the text or bytes, or a function that writes into
    the (text) file. On failure the temp file is removed and ``path`` keeps its old content."""
    tmp = temp_sibling(path)
    try:
        if isinstance(write, bytes):
            with open(tmp, "wb") as fb:
                fb.write(write)
                fb.flush()
                os.fsync(fb.fileno())
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                if isinstance(write, str):
                    f.write(write)
                else:
                    write(f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename


@contextlib.contextmanager
def atomic_folder(target: Path, *, replace: bool = False,
                  carry: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; when the block succeeds, fsync it and rename it to
    ``target``. ``replace``: an existing ``target`` is moved aside first and deleted after the rename
    (a crash in between leaves one of the two whole), except the entries ``carry`` names, which move
    into the new folder (renames: periodic model exports kept inside a final model's folder);
    otherwise ``target`` must not exist or be an empty folder. On any failure the temp folder is
    removed and ``target`` is as it was."""
    tmp = temp_sibling(target)
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)  # --save_path ./ckpt/model in a fresh directory
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        old = temp_sibling(target, "old") if replace and target.exists() else None
        if old is not None:
            os.rename(target, old)
            carried = [name for name in sorted(os.listdir(old)) if carry is not None and carry(name)]
            try:
                for name in carried:
                    os.rename(old / name, tmp / name)
                os.rename(tmp, target)
            except OSError:
                for name in carried:  # put the previous folder back whole
                    if (tmp / name).exists():
                        os.rename(tmp / name, old / name)
                os.rename(old, target)
                raise
        else:
            if target.exists():
                target.rmdir()  # empty (a non-empty one raises: never overwrite what is there)
            os.rename(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
