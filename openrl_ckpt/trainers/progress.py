"""The bookkeeping every training loop shares: the train state's counters, the progress bar, the logging
window and the rank-0 log line (plus wandb / tensorboard through the tracker), and the frame every
loop's ``fit`` runs in (``training_run``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from openrl_ckpt.checkpoint.state import TrainState
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy
from openrl_ckpt.utils.tracking import Tracker

if TYPE_CHECKING:
    from openrl_ckpt.trainers.checkpointing import Checkpointer


@dataclass(frozen=True)
class TrackerConfig:
    use_wandb: str | None = None
    wandb_project: str = "openrl_ckpt"
    wandb_run_name: str | None = None
    wandb_group: str | None = None
    wandb_org: str | None = None
    use_tensorboard: str | None = None
    run_config: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def training_run(checkpointer: Checkpointer, strategy: DeepspeedStrategy, tracker_cfg: TrackerConfig,
                 state: TrainState, *, total_steps: int, epoch_positions: int, logging_steps: int,
                 desc: str) -> Iterator[StepProgress]:
    """The frame every loop's ``fit`` runs in: the checkpointer's session, resume, the tracker and the
    progress of the resumed state (``progress.state``), closed in that order on the way out."""
    with checkpointer.session():
        state = checkpointer.resume(state)
        with open_tracker(tracker_cfg, strategy, state) as tracker:
            progress = StepProgress(strategy, state, total_steps, epoch_positions, logging_steps, tracker, desc)
            try:
                yield progress
            finally:
                progress.close()


@contextlib.contextmanager
def open_tracker(cfg: TrackerConfig, strategy: DeepspeedStrategy, state: TrainState) -> Iterator[Tracker]:
    """The run's tracker, opened after resume: a resumed run continues its wandb run (the id is in the
    train state) and its tensorboard curves from the resumed step."""
    tracker = Tracker(enabled=strategy.is_rank_0, use_wandb=cfg.use_wandb, wandb_project=cfg.wandb_project,
                      wandb_run_name=cfg.wandb_run_name, wandb_group=cfg.wandb_group, wandb_org=cfg.wandb_org,
                      use_tensorboard=cfg.use_tensorboard, config=cfg.run_config,
                      wandb_run_id=state.extra.get("wandb_run_id"), start_step=state.global_step)
    if tracker.run_id:
        state.extra["wandb_run_id"] = tracker.run_id
    try:
        yield tracker
    finally:
        tracker.close()


class StepProgress:
    """Counts a loop's steps into its train state and logs them.

    ``add`` sums one micro batch's metrics into the logging window, ``end_step`` advances the counters
    after an optimizer (or update) step, ``log_due`` says whether this step logs, ``take_window``
    returns the window's means and resets it, ``log`` prints the line on rank 0 and sends it on.
    """

    def __init__(self, strategy: DeepspeedStrategy, state: TrainState, total_steps: int, epoch_positions: int,
                 logging_steps: int, tracker: Tracker, desc: str) -> None:
        self.strategy = strategy
        self.state = state
        self.total_steps = total_steps
        self.epoch_positions = epoch_positions  # samples in one epoch of the sampler
        self.logging_steps = logging_steps
        self.tracker = tracker
        # On rank 0 the bar shows on a terminal only (disable=None), so piped logs keep plain step lines.
        self.bar = tqdm(total=total_steps, initial=state.global_step, disable=None if strategy.is_rank_0 else True,
                        desc=desc, dynamic_ncols=True)
        self._reset_window()

    def _reset_window(self) -> None:
        self.window: dict[str, float] = {}
        self.window_micro = 0
        self.window_tokens = 0
        self.window_start = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.state.global_step >= self.total_steps

    def add(self, metrics: dict[str, float], tokens: int) -> None:
        for k, v in metrics.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.window_micro += 1
        self.window_tokens += tokens

    def end_step(self, samples: int, micro_steps: int = 0) -> None:
        st = self.state
        st.global_step += 1
        st.micro_step += micro_steps
        st.consumed_samples += samples
        st.epoch = st.consumed_samples // self.epoch_positions
        self.bar.update(1)

    @property
    def log_due(self) -> bool:
        step = self.state.global_step
        return step % self.logging_steps == 0 or step == self.total_steps

    @property
    def epoch_end(self) -> bool:
        """Whether the step just counted finished an epoch."""
        return self.state.consumed_samples % self.epoch_positions == 0

    @property
    def epoch_progress(self) -> float:
        return self.state.consumed_samples / self.epoch_positions

    def take_window(self) -> tuple[dict[str, float], int, float]:
        """This rank's mean metrics per micro batch since the last call, its tokens, and the seconds."""
        means = {k: v / self.window_micro for k, v in self.window.items()}
        result = means, self.window_tokens, time.perf_counter() - self.window_start
        self._reset_window()
        return result

    def log(self, metrics: dict[str, float]) -> None:
        if not self.strategy.is_rank_0:
            return
        step = self.state.global_step
        text = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        tqdm.write(f"step {step}/{self.total_steps} {text}")
        self.tracker.log(metrics, step)

    def close(self) -> None:
        self.bar.close()
