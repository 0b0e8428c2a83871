"""The one training loop: epochs, accumulation, logging, eval, checkpoint cadence and resume.

Algorithms differ only in an ``Algorithm`` object whose ``train_step`` turns a micro batch
into a loss (SFT, RM, DPO, KTO, KD); everything about counting, saving and resuming lives here.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from openrl_ckpt.checkpoint.faults import fault_point
from openrl_ckpt.checkpoint.inspect import BEST_KEY, EVAL_KEY, best_checkpoint, describe
from openrl_ckpt.checkpoint.manager import CheckpointError, CheckpointManager
from openrl_ckpt.checkpoint.preemption import Preempted, StopRequests, signal_name
from openrl_ckpt.checkpoint.state import TrainState, incompatibility
from openrl_ckpt.data.sampler import EvalSampler, ResumableDistributedSampler
from openrl_ckpt.errors import UserError
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy
from openrl_ckpt.utils.tracking import Tracker

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
    ckpt_path: str
    logging_steps: int = 1
    eval_steps: int = -1
    save_steps: int = -1
    load_checkpoint: bool = False
    max_ckpt_num: int = 3
    max_ckpt_mem: float = 1e8
    shuffle: bool = True
    save_interval_mins: float = 0.0  # also save when this many minutes passed since the last save (0: off)
    async_save: bool = False  # write checkpoints in a background thread
    ckpt_on_error: str = "stop"  # a failed save stops the run ("stop") or training goes on ("continue")
    save_hf_ckpt: bool = False  # also a Hugging Face copy of each engine in each checkpoint (hf/<engine>/)
    disable_ds_ckpt: bool = False  # only that copy: no optimizer or data position, so no resume
    save_best_metric: str | None = None  # an eval metric; the best checkpoint is kept out of rotation
    save_best_mode: str = "min"

    @property
    def checkpointing(self) -> bool:
        """Whether the run has a checkpoint folder: saves on a cadence or resumes from one. Only then
        does a stop request (preemption) commit a checkpoint."""
        return self.save_steps > 0 or self.save_interval_mins > 0 or self.load_checkpoint

    @property
    def periodic_saves(self) -> bool:
        return self.save_steps > 0 or self.save_interval_mins > 0


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
        tokenizer: Any = None,
    ) -> None:
        self.s = strategy
        self.engine = engine
        self.algo = algo
        self.cfg = cfg
        self.tracker_cfg = tracker_cfg
        self.engines = checkpoint_engines or {"model": engine}
        self.meta = dict(ckpt_meta or {})
        self._last_saved = -1  # the step of the last checkpoint saved (or resumed from)
        self._last_save_time = time.monotonic()
        self.tokenizer = tokenizer  # saved into each checkpoint's hf/<engine>/, so an export needs nothing else
        self._last_eval: tuple[int, dict[str, float]] | None = None
        self._best_room_checked = False
        self._check_ckpt_options(eval_set is not None)
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
        if not self.cfg.load_checkpoint or self.cfg.disable_ds_ckpt:  # --disable_ds_ckpt: said at start
            return
        resumed = manager.find_resumable() if manager is not None else None
        if resumed is None:
            log.info("--load_checkpoint: no checkpoint in %s, starting fresh", self.cfg.ckpt_path)
            return
        problem = incompatibility(resumed.state, self.state)
        if problem:
            raise UserError(f"--load_checkpoint: {resumed.path} cannot continue this run: {problem}")
        assert manager is not None
        if resumed.state.world_size != self.s.world_size and not manager.shared_storage:
            raise UserError(f"--load_checkpoint: {resumed.path} was saved on {resumed.state.world_size} ranks and this "
                            f"run has {self.s.world_size}; converting it needs every rank's files, but --ckpt_path "
                            f"is on node-local storage: resume on {resumed.state.world_size} ranks or use shared storage")
        self.s.load_engines(resumed, self.engines)
        self.state = resumed.state
        self.state.world_size = self.s.world_size
        self.state.zero_stage = self.s.cfg.zero_stage
        self.algo.load_state_dict(self.state.extra.get(self.cfg.algorithm, {}))
        log.info("resumed from %s: step %d/%d, epoch %d, %d samples consumed", resumed.path,
                 self.state.global_step, self.total_steps, self.state.epoch, self.state.consumed_samples)

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainState:
        """Train to the end; raises ``Preempted`` after a stop request (SIGTERM/SIGUSR1) has been
        handled: the step finished, a checkpoint committed, the run not exported."""
        cfg = self.cfg
        manager = self.s.checkpoint_manager(cfg.ckpt_path, cfg.max_ckpt_num, cfg.max_ckpt_mem,
                                            background=cfg.async_save) if cfg.checkpointing else None
        with StopRequests() as stop:
            self._resume(manager)
            tc = self.tracker_cfg
            tracker = Tracker(enabled=self.s.is_rank_0, use_wandb=tc.use_wandb, wandb_project=tc.wandb_project,
                              wandb_run_name=tc.wandb_run_name, wandb_group=tc.wandb_group,
                              wandb_org=tc.wandb_org, use_tensorboard=tc.use_tensorboard, config=tc.run_config,
                              wandb_run_id=self.state.extra.get("wandb_run_id"), start_step=self.state.global_step)
            if tracker.run_id:
                self.state.extra["wandb_run_id"] = tracker.run_id
            self._last_saved = self.state.global_step if self.state.global_step > 0 else -1
            self._last_save_time = time.monotonic()  # rank 0's clock decides --save_interval_mins for all ranks
            try:
                stopped_by = self._loop(manager, tracker, stop)
                self._final_save(manager, stopped_by)
                if stopped_by is not None:
                    self._preempted(manager, stopped_by, stop)
                if manager is not None:
                    self._wait(manager, must_commit=False)
            finally:
                tracker.close()
        return self.state

    def _loop(self, manager: CheckpointManager | None, tracker: Tracker, stop: StopRequests) -> str | None:
        """The epochs; returns who asked to stop (e.g. ``SIGTERM on rank 1``) or None at the end."""
        cfg, s, st = self.cfg, self.s, self.state
        gas = s.grad_accum
        # On rank 0 the bar shows on a terminal only (disable=None), so piped logs keep plain step lines.
        bar = tqdm(total=self.total_steps, initial=st.global_step, disable=None if s.is_rank_0 else True,
                   desc=cfg.algorithm, dynamic_ncols=True)
        samples = _SampleLog(os.environ.get(SAMPLE_LOG_ENV), s.rank)
        window: dict[str, float] = {}
        window_micro, window_tokens, window_start = 0, 0, time.perf_counter()
        stopped_by = None
        self.engine.train()
        while st.global_step < self.total_steps and stopped_by is None:
            self.sampler.set_consumed(st.consumed_samples)
            for micro, batch in enumerate(self.loader):
                samples.add(batch)
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
                samples.step(st.global_step)
                bar.update(1)
                if st.global_step % cfg.logging_steps == 0 or st.global_step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    metrics = s.all_reduce({k: v / window_micro for k, v in window.items()})
                    tokens = s.all_reduce({"t": float(window_tokens)}, op="sum")["t"]
                    metrics.update(lr=self._lr(), grad_norm=self._grad_norm(), tokens_per_s=tokens / elapsed,
                                   epoch=st.consumed_samples / self.sampler.epoch_positions)
                    self._log(metrics, tracker)
                    window, window_micro, window_tokens, window_start = {}, 0, 0, time.perf_counter()
                stopped_by = self._step_boundary(manager, stop, tracker)
                if stopped_by is not None:
                    break
                if st.global_step >= self.total_steps:
                    break
            if stopped_by is None and self.eval_loader is not None and cfg.eval_steps <= 0 and (
                    st.consumed_samples % self.sampler.epoch_positions == 0):
                self._log(self.evaluate(), tracker)  # --eval_steps -1: once per epoch
        bar.close()
        return stopped_by

    def _step_boundary(self, manager: CheckpointManager | None, stop: StopRequests, tracker: Tracker) -> str | None:
        """What every loop does after an optimizer step (metrics logged): agree on a stop request
        (returns who asked, e.g. ``SIGTERM on rank 1``, without saving), then handle a failed
        background save, evaluate on --eval_steps and save on --save_steps / --save_interval_mins."""
        cfg, s, st = self.cfg, self.s, self.state
        fault_point("step", st.global_step)
        # One small all-reduce per step: a stop request on any rank, rank 0's save clock and a failed
        # background save all become every rank's decision at this same step.
        time_due = (s.is_rank_0 and cfg.save_interval_mins > 0
                    and time.monotonic() - self._last_save_time >= cfg.save_interval_mins * 60)
        agreed = s.all_reduce({"stop_rank": float(s.rank + 1) if stop.requested else 0.0,
                               "signal": float(stop.signum or 0), "time_due": float(time_due),
                               "save_failed": float(manager is not None and manager.background_failed())}, op="max")
        if agreed["stop_rank"]:
            stopped_by = f"{signal_name(int(agreed['signal']))} on rank {int(agreed['stop_rank']) - 1}"
            if s.is_rank_0:
                log.info("stop requested (%s): step %d/%d is done, saving a checkpoint and exiting", stopped_by,
                         st.global_step, self.total_steps)
            return stopped_by
        if manager is not None and agreed["save_failed"]:
            self._wait(manager, must_commit=False)
        if self.eval_loader is not None and cfg.eval_steps > 0 and st.global_step % cfg.eval_steps == 0:
            self._log(self.evaluate(), tracker)
        cadence = cfg.save_steps > 0 and st.global_step % cfg.save_steps == 0
        if manager is not None and (cadence or agreed["time_due"]):
            self.save(manager)
        return None

    def _final_save(self, manager: CheckpointManager | None, stopped_by: str | None) -> None:
        """At the end of a loop that was not stopped: the finished state, so a rerun of the same
        command only re-exports."""
        if stopped_by is None and manager is not None and self.cfg.periodic_saves and (
                self._last_saved != self.state.global_step):
            self.save(manager)

    def _preempted(self, manager: CheckpointManager | None, stopped_by: str, stop: StopRequests) -> None:
        st = self.state
        if manager is None:
            msg = (f"stopped by {stopped_by} after step {st.global_step}/{self.total_steps} without a checkpoint: "
                   f"checkpointing is off (set --save_steps, --save_interval_mins or --load_checkpoint)")
            if self.s.is_rank_0:
                log.error("%s", msg)
            raise Preempted(msg, None)
        path = self.save(manager, must_commit=True)
        extra = f" ({stop.count} stop signals on this rank; the save went on unchanged)" if stop.count > 1 else ""
        msg = (f"preempted by {stopped_by}: checkpoint {path} committed at step {st.global_step}/{self.total_steps}; "
               f"rerun the same command with --load_checkpoint to continue{extra}")
        if self.s.is_rank_0:
            log.info("%s", msg)
        raise Preempted(msg, path)

    def save(self, manager: CheckpointManager, must_commit: bool = False) -> Path | None:
        """Commit a checkpoint of the current state (under --async_save: stage it and write it in the
        background). ``must_commit`` waits for the commit and raises on failure whatever
        --ckpt_on_error says; otherwise a failure follows --ckpt_on_error. Returns the committed (or
        background) path, None when the save failed and the run goes on."""
        self._wait(manager, must_commit=False)  # a failed background save: stop, or go on and save again now
        self.state.extra[self.cfg.algorithm] = self.algo.state_dict()
        meta = dict(self.meta, algorithm=self.cfg.algorithm, zero_stage=self.s.cfg.zero_stage,
                    global_batch_size=self.s.cfg.train_batch_size, world_size=self.s.world_size,
                    model_fingerprint=self.state.model_fingerprint, epoch=self.state.epoch,
                    consumed_samples=self.state.consumed_samples)
        try:
            path = manager.save(self.state, self._stage(), meta, self._best(meta),
                                background=self.cfg.async_save)
            if must_commit:
                manager.wait()
        except CheckpointError as e:
            self._save_failed(e, must_commit)
            return None
        finally:
            self._last_save_time = time.monotonic()  # a failed save also waits for the next one
        self._last_saved = self.state.global_step
        return path

    def _wait(self, manager: CheckpointManager, must_commit: bool) -> None:
        """Wait for the background save in flight, if any; its failure is handled like a failed save."""
        try:
            manager.wait()
        except CheckpointError as e:
            self._save_failed(e, must_commit)

    def _save_failed(self, e: CheckpointError, must_commit: bool) -> None:
        if must_commit or self.cfg.ckpt_on_error == "stop":
            raise e
        if self.s.is_rank_0:
            log.error("%s; training goes on (--ckpt_on_error continue) and the next save tries again", e)

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
        result = {k: v / max(sums[k + "/count"], 1.0) for k, v in sums.items() if not k.endswith("/count")}
        if self.cfg.save_best_metric and self.cfg.save_best_metric not in result:
            raise UserError(f"--save_best_metric {self.cfg.save_best_metric}: the evaluation reports "
                            f"{', '.join(sorted(result))}")
        self._last_eval = (self.state.global_step, result)
        return result

    # ------------------------------------------------------------------ checkpoint contents
    def _check_ckpt_options(self, has_eval: bool) -> None:
        cfg = self.cfg
        if cfg.disable_ds_ckpt and self.s.is_rank_0:
            log.warning("--disable_ds_ckpt: checkpoints hold only a Hugging Face copy of the model (no optimizer "
                        "state or data position), so a run cannot resume from them%s",
                        "; --load_checkpoint is ignored" if cfg.load_checkpoint else "")
        if cfg.save_best_metric:
            if not has_eval:
                raise UserError(f"--save_best_metric {cfg.save_best_metric} needs an --eval_dataset")
            if cfg.eval_steps <= 0:
                raise UserError("--save_best_metric needs --eval_steps > 0: a checkpoint can be the best only "
                                "when the run evaluates at its step")
            if cfg.save_steps > 0 and cfg.save_steps % cfg.eval_steps and self.s.is_rank_0:
                log.warning("--save_steps %d is not a multiple of --eval_steps %d: only checkpoints at evaluated "
                            "steps can be the best", cfg.save_steps, cfg.eval_steps)

    def _stage(self) -> Callable[[Path], Callable[[], None] | None]:
        """What a checkpoint holds: the DeepSpeed engines (unless --disable_ds_ckpt) and each engine's
        Hugging Face files, with the weights under --save_hf_ckpt / --disable_ds_ckpt."""
        cfg = self.cfg
        engines = (lambda tmp: None) if cfg.disable_ds_ckpt else self.s.save_engines(self.engines,
                                                                                    host_copy=cfg.async_save)
        return self.s.with_hf_files(engines, self.engines, self.tokenizer,
                                    weights=cfg.save_hf_ckpt or cfg.disable_ds_ckpt)

    def _best(self, meta: dict[str, Any]) -> frozenset[int]:
        """--save_best_metric: record this checkpoint's own evaluation in ``meta`` (when the run evaluated at
        this step) and the best checkpoint so far in the state and ``meta``; returns it, pinned out of rotation.
        The best is chosen among committed checkpoints from their manifests, so a failed save never steals
        the pin and a resumed run knows it."""
        cfg, st = self.cfg, self.state
        name, mode = cfg.save_best_metric, cfg.save_best_mode
        if not name:
            return frozenset()
        own = None
        if self._last_eval is not None and self._last_eval[0] == st.global_step:
            own = self._last_eval[1][name]
            meta[EVAL_KEY] = {name: own}
        best = best_checkpoint(Path(cfg.ckpt_path), name, mode)
        if own is not None and (best is None or (own < best[1] if mode == "min" else own > best[1])):
            best = (st.global_step, own)
        if best is None:
            return frozenset()
        st.extra[BEST_KEY] = meta[BEST_KEY] = {"step": best[0], "metric": name, "mode": mode, "value": best[1]}
        if best[0] != st.global_step and not self._best_room_checked and self.s.is_rank_0:
            self._best_room_checked = True
            size = describe(Path(cfg.ckpt_path), best[0], check=False).size
            if cfg.max_ckpt_num < 2 or 2 * size > cfg.max_ckpt_mem * 1e9:
                log.warning("the best checkpoint (step %d, %s %.4g, %.2f GB) stays besides the newest, but "
                            "--max_ckpt_num %d / --max_ckpt_mem %g GB leave no room for both: both are kept and the "
                            "limit is exceeded", best[0], name, best[1], size / 1e9, cfg.max_ckpt_num,
                            cfg.max_ckpt_mem)
        return frozenset({best[0]})

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
