"""Named fault points for crash tests: a deliberate kill, delay or I/O error at one place.

Tests set ``OPENRL_FAULT=<point>[@<step>]:<action>[:once=<file>]`` (several separated by commas)
where action is ``kill`` (SIGKILL this process, as a preemption or OOM kill would),
``sleep=<seconds>``, ``raise=<ERRNO name>``, ``signal=<NAME>`` (send this process a signal, as a user
would: ``signal=SIGUSR2``), ``touch=<file>`` (create a file, e.g. a save-now trigger), ``fill=<file>``
(write zeros into ``<file>.<pid>`` until its file system is full, so the next write meets a real
ENOSPC) or ``unfill=<file>`` (remove every ``<file>.*``: room is made again). With
``once=<file>`` the fault fires in one process only, the first to create that file, and never
again: a restarted run sees the same environment but no second crash. Unset in normal runs, so each
call is a dictionary lookup.

Points: ``start`` (the process group is up; data and model not loaded yet), ``resume`` (a checkpoint
is about to be loaded), ``step`` (every optimizer-step boundary of the training loop), ``write`` (before a save
writes its engine files; in the background thread for --async_save), ``after_engines``,
``before_commit`` (checksums done, before the train state and manifest), ``latest`` (committed, before
``latest`` is pointed at it), ``after_commit``, ``export`` (before the final model is written to
--save_path); in ``serve_rm``, ``reward_request`` (before answering the N-th request: a reward server
that dies mid-run).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import signal
import time

ENV = "OPENRL_FAULT"


def _first_time(marker: str) -> bool:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def fault_point(name: str, step: int | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        where, _, action = item.partition(":")
        action, _, once = action.partition(":once=")
        point, _, at_step = where.partition("@")
        if point != name or (at_step and step is not None and int(at_step) != step):
            continue
        if once and not _first_time(once):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("sleep="):
            time.sleep(float(action.split("=", 1)[1]))
        elif action.startswith("signal="):
            os.kill(os.getpid(), signal.Signals[action.split("=", 1)[1]])
        elif action.startswith("touch="):
            open(action.split("=", 1)[1], "a").close()
        elif action.startswith("fill="):
            _fill(f"{action.split('=', 1)[1]}.{os.getpid()}")
        elif action.startswith("unfill="):
            for path in glob.glob(glob.escape(action.split("=", 1)[1]) + ".*"):
                with contextlib.suppress(FileNotFoundError):  # another rank made the same room
                    os.unlink(path)
        elif action.startswith("raise="):
            code = getattr(errno, action.split("=", 1)[1])
            raise OSError(code, f"{os.strerror(code)} (injected at {name})")


def _fill(path: str) -> None:
    """Write zeros into ``path`` until the file system says ENOSPC (then keep what fit)."""
    block = bytes(1 << 20)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
        # the last partial megabyte: fill to the byte, so a small write fails too
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    f.write(bytes(size))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
