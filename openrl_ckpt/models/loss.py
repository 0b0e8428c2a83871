"""Loss functions: small, pure, each tested against its formula written out by hand."""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for t >= 1, shape [B, T-1], computed in fp32."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor,
             loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over target tokens; returns (loss, number of target tokens).

    ``loss_mask[:, t]`` marks token t as a target (predicted from token t-1).
    """
    mask = loss_mask[:, 1:].to(torch.float32)
    count = mask.sum()
    nll = -token_logprobs(logits, input_ids)
    return (nll * mask).sum() / count.clamp(min=1.0), count


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, segment: torch.Tensor,
                   num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of target-token log-probabilities and the number of target tokens, both [N].

    ``segment`` numbers each token's sequence (see ``collate.sequence_batch``); a target token is
    counted in its own sequence, so padded and packed batches give the same sums.
    """
    mask = loss_mask[:, 1:].to(torch.float32)
    seg = segment[:, 1:].clamp(min=0).flatten()  # padding has mask 0, so its segment does not matter
    logps = (token_logprobs(logits, input_ids) * mask).flatten()
    sums = torch.zeros(num_sequences, dtype=logps.dtype, device=logps.device).index_add(0, seg, logps)
    counts = torch.zeros(num_sequences, dtype=mask.dtype, device=mask.device).index_add(0, seg, mask.flatten())
    return sums, counts


# ---- reward model: per-pair losses, chosen reward c, rejected reward r, margin m

def pairwise_sigmoid_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(c - r - m)"""
    return -F.logsigmoid(chosen - rejected - margin)


def pairwise_logexp_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(r - c + m)), evaluated without overflow."""
    return torch.logaddexp(torch.zeros_like(chosen), rejected - chosen + margin)


# ---- DPO family: per-pair losses from policy (pc, pr) and reference (rc, rr) log-probabilities

def dpo_logits(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    """(pc - rc) - (pr - rr): how much more the policy prefers chosen than the reference does."""
    return (pc - rc) - (pr - rr)


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """-log sigmoid(beta * h); with label smoothing e (cDPO): -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)."""
    h = beta * dpo_logits(pc, pr, rc, rr)
    return -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def ipo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float) -> torch.Tensor:
    """(h - 1 / (2 beta))^2, with h from per-token average log-probabilities."""
    return (dpo_logits(pc, pr, rc, rr) - 1.0 / (2.0 * beta)) ** 2


# ---- KTO: per-row losses from policy and reference log-probabilities of each row's answer

def kto_loss(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """With z = max(kl, 0) and x = policy - reference:
    desirable rows w_d (1 - sigmoid(beta (x - z))), undesirable rows w_u (1 - sigmoid(beta (z - x))).

    ``kl`` is the reference point, a constant: no gradient flows through it.
    """
    z = kl.detach().clamp(min=0)
    x = policy - reference
    return torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (x - z))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z - x))))


# ---- knowledge distillation: per-position losses over target tokens, averaged like sft_loss

def _target_mean(values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    mask = loss_mask[:, 1:].to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def kd_forward_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    loss_mask: torch.Tensor) -> torch.Tensor:
    """-sum_v p_T(v) log p_S(v) at each target position: forward KL(p_T || p_S) up to the teacher's entropy."""
    teacher = F.softmax(teacher_logits[:, :-1].float(), dim=-1)
    student = F.log_softmax(student_logits[:, :-1].float(), dim=-1)
    return _target_mean(-(teacher * student).sum(-1), loss_mask)


def kd_reverse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    loss_mask: torch.Tensor) -> torch.Tensor:
    """sum_v p_S(v) (log p_S(v) - log p_T(v)) at each target position: reverse KL(p_S || p_T)."""
    student = F.log_softmax(student_logits[:, :-1].float(), dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
    return _target_mean((student.exp() * (student - teacher)).sum(-1), loss_mask)


# ---- PPO: per-token tensors [B, T] over response tokens, ``mask`` 1 for real response tokens

def process_reward_loss(logits: torch.Tensor, targets: torch.Tensor, reward_token_ids: list[int] | None,
                        probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step placeholder: cross-entropy of the model's prediction at the placeholder, and whether its
    best class is the label's; both [N] over the N positions where ``targets`` is not -100.

    The classes are the reward tokens' logits (``reward_token_ids``), or the whole vocabulary (None).
    Hard labels: ``targets`` holds the class. Soft labels (``probs``, two reward tokens): the target
    distribution is (p, 1 - p) and the label's class is 0 when p >= 1/2.
    """
    at = targets != -100
    scores = logits[at].float()
    if reward_token_ids is not None:
        scores = scores[:, reward_token_ids]
    logp = F.log_softmax(scores, dim=-1)
    if probs is None:
        labels = targets[at]
        losses = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    else:
        p = probs[at].float()
        losses = -(p * logp[:, 0] + (1 - p) * logp[:, 1])
        labels = (p < 0.5).long()
    return losses, scores.argmax(-1) == labels


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is set (all rows together)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


class KLEstimator(str, enum.Enum):
    """``--kl_estimator``: per-token estimates of KL(policy || reference) from sampled tokens, x = logp - ref_logp."""

    K1 = "k1"  # x
    K2 = "k2"  # x^2 / 2
    K3 = "k3"  # exp(-x) - 1 + x: unbiased and never negative


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator | str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference); ``estimator`` is a KLEstimator or its value
    (an unknown value is a ValueError)."""
    estimator = KLEstimator(estimator)
    x = logp.float() - ref_logp.float()
    if estimator is KLEstimator.K1:
        return x
    if estimator is KLEstimator.K2:
        return 0.5 * x * x
    return torch.expm1(-x) + x


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """--use_kl_loss: the mean per-token KL estimate over the answer tokens, a term of the actor's loss."""
    return masked_mean(kl_estimate(logp, ref_logp, estimator), mask)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lambd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, per row from the last token back:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambd A_{t+1} (V and A are 0 past the
    response); returns (advantages, returns = A + V), both 0 outside ``mask``."""
    m = mask.to(values.dtype)
    rewards, values = rewards * m, values * m
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lambd * running
        advantages[:, t] = running
    advantages = advantages * m
    return advantages, (advantages + values) * m


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1} over each row's response tokens (0 outside ``mask``)."""
    m = mask.to(rewards.dtype)
    rewards = rewards * m
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * m


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    eps_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate: mean over tokens of -min(rho A, clip(rho, 1 - eps, 1 + eps) A) with
    rho = exp(logp - old_logp); returns (loss, fraction of tokens where the clipped term was taken)."""
    ratio = torch.exp(logp - old_logp)
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip) * advantages
    loss = masked_mean(-torch.min(surr1, surr2), mask)
    return loss, masked_mean((surr2 < surr1).float(), mask)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   value_clip: float | None) -> torch.Tensor:
    """0.5 * mean over tokens of (V - R)^2; with ``value_clip`` c the clipped form
    0.5 * max((V - R)^2, (old + clip(V - old, -c, c) - R)^2)."""
    loss = (values - returns) ** 2
    if value_clip is not None:
        clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        loss = torch.max(loss, (clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)
