"""The one training loop: epochs, accumulation, logging, eval, checkpoint cadence and resume.

Algorithms differ only in an ``Algorithm`` object whose ``train_step`` turns a micro batch
into a loss (SFT, RM, DPO, KTO, KD); everything about counting, saving and resuming lives here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from openrl_ckpt.checkpoint.manager import CheckpointManager
from openrl_ckpt.checkpoint.state import TrainState, incompatibility
from openrl_ckpt.data.sampler import EvalSampler, ResumableDistributedSampler
from openrl_ckpt.errors import UserError
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy
from openrl_ckpt.utils.tracking import Tracker

log = logging.getLogger("openrl_ckpt")


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
    ckpt_path: str
    logging_steps: int = 1
    eval_steps: int = -1
    save_steps: int = -1
    load_checkpoint: bool = False
    max_ckpt_num: int = 3
    max_ckpt_mem: float = 1e8
    shuffle: bool = True


@dataclass(frozen=True)
class TrackerConfig:
    use_wandb: str | None = None
    wandb_project: str = "openrl_ckpt"
    wandb_run_name: str | None = None
    wandb_group: str | None = None
    wandb_org: str | None = None
    use_tensorboard: str | None = None
    run_config: dict[str, Any] = field(default_factory=dict)


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
        algo: Algorithm,
        train_set: Dataset,
        collate: Callable[[list[Any]], dict[str, torch.Tensor]],
        cfg: LoopConfig,
        tracker_cfg: TrackerConfig,
        model_fingerprint: str,
        *,
        eval_set: Dataset | None = None,
        eval_collate: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
        checkpoint_engines: dict[str, Any] | None = None,
        ckpt_meta: dict[str, Any] | None = None,
    ) -> None:
        self.s = strategy
        self.engine = engine
        self.algo = algo
        self.cfg = cfg
        self.tracker_cfg = tracker_cfg
        self.engines = checkpoint_engines or {"model": engine}
        self.meta = dict(ckpt_meta or {})
        sc = strategy.cfg
        self.sampler = ResumableDistributedSampler(len(train_set), sc.train_batch_size, strategy.world_size,
                                                   strategy.rank, seed=cfg.seed, shuffle=cfg.shuffle)
        self.loader = strategy.setup_dataloader(train_set, self.sampler, sc.micro_train_batch_size, collate)
        self.eval_loader = None
        if eval_set is not None:
            sampler = EvalSampler(len(eval_set), sc.micro_train_batch_size, strategy.world_size, strategy.rank)
            self.eval_loader = strategy.setup_dataloader(_EvalView(eval_set), sampler, sc.micro_train_batch_size,
                                                         eval_collate or collate)
        self.total_steps = self.sampler.steps_per_epoch * cfg.max_epochs
        self.state = TrainState(algorithm=cfg.algorithm, global_batch_size=sc.train_batch_size,
                                world_size=strategy.world_size, model_fingerprint=model_fingerprint,
                                zero_stage=sc.zero_stage)
        if len(train_set) % sc.train_batch_size and strategy.is_rank_0:  # type: ignore[arg-type]
            log.info("%d samples are not a multiple of the global batch %d: the last step of each epoch is "
                     "filled with samples from the start of the epoch's order", len(train_set),  # type: ignore
                     sc.train_batch_size)

    # ------------------------------------------------------------------ resume
    def _resume(self, manager: CheckpointManager | None) -> None:
        if not self.cfg.load_checkpoint:
            return
        resumed = manager.find_resumable() if manager is not None else None
        if resumed is None:
            log.info("--load_checkpoint: no checkpoint in %s, starting fresh", self.cfg.ckpt_path)
            return
        problem = incompatibility(resumed.state, self.state)
        if problem:
            raise UserError(f"--load_checkpoint: {resumed.path} cannot continue this run: {problem}")
        self.s.load_engines(resumed, self.engines)
        self.state = resumed.state
        self.state.world_size = self.s.world_size
        self.algo.load_state_dict(self.state.extra.get(self.cfg.algorithm, {}))
        log.info("resumed from %s: step %d/%d, epoch %d, %d samples consumed", resumed.path,
                 self.state.global_step, self.total_steps, self.state.epoch, self.state.consumed_samples)

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainState:
        cfg, s = self.cfg, self.s
        manager = s.checkpoint_manager(cfg.ckpt_path, cfg.max_ckpt_num, cfg.max_ckpt_mem) if (
            cfg.save_steps > 0 or cfg.load_checkpoint) else None
        self._resume(manager)
        st = self.state  # replaced by the checkpoint's state on resume
        tc = self.tracker_cfg
        tracker = Tracker(enabled=s.is_rank_0, use_wandb=tc.use_wandb, wandb_project=tc.wandb_project,
                          wandb_run_name=tc.wandb_run_name, wandb_group=tc.wandb_group, wandb_org=tc.wandb_org,
                          use_tensorboard=tc.use_tensorboard, config=tc.run_config,
                          wandb_run_id=st.extra.get("wandb_run_id"), start_step=st.global_step)
        if tracker.run_id:
            st.extra["wandb_run_id"] = tracker.run_id
        gas = s.grad_accum
        # On rank 0 the bar shows on a terminal only (disable=None), so piped logs keep plain step lines.
        bar = tqdm(total=self.total_steps, initial=st.global_step, disable=None if s.is_rank_0 else True,
                   desc=cfg.algorithm, dynamic_ncols=True)
        window: dict[str, float] = {}
        window_micro, window_tokens, window_start = 0, 0, time.perf_counter()
        last_saved = st.global_step if st.global_step > 0 else -1
        self.engine.train()
        while st.global_step < self.total_steps:
            self.sampler.set_consumed(st.consumed_samples)
            for micro, batch in enumerate(self.loader):
                out = self.algo.train_step(batch)
                s.backward(out.loss, self.engine)
                s.optimizer_step(self.engine)
                for k, v in out.metrics.items():
                    window[k] = window.get(k, 0.0) + v
                window_micro += 1
                window_tokens += out.tokens
                if (micro + 1) % gas:
                    continue
                st.global_step += 1
                st.micro_step += gas
                st.consumed_samples += s.cfg.train_batch_size
                st.epoch = st.consumed_samples // self.sampler.epoch_positions
                bar.update(1)
                if st.global_step % cfg.logging_steps == 0 or st.global_step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    metrics = s.all_reduce({k: v / window_micro for k, v in window.items()})
                    tokens = s.all_reduce({"t": float(window_tokens)}, op="sum")["t"]
                    metrics.update(lr=self._lr(), grad_norm=self._grad_norm(), tokens_per_s=tokens / elapsed,
                                   epoch=st.consumed_samples / self.sampler.epoch_positions)
                    self._log(metrics, tracker)
                    window, window_micro, window_tokens, window_start = {}, 0, 0, time.perf_counter()
                if self.eval_loader is not None and cfg.eval_steps > 0 and st.global_step % cfg.eval_steps == 0:
                    self._log(self.evaluate(), tracker)
                if manager is not None and cfg.save_steps > 0 and st.global_step % cfg.save_steps == 0:
                    self.save(manager)
                    last_saved = st.global_step
                if st.global_step >= self.total_steps:
                    break
            if self.eval_loader is not None and cfg.eval_steps <= 0 and (
                    st.consumed_samples % self.sampler.epoch_positions == 0):
                self._log(self.evaluate(), tracker)  # --eval_steps -1: once per epoch
        bar.close()
        if manager is not None and cfg.save_steps > 0 and last_saved != st.global_step:
            self.save(manager)  # the finished state, so a rerun of the same command only re-exports
        tracker.close()
        return st

    def save(self, manager: CheckpointManager) -> None:
        self.state.extra[self.cfg.algorithm] = self.algo.state_dict()
        meta = dict(self.meta, algorithm=self.cfg.algorithm, zero_stage=self.s.cfg.zero_stage,
                    global_batch_size=self.s.cfg.train_batch_size, world_size=self.s.world_size,
                    model_fingerprint=self.state.model_fingerprint, epoch=self.state.epoch,
                    consumed_samples=self.state.consumed_samples)
        manager.save(self.state, self.s.save_engines(self.engines), meta)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        assert self.eval_loader is not None
        self.engine.eval()
        sums: dict[str, float] = {}
        for batch in self.eval_loader:
            for k, (total, count) in self.algo.eval_step(batch).items():
                sums[k] = sums.get(k, 0.0) + total
                sums[k + "/count"] = sums.get(k + "/count", 0.0) + count
        self.engine.train()
        sums = self.s.all_reduce(sums, op="sum")
        return {k: v / max(sums[k + "/count"], 1.0) for k, v in sums.items() if not k.endswith("/count")}

    # ------------------------------------------------------------------ helpers
    def _lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def _grad_norm(self) -> float:
        return self.s.grad_norm(self.engine)

    def _log(self, metrics: dict[str, float], tracker: Tracker) -> None:
        if not self.s.is_rank_0:
            return
        step = self.state.global_step
        text = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        tqdm.write(f"step {step}/{self.total_steps} {text}")
        tracker.log(metrics, step)
