"""Model exports on their own cadence: a Hugging Face model (or PEFT adapter) in ``<save_path>/global_step<N>/``
while training goes on, for evaluation.

Exports are not checkpoints: they hold no optimizer or data position, never count against
--max_ckpt_num / --max_ckpt_mem, and are rotated by --max_export_num alone. Each one is what
--save_path (and ``ckpt export`` of a checkpoint of the same step) holds. The weights are gathered on
the training thread (a collective); rank 0 writes the folder atomically, in the background under
--async_save.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from openrl_ckpt.checkpoint.contents import StagedWrite
from openrl_ckpt.checkpoint.files import STEP_DIR, CheckpointError, step_dir_name
from openrl_ckpt.utils.atomic import atomic_folder

log = logging.getLogger("openrl_ckpt")


class ModelExports:
    """Writes and rotates the exports of one run (on rank 0; other ranks hand in nothing)."""

    def __init__(self, save_path: str, max_export_num: int, background: bool) -> None:
        self.root = Path(save_path)
        self.max_export_num = max_export_num
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None

    def write(self, step: int, folder: StagedWrite | None) -> None:
        """Export ``folder`` (the gathered model, None off rank 0) as ``global_step<step>``."""
        self.wait()
        if folder is None:
            return
        if not self.background:
            self._write(step, folder)
            return
        self._thread = threading.Thread(target=self._write_in_background, args=(step, folder),
                                        name=f"model-export-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the background export in flight is written; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _write_in_background(self, step: int, folder: StagedWrite) -> None:
        try:
            self._write(step, folder)
        except CheckpointError as e:  # raised on the training thread at the next export or the end
            self._error = e

    def _write(self, step: int, folder: StagedWrite) -> None:
        target = self.root / step_dir_name(step)
        started = time.perf_counter()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_folder(target, replace=True) as tmp:
                folder.write(tmp)
        except OSError as e:
            raise CheckpointError(f"model export failed: cannot write {e.filename or target} "
                                  f"({e.strerror or e})") from None
        log.info("exported the model at step %d to %s (%.2fs)", step, target, time.perf_counter() - started)
        self._rotate(keep=step)

    def _rotate(self, keep: int) -> None:
        steps = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())
        for step in steps[:-self.max_export_num]:
            if step != keep:
                shutil.rmtree(self.root / step_dir_name(step), ignore_errors=True)
                log.info("rotated out model export %s", self.root / step_dir_name(step))
