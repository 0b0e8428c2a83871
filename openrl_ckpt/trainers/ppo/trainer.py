"""The PPO loop: one update step = one rollout of ``rollout_batch_size`` prompts and its PPO epochs.

It composes what every loop uses: the ``Checkpointer`` (resume, step boundary with save cadence,
preemption, async and time-based saves, the final save) and ``StepProgress`` (counters, bar, log
lines). Its own are the data set-up and the step body: a step is a rollout over a prompt sampler, not an
optimizer step over a dataset, and it trains two engines (tagged ``actor`` and ``critic`` in each
checkpoint), with the EMA of the actor as an extra part of each checkpoint.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

import torch
from torch.utils.data import Dataset

from openrl_ckpt.checkpoint.state import TrainState
from openrl_ckpt.data.sampler import ResumableDistributedSampler
from openrl_ckpt.errors import UserError
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy, ReduceOp
from openrl_ckpt.strategy.engine_checkpoint import DeepspeedEngines
from openrl_ckpt.trainers.base import LoopConfig
from openrl_ckpt.trainers.checkpointing import Checkpointer, Stateful
from openrl_ckpt.trainers.common import check_frozen_identity
from openrl_ckpt.trainers.ppo.control import FixedKLController, RunningMoments
from openrl_ckpt.trainers.ppo.ema import EmaPart, EmaWeights
from openrl_ckpt.trainers.ppo.experience import Experience, ExperienceMaker, PPOConfig
from openrl_ckpt.trainers.ppo.ptx import PtxFeed
from openrl_ckpt.trainers.ppo.update import train_actor, train_critic
from openrl_ckpt.trainers.progress import StepProgress, TrackerConfig, training_run

log = logging.getLogger("openrl_ckpt")


class PPOState:
    """PPO's own part of the train state (JSON): KL coefficient, reward statistics, the pretraining data
    position (--ptx_coef; ``ptx`` is anything with a JSON state), and the identity of the frozen models
    (reference, reward models), which are reloaded, not checkpointed."""

    def __init__(self, kl_ctl: FixedKLController, moments: RunningMoments, frozen: dict[str, list[dict[str, Any]]],
                 ptx: Stateful | None) -> None:
        self.kl_ctl = kl_ctl
        self.moments = moments
        self.frozen = frozen  # flag -> identities
        self.ptx = ptx

    def state_dict(self) -> dict[str, Any]:
        state = {"kl_ctl": self.kl_ctl.state_dict(), "reward_moments": self.moments.state_dict(),
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
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.moments.load_state_dict(state["reward_moments"])
        if self.ptx is not None:
            self.ptx.load_state_dict(state.get("ptx", {"consumed": 0}))


class PPOTrainer:
    def __init__(self, strategy: DeepspeedStrategy, actor: Any, critic: Any | None, maker: ExperienceMaker,
                 prompts: Dataset, ppo: PPOConfig, cfg: LoopConfig, tracker_cfg: TrackerConfig,
                 model_fingerprint: str, frozen: dict[str, list[dict[str, Any]]], *, tokenizer: Any = None,
                 ckpt_meta: dict[str, Any] | None = None, ptx: PtxFeed | None = None, ptx_coef: float = 0.0,
                 ema: EmaWeights | None = None) -> None:
        self.strategy = strategy
        self.actor = actor
        self.critic = critic
        self.maker = maker
        self.ppo = ppo
        self.cfg = cfg
        self.tracker_cfg = tracker_cfg
        self.ptx = ptx
        self.ptx_coef = ptx_coef
        self.ema = ema
        world = strategy.world_size
        # A step samples prompts for one rollout (not an optimizer step over a dataset).
        self.sampler = ResumableDistributedSampler(len(prompts), ppo.rollout_batch_size, world,  # type: ignore
                                                   strategy.rank, seed=cfg.seed, shuffle=cfg.shuffle)
        self.loader = strategy.setup_dataloader(prompts, self.sampler, ppo.rollout_batch_size // world, list)
        self.total_steps = self.sampler.steps_per_epoch * ppo.num_episodes
        self.state = TrainState(algorithm=cfg.algorithm, global_batch_size=ppo.rollout_batch_size,
                                world_size=world, model_fingerprint=model_fingerprint,
                                zero_stage=strategy.cfg.zero_stage)
        engines = {"actor": actor, **({"critic": critic} if critic is not None else {})}
        self.checkpointer = Checkpointer(
            cfg.checkpoint, strategy, DeepspeedEngines(strategy, engines, tokenizer), algorithm=cfg.algorithm,
            algorithm_state=PPOState(maker.kl_ctl, maker.moments, frozen, ptx), total_steps=self.total_steps,
            meta=ckpt_meta,
            parts={"ema": EmaPart(ema)} if ema is not None else None)

    def fit(self) -> TrainState:
        """Train to the end; raises ``Preempted`` once a stop request is handled (checkpoint committed)."""
        with training_run(self.checkpointer, self.strategy, self.tracker_cfg, self.state, total_steps=self.total_steps,
                          epoch_positions=self.sampler.epoch_positions, logging_steps=self.cfg.logging_steps,
                          desc=self.cfg.algorithm) as progress:
            self.state = progress.state
            self.checkpointer.finish(self.state, self._loop(progress))
        return self.state

    def _loop(self, progress: StepProgress) -> str | None:
        strategy, state, ppo = self.strategy, self.state, self.ppo
        stopped_by = None
        self.actor.train()
        if self.critic is not None:
            self.critic.train()
        while not progress.done and stopped_by is None:
            self.sampler.set_consumed(state.consumed_samples)
            for rows in self.loader:
                started = time.perf_counter()
                exp, metrics = self.maker.make([r["input_ids"] for r in rows], state.global_step,
                                               labels=[r.get("label") for r in rows])
                rollout_s = time.perf_counter() - started
                metrics.update(self.update(exp, state.global_step))
                self.maker.kl_ctl.update(strategy.all_reduce({"kl": metrics["kl"]})["kl"],
                                         ppo.rollout_batch_size * ppo.n_samples_per_prompt)
                progress.end_step(ppo.rollout_batch_size)
                if progress.log_due:
                    metrics = strategy.all_reduce(metrics)
                    metrics.update(actor_lr=float(self.actor.get_lr()[0]), rollout_s=rollout_s,
                                   step_s=time.perf_counter() - started, episode=state.epoch,
                                   peak_mem_gb=strategy.all_reduce({"m": _peak_memory_gb()}, op=ReduceOp.MAX)["m"])
                    progress.log(metrics)
                stopped_by = self.checkpointer.after_step(state, epoch_end=progress.epoch_end)
                if stopped_by is not None or progress.done:
                    break
        return stopped_by

    # ------------------------------------------------------------------ one update step
    def update(self, exp: Experience, step: int) -> dict[str, float]:
        """PPO epochs over this rank's rollout in shuffled micro batches, the actor's then the critic's;
        each steps at its accumulation boundaries (every --train_batch_size samples, all ranks together)."""
        metrics = train_actor(self.strategy, self.actor, exp, self.ppo, step, kl_coef=self.maker.kl_ctl.value,
                              ptx=self.ptx, ptx_coef=self.ptx_coef, ema=self.ema)
        if self.critic is not None:
            metrics.update(train_critic(self.strategy, self.critic, exp, self.ppo, step))
        return metrics


def _peak_memory_gb() -> float:
    """This rank's peak accelerator memory (CUDA), or its peak resident host memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux
