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
from openrl_ckpt.inference.batching import batch_seed
from openrl_ckpt.models.loss import kl_loss, ppo_policy_loss, ppo_value_loss, sft_loss
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy, ReduceOp
from openrl_ckpt.strategy.engine_checkpoint import DeepspeedEngines
from openrl_ckpt.trainers.base import LoopConfig
from openrl_ckpt.trainers.checkpointing import Checkpointer
from openrl_ckpt.trainers.common import check_frozen_identity
from openrl_ckpt.trainers.ppo.ema import EmaPart, EmaWeights
from openrl_ckpt.trainers.ppo.experience import Experience, ExperienceMaker, PPOConfig, action_logprobs, critic_values
from openrl_ckpt.trainers.ppo.ptx import PtxFeed
from openrl_ckpt.trainers.progress import StepProgress, TrackerConfig, training_run

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
            algorithm_state=PPOState(maker, frozen, ptx), total_steps=self.total_steps, meta=ckpt_meta,
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
        """PPO epochs over this rank's rollout in shuffled micro batches; actor and critic step at their
        accumulation boundaries (every --train_batch_size samples, all ranks together)."""
        ppo, strategy = self.ppo, self.strategy
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
                    logp = action_logprobs(self.actor, inputs, exp.prompt_len)
                    loss, clipfrac = ppo_policy_loss(logp, exp.old_logp[rows], exp.advantages[rows], mask,
                                                     ppo.eps_clip)
                    sums["policy_loss"] = sums.get("policy_loss", 0.0) + loss.item()
                    if exp.ref_logp is not None:  # --use_kl_loss
                        kl = kl_loss(logp, exp.ref_logp[rows], mask, ppo.kl_estimator)
                        loss = loss + self.maker.kl_ctl.value * kl
                        sums["kl_loss"] = sums.get("kl_loss", 0.0) + kl.item()
                    if self.ptx is not None:
                        ptx_loss = self._ptx_loss()
                        loss = loss + self.ptx_coef * ptx_loss
                        sums["ptx_loss"] = sums.get("ptx_loss", 0.0) + ptx_loss.item()
                    strategy.backward(loss, self.actor)
                    strategy.optimizer_step(self.actor)
                    actor_micro += 1
                    if self.ema is not None and actor_micro % strategy.grad_accum == 0:  # an optimizer step was taken
                        self.ema.update(self.actor.module)
                    sums["clip_frac"] = sums.get("clip_frac", 0.0) + clipfrac.item()
                if self.critic is not None:
                    assert exp.values is not None and exp.returns is not None
                    values = critic_values(self.critic, inputs, exp.prompt_len)
                    vloss = ppo_value_loss(values, exp.values[rows], exp.returns[rows], mask, ppo.value_clip)
                    strategy.backward(vloss, self.critic)
                    strategy.optimizer_step(self.critic)
                    sums["value_loss"] = sums.get("value_loss", 0.0) + vloss.item()
                count += 1
        return {k: v / count for k, v in sums.items()}

    def _ptx_loss(self) -> torch.Tensor:
        """The actor's SFT loss on the next micro batch of pretraining data."""
        assert self.ptx is not None
        batch = self.ptx.next()
        device = self.strategy.device
        ids = batch["input_ids"].to(device)
        logits = self.actor(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
        return sft_loss(logits, ids, batch["loss_mask"].to(device))[0]


def _peak_memory_gb() -> float:
    """This rank's peak accelerator memory (CUDA), or its peak resident host memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux
