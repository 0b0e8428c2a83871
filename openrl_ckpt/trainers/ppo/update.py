"""The PPO epochs over one rollout, for the actor and for the critic separately: ``train_ppo`` runs both
on one process group, Ray PPO runs each on its own group (at the same time). Both see the same shuffled
micro batches, drawn from a seed of the step, so a resumed run trains on the same order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from openrl_ckpt.inference.batching import batch_seed
from openrl_ckpt.models.loss import kl_loss, ppo_policy_loss, ppo_value_loss, sft_loss
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy
from openrl_ckpt.trainers.ppo.ema import EmaWeights
from openrl_ckpt.trainers.ppo.experience import Experience, PPOConfig, action_logprobs, critic_values
from openrl_ckpt.trainers.ppo.ptx import PtxFeed


def micro_batches(exp: Experience, ppo: PPOConfig, step: int) -> Iterator[torch.Tensor]:
    """Row indices of each micro batch of every PPO epoch over this rank's rollout."""
    for epoch in range(ppo.max_epochs):
        g = torch.Generator()
        g.manual_seed(batch_seed(ppo.seed, step, -1 - epoch))  # the same order after a resume
        order = torch.randperm(len(exp), generator=g).to(exp.sequences.device)
        for start in range(0, len(exp), ppo.micro_train_batch_size):
            yield order[start:start + ppo.micro_train_batch_size]


def _means(sums: dict[str, float], count: int) -> dict[str, float]:
    return {k: v / max(count, 1) for k, v in sums.items()}


def train_actor(strategy: DeepspeedStrategy, actor: Any, exp: Experience, ppo: PPOConfig, step: int, *,
                kl_coef: float = 0.0, ptx: PtxFeed | None = None, ptx_coef: float = 0.0,
                ema: EmaWeights | None = None) -> dict[str, float]:
    """The actor's PPO epochs (nothing before --freezing_actor_steps); it steps at its accumulation
    boundaries, every --train_batch_size samples over its group. With --use_kl_loss (``exp.ref_logp``)
    ``kl_coef`` x the KL to the reference joins the loss. Returns the mean losses."""
    if step < ppo.freezing_actor_steps:
        return {}
    sums: dict[str, float] = {}
    count = 0
    for rows in micro_batches(exp, ppo, step):
        logp = action_logprobs(actor, exp.inputs(rows), exp.prompt_len)
        loss, clipfrac = ppo_policy_loss(logp, exp.old_logp[rows], exp.advantages[rows], exp.action_mask[rows],
                                         ppo.eps_clip)
        sums["policy_loss"] = sums.get("policy_loss", 0.0) + loss.item()
        if exp.ref_logp is not None:  # --use_kl_loss
            kl = kl_loss(logp, exp.ref_logp[rows], exp.action_mask[rows], ppo.kl_estimator)
            loss = loss + kl_coef * kl
            sums["kl_loss"] = sums.get("kl_loss", 0.0) + kl.item()
        if ptx is not None:
            ptx_loss = _ptx_loss(strategy, actor, ptx)
            loss = loss + ptx_coef * ptx_loss
            sums["ptx_loss"] = sums.get("ptx_loss", 0.0) + ptx_loss.item()
        strategy.backward(loss, actor)
        strategy.optimizer_step(actor)
        count += 1
        if ema is not None and count % strategy.grad_accum == 0:  # an optimizer step was taken
            ema.update(actor.module)
        sums["clip_frac"] = sums.get("clip_frac", 0.0) + clipfrac.item()
    return _means(sums, count)


def train_critic(strategy: DeepspeedStrategy, critic: Any, exp: Experience, ppo: PPOConfig,
                 step: int) -> dict[str, float]:
    """The critic's epochs over the same micro batches; returns the mean value loss."""
    assert exp.values is not None and exp.returns is not None
    total, count = 0.0, 0
    for rows in micro_batches(exp, ppo, step):
        values = critic_values(critic, exp.inputs(rows), exp.prompt_len)
        loss = ppo_value_loss(values, exp.values[rows], exp.returns[rows], exp.action_mask[rows], ppo.value_clip)
        strategy.backward(loss, critic)
        strategy.optimizer_step(critic)
        total += loss.item()
        count += 1
    return {"value_loss": total / max(count, 1)}


def _ptx_loss(strategy: DeepspeedStrategy, actor: Any, ptx: PtxFeed) -> torch.Tensor:
    """The actor's SFT loss on the next micro batch of pretraining data."""
    batch = ptx.next()
    device = strategy.device
    ids = batch["input_ids"].to(device)
    logits = actor(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    return sft_loss(logits, ids, batch["loss_mask"].to(device))[0]
