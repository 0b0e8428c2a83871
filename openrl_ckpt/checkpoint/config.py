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


@dataclass(frozen=True)
class CheckpointConfig:
    ckpt_path: str
    save_steps: int = -1
    load_checkpoint: bool = False
    max_ckpt_num: int = 3
    max_ckpt_mem: float = 1e8
    save_interval_mins: float = 0.0  # also save when this many minutes passed since the last save (0: off)
    async_save: bool = False  # write checkpoints in a background thread
    ckpt_on_error: SaveErrorPolicy = SaveErrorPolicy.STOP
    save_hf_ckpt: bool = False  # also a Hugging Face copy of each engine in each checkpoint (hf/<engine>/)
    disable_ds_ckpt: bool = False  # only that copy: no optimizer or data position, so no resume
    save_best_metric: str | None = None  # an eval metric; the best checkpoint is kept out of rotation
    save_best_mode: BestMode = BestMode.MIN

    @property
    def checkpointing(self) -> bool:
        """Whether the run has a checkpoint folder: saves on a cadence or resumes from one. Only then
        does a stop request (preemption) commit a checkpoint."""
        return self.save_steps > 0 or self.save_interval_mins > 0 or self.load_checkpoint

    @property
    def periodic_saves(self) -> bool:
        return self.save_steps > 0 or self.save_interval_mins > 0
