"""The one training loop: epochs, gradient accumulation, logging and evaluation.

Algorithms differ only in an ``Algorithm`` object whose ``train_step`` turns a micro batch into a loss
(SFT, RM, DPO, KTO, KD). Counting and logging come from ``StepProgress``; everything about saving and
resuming from the ``Checkpointer`` the loop composes (``trainers/checkpointing.py``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from openrl_ckpt.checkpoint.state import TrainState
from openrl_ckpt.data.sampler import EvalSampler, ResumableDistributedSampler
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy, ReduceOp
from openrl_ckpt.strategy.engine_checkpoint import DeepspeedEngines
from openrl_ckpt.trainers.checkpointing import CheckpointConfig, Checkpointer, EngineStore
from openrl_ckpt.trainers.progress import StepProgress, TrackerConfig, training_run

log = logging.getLogger("openrl_ckpt")

# Debug aid for data-position tests: a folder where each rank appends, per optimizer step, the
# ``index`` of every sample it trained on (``rank<R>.jsonl``: {"step": N, "ids": [...]}).
SAMPLE_LOG_ENV = "OPENRL_SAMPLE_LOG"


@dataclass
class StepOutput:
    loss: torch.Tensor  # what backward sees
    metrics: dict[str, float]  # averaged over the logging window and all ranks
    tokens: int  # tokens processed by this micro batch (throughput)


class Algorithm(Protocol):
    name: str

    def train_step(self, batch: dict[str, torch.Tensor]) -> StepOutput: ...

    def eval_step(self, batch: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
        """metric -> (sum, count) over this batch's real (non-padding) samples."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class LoopConfig:
    algorithm: str
    max_epochs: int
    seed: int
    checkpoint: CheckpointConfig
    logging_steps: int = 1
    eval_steps: int = -1
    shuffle: bool = True


