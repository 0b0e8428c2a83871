"""The PPO loop: one update step = one rollout of ``rollout_batch_size`` prompts and its PPO epochs.

It runs on the shared loop's machinery (``trainers.base.Trainer``): checkpoint manager, resume, the
step-boundary handling (save cadence, preemption, async and time-based saves), the final save. Only
the data set-up and the per-step body differ: a step is a rollout over a prompt sampler, not an optimizer step over a
dataset, and it trains two engines (tagged ``actor`` and ``critic`` in each checkpoint).
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from openrl_ckpt.checkpoint.manager import CheckpointManager, step_dir_name
from openrl_ckpt.checkpoint.preemption import StopRequests
from openrl_ckpt.checkpoint.state import TrainState
from openrl_ckpt.data.sampler import ResumableDistributedSampler
from openrl_ckpt.errors import UserError
from openrl_ckpt.inference.batching import batch_seed
from openrl_ckpt.models.loss import ppo_policy_loss, ppo_value_loss, sft_loss
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy
from openrl_ckpt.trainers.base import LoopConfig, TrackerConfig, Trainer
from openrl_ckpt.trainers.common import check_frozen_identity
from openrl_ckpt.trainers.ppo.experience import (Experience, ExperienceMaker, PPOConfig, action_logprobs,
                                                 critic_values)
from openrl_ckpt.trainers.ppo.ema import EMA_FILE, EmaWeights, save_ema
from openrl_ckpt.trainers.ppo.ptx import PtxFeed
from openrl_ckpt.utils.tracking import Tracker

log = logging.getLogger("openrl_ckpt")


class PPOState:
    """PPO's own part of the train state (JSON): KL coefficient, reward statistics, the pretraining data
    position (--ptx_coef), and the identity of the frozen models (reference, reward models), which are
    reloaded, not checkpointed."""

    def __init__(self, maker: ExperienceMaker, frozen: dict[str, list[dict[str, Any]]],
                 ptx: PtxFeed | None) -> None:
        self.maker = maker
        self.frozen = frozen  # flag -> identities
        self.ptx = ptx

    def state_dict(self) -> dict[str, Any]:
        state = {"kl_ctl": self.maker.kl_ctl.state_dict(), "reward_moments": self.maker.moments.state_dict(),
                 "frozen": self.frozen}
        if self.ptx is not None:
            state["ptx"] = self.ptx.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for flag, ids in state.get("frozen", {}).items():
            current = self.frozen.get(flag, [])
            for saved, now in zip(ids, current):
                check_frozen_identity(saved, now, flag)
            if len(ids) != len(current):
                raise UserError(f"{flag}: this run has {len(current)} model(s), the checkpoint's run had "
                                f"{len(ids)}; a resumed run must use the same ones")
        self.maker.kl_ctl.load_state_dict(state["kl_ctl"])
        self.maker.moments.load_state_dict(state["reward_moments"])
        if self.ptx is not None:
            self.ptx.load_state_dict(state.get("ptx", {"consumed": 0}))


class PPOTrainer(Trainer):
    def __init__(self, strategy: DeepspeedStrategy, actor: Any, critic: Any | None, maker: ExperienceMaker,
                 prompts: Dataset, ppo: PPOConfig, cfg: LoopConfig, tracker_cfg: TrackerConfig,
                 model_fingerprint: str, frozen: dict[str, list[dict[str, Any]]], *, tokenizer: Any = None,
                 ckpt_meta: dict[str, Any] | None = None, ptx: PtxFeed | None = None, ptx_coef: float = 0.0,
                 ema: EmaWeights | None = None) -> None:
        # The base constructor sets up an optimizer-step sampler over a dataset; PPO samples prompts
        # per rollout instead, so the attributes the shared machinery reads are set here.
        self.s = strategy
        self.engine = actor
        self.critic = critic
        self.maker = maker
        self.ppo = ppo
        self.cfg = cfg
        self.tracker_cfg = tracker_cfg
        self.engines = {"actor": actor, **({"critic": critic} if critic is not None else {})}
        self.meta = dict(ckpt_meta or {})
        self.tokenizer = tokenizer
        self.ptx = ptx
        self.ptx_coef = ptx_coef
        self.ema = ema
        self.algo = PPOState(maker, frozen, ptx)  # type: ignore[assignment]
        self._last_eval = None
        self._best_room_checked = False
        self._last_saved = -1
        self._last_save_time = time.monotonic()
        self.eval_loader = None
        self._check_ckpt_options(has_eval=False)
        world = strategy.world_size
        self.sampler = ResumableDistributedSampler(len(prompts), ppo.rollout_batch_size, world, strategy.rank,
                                                   seed=cfg.seed, shuffle=cfg.shuffle)
        self.loader = strategy.setup_dataloader(prompts, self.sampler, ppo.rollout_batch_size // world, list)
        self.total_steps = self.sampler.steps_per_epoch * ppo.num_episodes
        self.state = TrainState(algorithm=cfg.algorithm, global_batch_size=ppo.rollout_batch_size,
                                world_size=world, model_fingerprint=model_fingerprint,
                                zero_stage=strategy.cfg.zero_stage)

    # ------------------------------------------------------------------ one update step
    def update(self, exp: Experience, step: int) -> dict[str, float]:
        """PPO epochs over this rank's rollout in shuffled micro batches; actor and critic step at their
        accumulation boundaries (every --train_batch_size samples, all ranks together)."""
        ppo, s = self.ppo, self.s
        train_actor = step >= ppo.freezing_actor_steps
        sums: dict[str, float] = {}
        count = actor_micro = 0
        for epoch in range(ppo.max_epochs):
            g = torch.Generator()
            g.manual_seed(batch_seed(ppo.seed, step, -1 - epoch))  # the same order after a resume
            order = torch.randperm(len(exp), generator=g).to(exp.sequences.device)
            for start in range(0, len(exp), ppo.micro_train_batch_size):
                rows = order[start:start + ppo.micro_train_batch_size]
                inputs, mask = exp.inputs(rows), exp.action_mask[rows]
                if train_actor:
                    logp = action_logprobs(self.engine, inputs, exp.prompt_len)
                    loss, clipfrac = ppo_policy_loss(logp, exp.old_logp[rows], exp.advantages[rows], mask,
                                                     ppo.eps_clip)
                    sums["policy_loss"] = sums.get("policy_loss", 0.0) + loss.item()
                    if self.ptx is not None:
                        ptx_loss = self._ptx_loss()
                        loss = loss + self.ptx_coef * ptx_loss
                        sums["ptx_loss"] = sums.get("ptx_loss", 0.0) + ptx_loss.item()
                    s.backward(loss, self.engine)
                    s.optimizer_step(self.engine)
                    actor_micro += 1
                    if self.ema is not None and actor_micro % s.grad_accum == 0:  # an optimizer step was taken
                        self.ema.update(self.engine.module)
                    sums["clip_frac"] = sums.get("clip_frac", 0.0) + clipfrac.item()
                if self.critic is not None:
                    assert exp.values is not None and exp.returns is not None
                    values = critic_values(self.critic, inputs, exp.prompt_len)
                    vloss = ppo_value_loss(values, exp.values[rows], exp.returns[rows], mask, ppo.value_clip)
                    s.backward(vloss, self.critic)
                    s.optimizer_step(self.critic)
                    sums["value_loss"] = sums.get("value_loss", 0.0) + vloss.item()
                count += 1
        return {k: v / count for k, v in sums.items()}

    # ------------------------------------------------------------------ EMA in checkpoints
    def _stage(self) -> Callable[[Path], Callable[[], None] | None]:
        """The shared checkpoint contents plus, with --enable_ema, ``ema.safetensors`` (written by rank 0)."""
        staged = super()._stage()
        if self.ema is None:
            return staged

        def stage(tmp: Path) -> Callable[[], None]:
            flush = staged(tmp)
            tensors = self.ema.snapshot() if self.s.is_rank_0 else None  # type: ignore[union-attr]

            def both() -> None:
                if flush is not None:
                    flush()
                if tensors is not None:
                    save_ema(tensors, tmp / EMA_FILE)
            return both
        return stage

    def _resume(self, manager: CheckpointManager | None) -> None:
        super()._resume(manager)
        if self.ema is not None and self.state.global_step > 0:
            path = Path(self.cfg.ckpt_path) / step_dir_name(self.state.global_step) / EMA_FILE
            if not path.exists():
                raise UserError(f"--enable_ema: {path.parent} holds no EMA weights (the run that saved it had no "
                                "--enable_ema); resume without it or start a fresh --ckpt_path")
            self.ema.load(path)

    def _ptx_loss(self) -> torch.Tensor:
        """The actor's SFT loss on the next micro batch of pretraining data."""
        assert self.ptx is not None
        batch = self.ptx.next()
        dev = self.s.device
        ids = batch["input_ids"].to(dev)
        logits = self.engine(input_ids=ids, attention_mask=batch["attention_mask"].to(dev), use_cache=False).logits
        return sft_loss(logits, ids, batch["loss_mask"].to(dev))[0]

    # ------------------------------------------------------------------ loop
    def _loop(self, manager: CheckpointManager | None, tracker: Tracker, stop: StopRequests) -> str | None:
        cfg, s, st, ppo = self.cfg, self.s, self.state, self.ppo
        bar = tqdm(total=self.total_steps, initial=st.global_step, disable=None if s.is_rank_0 else True,
                   desc=cfg.algorithm, dynamic_ncols=True)
        stopped_by = None
        self.engine.train()
        if self.critic is not None:
            self.critic.train()
        while st.global_step < self.total_steps and stopped_by is None:
            self.sampler.set_consumed(st.consumed_samples)
            for rows in self.loader:
                started = time.perf_counter()
                exp, metrics = self.maker.make([r["input_ids"] for r in rows], st.global_step)
                rollout_s = time.perf_counter() - started
                metrics.update(self.update(exp, st.global_step))
                self.maker.kl_ctl.update(s.all_reduce({"kl": metrics["kl"]})["kl"],
                                         ppo.rollout_batch_size * ppo.n_samples_per_prompt)
                st.global_step += 1
                st.consumed_samples += ppo.rollout_batch_size
                st.epoch = st.consumed_samples // self.sampler.epoch_positions
                bar.update(1)
                if st.global_step % cfg.logging_steps == 0 or st.global_step == self.total_steps:
                    metrics = s.all_reduce(metrics)
                    metrics.update(actor_lr=self._lr(), rollout_s=rollout_s,
                                   step_s=time.perf_counter() - started, episode=st.epoch,
                                   peak_mem_gb=s.all_reduce({"m": _peak_memory_gb()}, op="max")["m"])
                    self._log(metrics, tracker)
                stopped_by = self._step_boundary(manager, stop, tracker)
                if stopped_by is not None:
                    break
                if st.global_step >= self.total_steps:
                    break
        bar.close()
        return stopped_by


def _peak_memory_gb() -> float:
    """This rank's peak accelerator memory (CUDA), or its peak resident host memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux
