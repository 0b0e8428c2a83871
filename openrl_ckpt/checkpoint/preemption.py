"""Stop and save requests by signal.

SIGTERM or SIGUSR1 (what schedulers send before a kill) asks the run to stop; SIGUSR2 asks it to save
a checkpoint now and go on. The handlers only record the signal; the training loop reads it at the
next optimizer-step boundary, where all ranks agree (any rank's request counts for every rank). A stop
commits a checkpoint and exits 0; a second stop signal only adds to the count: the save in progress
goes on unchanged.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
SAVE_SIGNAL = signal.SIGUSR2


class Preempted(Exception):
    """Raised out of the training loop once a requested stop has been handled; the CLI exits with
    ``exit_code`` (0 when the checkpoint was committed) instead of going on to export the model."""

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.exit_code = 0 if checkpoint is not None else 1


class StopRequests:
    """Records stop signals (and save requests) while installed (``with StopRequests() as stop:``), then
    restores the previous handlers. Signal handlers can only be set from the main thread; elsewhere it
    records nothing and the process keeps the default behaviour."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first stop signal received
        self.count = 0
        self.save_requested = False  # a SIGUSR2 since the last save
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum

    def _handle_save(self, signum: int, frame: FrameType | None) -> None:
        self.save_requested = True

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
            self._previous[SAVE_SIGNAL] = signal.signal(SAVE_SIGNAL, self._handle_save)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
