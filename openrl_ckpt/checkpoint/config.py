"""The checkpoint flags as settings: what the ``Checkpointer`` of every loop is configured with.

Kept free of heavy imports, so the flag parsers can use its enums for their ``choices``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SaveErrorPolicy(str, enum.Enum):
    """--ckpt_on_error: what a failed save (disk full, permissions) does to the run."""

    STOP = "stop"
    CONTINUE = "continue"


class BestMode(str, enum.Enum):
    """--save_best_mode: whether a lower or a higher --save_best_metric is better."""

    MIN = "min"
    MAX = "max"

    def better(self, value: float, than: float) -> bool:
        return value < than if self is BestMode.MIN else value > than


SAVE_NOW_FILE = "save_now"  # created in --ckpt_path by a user: the run saves at its next step and goes on


@dataclass(frozen=True)
class CheckpointConfig:
    ckpt_path: str
    save_steps: int = -1
    save_epochs: int = -1  # also save at the end of every N-th epoch (-1: off)
    load_checkpoint: bool = False
    resume_from: str | None = None  # a global_step<N> folder of ckpt_path, or a step number
    max_ckpt_num: int = 3
    max_ckpt_mem: float = 1e8
    save_interval_mins: float = 0.0  # also save when this many minutes passed since the last save (0: off)
    async_save: bool = False  # write checkpoints in a background thread
    ckpt_on_error: SaveErrorPolicy = SaveErrorPolicy.STOP
    save_hf_ckpt: bool = False  # also a Hugging Face copy of each engine in each checkpoint (hf/<engine>/)
    disable_ds_ckpt: bool = False  # only that copy: no optimizer or data position, so no resume
    save_best_metric: str | None = None  # an eval metric; the best checkpoint is kept out of rotation
    save_best_mode: BestMode = BestMode.MIN
    save_path: str | None = None  # the final model's folder; periodic exports go to <save_path>/global_step<N>/
    export_steps: int = -1  # export a Hugging Face model every N steps (-1: off)
    export_epochs: int = -1  # ... at the end of every N-th epoch
    export_interval_mins: float = 0.0  # ... when this many minutes passed since the last export (0: off)
    max_export_num: int = 3  # exports kept (their own rotation, apart from checkpoints)

    @property
    def periodic_exports(self) -> bool:
        return self.export_steps > 0 or self.export_epochs > 0 or self.export_interval_mins > 0

    @property
    def checkpointing(self) -> bool:
        """Whether the run has a checkpoint folder: saves on a cadence or resumes from one. Only then
        does a stop request (preemption) commit a checkpoint."""
        return self.periodic_saves or self.load_checkpoint or self.resume_from is not None

    @property
    def periodic_saves(self) -> bool:
        return self.save_steps > 0 or self.save_epochs > 0 or self.save_interval_mins > 0
