"""Named fault points for crash tests: a deliberate kill, delay or I/O error at one place.

Tests set ``OPENRL_FAULT=<point>[@<step>]:<action>`` where action is ``kill`` (SIGKILL this
process, as a preemption or OOM kill would), ``sleep=<seconds>`` or ``raise=<ERRNO name>``.
Unset in normal runs, so each call is a dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time

ENV = "OPENRL_FAULT"


def fault_point(name: str, step: int | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        where, _, action = item.partition(":")
        point, _, at_step = where.partition("@")
        if point != name or (at_step and step is not None and int(at_step) != step):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("sleep="):
            time.sleep(float(action.split("=", 1)[1]))
        elif action.startswith("raise="):
            code = getattr(errno, action.split("=", 1)[1])
            raise OSError(code, f"{os.strerror(code)} (injected at {name})")