class _EvalView(Dataset):
    """Maps EvalSampler's padding positions (negative) to a real row, keeping the sign in ``index``."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, p: int) -> dict[str, Any]:
        return dict(self.ds[p if p >= 0 else -1 - p], index=p)


class Trainer:
    def __init__(
        self,
        strategy: DeepspeedStrategy,
        engine: Any,
        algorithm: Algorithm,
        train_set: Dataset,
        collate: Callable[[list[Any]], dict[str, torch.Tensor]],
        cfg: LoopConfig,
        tracker_cfg: TrackerConfig,
        model_fingerprint: str,
        *,
        eval_set: Dataset | None = None,
        eval_collate: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
        ckpt_meta: dict[str, Any] | None = None,
        tokenizer: Any = None,
        engine_store: EngineStore | None = None,
    ) -> None:
        """``engine_store``: how the trained engine goes into checkpoints; by default DeepSpeed's files of
        ``engine`` tagged ``model``, with ``tokenizer`` in its Hugging Face folder."""
        self.strategy = strategy
        self.engine = engine
        self.algorithm = algorithm
        self.cfg = cfg
        self.tracker_cfg = tracker_cfg
        micro, global_batch = strategy.cfg.micro_train_batch_size, strategy.cfg.train_batch_size
        self.sampler = ResumableDistributedSampler(len(train_set), global_batch, strategy.world_size,  # type: ignore
                                                   strategy.rank, seed=cfg.seed, shuffle=cfg.shuffle)
        self.loader = strategy.setup_dataloader(train_set, self.sampler, micro, collate)
        self.eval_loader = None
        if eval_set is not None:
            sampler = EvalSampler(len(eval_set), micro, strategy.world_size, strategy.rank)  # type: ignore[arg-type]
            self.eval_loader = strategy.setup_dataloader(_EvalView(eval_set), sampler, micro, eval_collate or collate)
        self.total_steps = self.sampler.steps_per_epoch * cfg.max_epochs
        self.state = TrainState(algorithm=cfg.algorithm, global_batch_size=global_batch,
                                world_size=strategy.world_size, model_fingerprint=model_fingerprint,
                                zero_stage=strategy.cfg.zero_stage)
        self.checkpointer = Checkpointer(
            cfg.checkpoint, strategy, engine_store or DeepspeedEngines(strategy, {"model": engine}, tokenizer),
            algorithm=cfg.algorithm, algorithm_state=algorithm, total_steps=self.total_steps, meta=ckpt_meta,
            eval_steps=cfg.eval_steps if eval_set is not None else None)
        if len(train_set) % global_batch and strategy.is_rank_0:  # type: ignore[arg-type]
            log.info("%d samples are not a multiple of the global batch %d: the last step of each epoch is "
                     "filled with samples from the start of the epoch's order", len(train_set),  # type: ignore
                     global_batch)

    def fit(self) -> TrainState:
        """Train to the end; raises ``Preempted`` after a stop request (SIGTERM/SIGUSR1) has been
        handled: the step finished, a checkpoint committed, the run not exported."""
        with training_run(self.checkpointer, self.strategy, self.tracker_cfg, self.state, total_steps=self.total_steps,
                          epoch_positions=self.sampler.epoch_positions, logging_steps=self.cfg.logging_steps,
                          desc=self.cfg.algorithm) as progress:
            self.state = progress.state
            self.checkpointer.finish(self.state, self._loop(progress))
        return self.state

    def _loop(self, progress: StepProgress) -> str | None:
        """The epochs; returns who asked to stop (e.g. ``SIGTERM on rank 1``) or None at the end."""
        strategy, state = self.strategy, self.state
        accumulation = strategy.grad_accum
        samples = _SampleLog(os.environ.get(SAMPLE_LOG_ENV), strategy.rank)
        stopped_by = None
        self.engine.train()
        while not progress.done and stopped_by is None:
            self.sampler.set_consumed(state.consumed_samples)
            for micro, batch in enumerate(self.loader):
                samples.add(batch)
                out = self.algorithm.train_step(batch)
                strategy.backward(out.loss, self.engine)
                strategy.optimizer_step(self.engine)
                progress.add(out.metrics, out.tokens)
                if (micro + 1) % accumulation:
                    continue
                progress.end_step(strategy.cfg.train_batch_size, micro_steps=accumulation)
                samples.step(state.global_step)
                if progress.log_due:
                    self._log_window(progress)
                stopped_by = self.checkpointer.after_step(state, evaluate=self._evaluate_on_cadence(progress),
                                                          epoch_end=progress.epoch_end)
                if stopped_by is not None or progress.done:
                    break
            if stopped_by is None and self.eval_loader is not None and self.cfg.eval_steps <= 0 and progress.epoch_end:
                progress.log(self.evaluate())  # --eval_steps -1: once per epoch
        return stopped_by

    def _log_window(self, progress: StepProgress) -> None:
        means, tokens, elapsed = progress.take_window()
        metrics = self.strategy.all_reduce(means)
        tokens_all = self.strategy.all_reduce({"t": float(tokens)}, op=ReduceOp.SUM)["t"]
        metrics.update(lr=float(self.engine.get_lr()[0]), grad_norm=self.strategy.grad_norm(self.engine),
                       tokens_per_s=tokens_all / elapsed, epoch=progress.epoch_progress)
        progress.log(metrics)

    def _evaluate_on_cadence(self, progress: StepProgress) -> Callable[[], None] | None:
        """--eval_steps N: the evaluation at this step boundary (before a save, so it can be the best)."""
        if self.eval_loader is None or self.cfg.eval_steps <= 0 or self.state.global_step % self.cfg.eval_steps:
            return None
        return lambda: progress.log(self.evaluate())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        assert self.eval_loader is not None
        self.engine.eval()
        sums: dict[str, float] = {}
        for batch in self.eval_loader:
            for k, (total, count) in self.algorithm.eval_step(batch).items():
                sums[k] = sums.get(k, 0.0) + total
                sums[k + "/count"] = sums.get(k + "/count", 0.0) + count
        self.engine.train()
        sums = self.strategy.all_reduce(sums, op=ReduceOp.SUM)
        result = {k: v / max(sums[k + "/count"], 1.0) for k, v in sums.items() if not k.endswith("/count")}
        self.checkpointer.record_eval(self.state.global_step, result)
        return result


class _SampleLog:
    """Per rank, the sample ``index`` values of each optimizer step, appended to ``<folder>/rank<R>.jsonl``
    (off unless the OPENRL_SAMPLE_LOG folder is set)."""

    def __init__(self, folder: str | None, rank: int) -> None:
        self.path = Path(folder) / f"rank{rank}.jsonl" if folder else None
        self.ids: list[int] = []

    def add(self, batch: dict[str, Any]) -> None:
        if self.path is not None and "index" in batch:
            self.ids.extend(int(i) for i in batch["index"])

    def step(self, step: int) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "ids": self.ids}) + "\n")
        self.ids = []
