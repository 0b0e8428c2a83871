"""A JIT build lock with no build behind it, found before DeepSpeed waits on it forever.

DeepSpeed JIT-compiles its CPU all-reduce op (``deepspeed_shm_comm``) through torch's extension
loader, which takes ``<extensions dir>/<op>/lock`` by creating it, keeps it open while it builds and
removes it at the end; every other process polls until the file is gone, silently and without end.
A build killed midway (kill -9, Ctrl-C, a preemption) leaves the file behind, and every later launch
hangs on it. The builder holds the file open, so a lock that no process on this machine holds open
is stale: it is removed, with a warning, before anything waits on it. A lock that a live build holds
is said in one line, so a wait is never silent.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from openrl_ckpt.errors import UserError

log = logging.getLogger("openrl_ckpt")

SHM_OP_NAME = "deepspeed_shm_comm"


def extension_dir(name: str) -> Path | None:
    """Where torch builds (and locks) the extension ``name`` (TORCH_EXTENSIONS_DIR or its default)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:  # another torch: no way to know its layout, so nothing to check
        return None
    return Path(_get_build_directory(name, verbose=False))


def lock_holders(lock: Path) -> list[int]:
    """PIDs of the processes on this machine that have ``lock`` open (from /proc: Linux)."""
    holders = []
    target = str(lock.resolve())
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                holders.append(int(fd_dir.parent.name))
        except OSError:  # gone, or not ours to read
            continue
    return holders


def clear_stale_build_lock(name: str) -> None:
    """Remove the build lock of ``name`` when no process holds it (twice, a moment apart: a builder
    closes the file just before it removes it); say who builds when one does."""
    folder = extension_dir(name)
    if folder is None or not Path("/proc/self/fd").is_dir():
        return
    lock = folder / "lock"
    if not lock.exists():
        return
    holders = lock_holders(lock)
    if not holders:
        time.sleep(0.5)
        holders = lock_holders(lock) if lock.exists() else [-1]
    if holders == [-1]:  # released meanwhile: a build just finished
        return
    if holders:
        log.warning("waiting for a build of DeepSpeed's %s op that holds %s (pid %s); it takes a minute or two "
                    "the first time", name, lock, ", ".join(map(str, holders)))
        return
    age = time.time() - lock.stat().st_mtime
    try:
        # a rename first: of two ranks finding the same stale lock, one removes it
        claimed = lock.with_name(f"lock.stale-{os.getpid()}")
        os.rename(lock, claimed)
        claimed.unlink()
    except FileNotFoundError:
        return
    except OSError as e:
        raise UserError(f"a stale build lock {lock} (no process holds it) blocks DeepSpeed's {name} op and "
                           f"cannot be removed ({e.strerror}): remove it by hand") from None
    log.warning("removed a stale build lock %s (%.0fs old, no process holds it: a build of DeepSpeed's %s op was "
                "interrupted); the op is built again now", lock, age, name)
