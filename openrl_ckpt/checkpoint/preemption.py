"""Stop and save requests by signal, at any moment of a run's life.

SIGTERM, SIGUSR1 (what schedulers send before a kill) and SIGINT (Ctrl-C) ask the run to stop;
SIGUSR2 asks it to save a checkpoint now and go on. The handlers only record the signal and the
phase the process was in (start-up, resume, training, a save, the final export); the run answers at
its next agreement point, where all ranks decide together (any rank's request counts for every
rank): before the first step (nothing new to save), at each optimizer-step boundary (a checkpoint is
committed), right after a save, or after the final export. A stop exits 0 with one line saying what
happened and what to run next; a second stop signal only adds to the count: a save in progress goes
on unchanged.

A training CLI records signals from the moment its package is imported (``record_for_process``), so
a preemption notice during imports, start-up or model loading is not the default handler's crash.
"""

from __future__ import annotations

import enum
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
SAVE_SIGNAL = signal.SIGUSR2


class Phase(str, enum.Enum):
    """What the process was doing when a stop signal came, for the line that answers it."""

    START_UP = "start-up"  # imports, process group, data, model loading, engines
    RESUME = "resume"
    TRAINING = "training"
    SAVE = "a checkpoint save"
    EXPORT = "a model export"
    FINAL_EXPORT = "the final export"


class Preempted(Exception):
    """Raised once a requested stop has been handled; the CLI exits with ``exit_code`` (0: handled, a
    checkpoint committed or nothing new to save) instead of going on to export the model."""

    def __init__(self, message: str, checkpoint: Path | None, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.exit_code = (0 if checkpoint is not None else 1) if exit_code is None else exit_code


class StopRequests:
    """Records stop signals (and save requests) while installed (``with StopRequests() as stop:``), then
    restores the previous handlers. Signal handlers can only be set from the main thread; elsewhere it
    records nothing and the process keeps the default behaviour."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first stop signal received
        self.phase_at_signal: Phase | None = None
        self.phase = Phase.START_UP
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
            self.phase_at_signal = self.phase

    def _handle_save(self, signum: int, frame: FrameType | None) -> None:
        self.save_requested = True

    def install(self) -> StopRequests:
        """Set the handlers (again, when installed already: the handlers first replaced are kept)."""
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
            previous[SAVE_SIGNAL] = signal.signal(SAVE_SIGNAL, self._handle_save)
            self._previous = self._previous or previous
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> StopRequests:
        return self.install()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.uninstall()


_process_requests: StopRequests | None = None


def record_for_process() -> StopRequests:
    """Record stop signals for the rest of this process's life (a training CLI, from its first import);
    the loop's checkpointer answers them. Idempotent."""
    global _process_requests
    if _process_requests is None:
        _process_requests = StopRequests().install()
    return _process_requests


def process_requests() -> StopRequests | None:
    """The process-wide recorder, when this process is a training CLI."""
    return _process_requests


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
