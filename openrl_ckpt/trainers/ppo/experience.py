"""One PPO rollout on this rank: sample answers, score them, and turn the scores into per-token
advantages and returns.

Layout: every rank holds ``rollout_batch_size / world_size`` prompts, each repeated
``n_samples_per_prompt`` times (a prompt's samples stay adjacent on one rank, so group baselines
are local). All samples of the rollout share one layout: prompts left-padded to a common width P,
answers right-padded to a common width T, so ``sequences`` is [S, P + T] and every per-token tensor
is [S, T] over answer positions (``action_mask`` marks real answer tokens, up to and including EOS).
The token at answer position t is predicted from sequence position P + t - 1, where the critic's
value of the state before that token is read too.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from openrl_ckpt.data.padding import left_pad
from openrl_ckpt.inference.batching import batch_seed
from openrl_ckpt.inference.generation import Generation, SamplingConfig, generate
from openrl_ckpt.models.loss import KLEstimator, discounted_returns, gae, kl_estimate, token_logprobs
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy, FrozenModel, ReduceOp
from openrl_ckpt.trainers.ppo.control import (
    FixedKLController,
    RunningMoments,
    group_mean_baseline,
    group_norm,
    rloo_baseline,
)


class AdvantageEstimator(str, enum.Enum):
    """--advantage_estimator: how a sample's reward becomes per-token advantages."""

    GAE = "gae"  # the critic's values, generalized advantage estimation (trains a critic)
    REINFORCE = "reinforce"  # whitened discounted returns
    RLOO = "rloo"  # the reward minus the mean of the prompt's other samples
    REINFORCE_BASELINE = "reinforce_baseline"  # the reward minus the prompt's mean reward, then whitened
    GROUP_NORM = "group_norm"  # the reward normalised within the prompt's samples

    @property
    def trains_critic(self) -> bool:
        return self is AdvantageEstimator.GAE

    @property
    def compares_samples(self) -> bool:
        """Whether the baseline comes from the other samples of the same prompt (needs at least 2)."""
        return self in (AdvantageEstimator.RLOO, AdvantageEstimator.GROUP_NORM, AdvantageEstimator.REINFORCE_BASELINE)


@dataclass(frozen=True)
class PPOConfig:
    rollout_batch_size: int  # prompts per update step, all ranks together
    micro_rollout_batch_size: int  # samples per generation / scoring call on one rank
    n_samples_per_prompt: int
    micro_train_batch_size: int
    max_epochs: int  # PPO epochs over each rollout
    num_episodes: int  # passes over the prompt set
    sampling: SamplingConfig
    kl_estimator: KLEstimator = KLEstimator.K1  # the coefficient lives in the KL controller
    gamma: float = 1.0
    lambd: float = 0.95
    eps_clip: float = 0.2
    value_clip: float | None = 0.2
    normalize_reward: bool = False
    reward_clip_range: tuple[float, float] = (-10.0, 10.0)
    advantage_estimator: AdvantageEstimator = AdvantageEstimator.GAE
    freezing_actor_steps: int = -1
    seed: int = 42
    advantage_std_norm: bool = True  # --no_advantage_std_norm: whitening only takes the mean out
    use_kl_loss: bool = False  # --use_kl_loss: the KL to the reference is a loss term, not a reward penalty


@dataclass
class Experience:
    sequences: torch.Tensor  # [S, P + T]
    attention_mask: torch.Tensor  # [S, P + T]
    position_ids: torch.Tensor  # [S, P + T]
    prompt_len: int  # P
    action_mask: torch.Tensor  # [S, T]
    old_logp: torch.Tensor  # [S, T]
    advantages: torch.Tensor  # [S, T]
    values: torch.Tensor | None  # [S, T] (critic only)
    returns: torch.Tensor | None  # [S, T] (critic only)
    ref_logp: torch.Tensor | None = None  # [S, T] (--use_kl_loss only)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def inputs(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.sequences[rows], "attention_mask": self.attention_mask[rows],
                "position_ids": self.position_ids[rows]}


def action_logprobs(model: Any, inputs: dict[str, torch.Tensor], prompt_len: int) -> torch.Tensor:
    """log p of each answer token, [B, T]."""
    logits = model(**inputs, use_cache=False).logits
    return token_logprobs(logits, inputs["input_ids"])[:, prompt_len - 1:]


def critic_values(critic: Any, inputs: dict[str, torch.Tensor], prompt_len: int) -> torch.Tensor:
    """The critic's value of the state before each answer token, [B, T]."""
    return critic(**inputs, all_values=True)[:, prompt_len - 1:-1].float()


def last_token_index(action_mask: torch.Tensor) -> torch.Tensor:
    width = action_mask.shape[1]
    return width - 1 - action_mask.flip(1).int().argmax(1)


class RewardScorer:
    """The mean score of the reward models for each sample. A reward model given with its own tokenizer
    (it differs from the actor's: --allow_tokenizer_mismatch) scores each sample decoded to text and
    re-encoded with that tokenizer."""

    def __init__(self, models: list[tuple[FrozenModel, Any]], device: torch.device, actor_tokenizer: Any) -> None:
        self.models = models
        self.device = device
        self.actor_tok = actor_tokenizer

    def __call__(self, inputs: dict[str, torch.Tensor], labels: Sequence[Any] | None = None,
                 prompt_len: int | None = None) -> torch.Tensor:
        """``labels`` and ``prompt_len`` are for scorers that read them (``RemoteRewardScorer``)."""
        scores = [rm(**(inputs if tok is None else self._retokenize(inputs, tok))).float() for rm, tok in self.models]
        return torch.stack(scores).mean(0)

    def _retokenize(self, inputs: dict[str, torch.Tensor], tok: Any) -> dict[str, torch.Tensor]:
        texts = [self.actor_tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=False)
                 for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        enc = [tok(t, add_special_tokens=False)["input_ids"] or [tok.eos_token_id] for t in texts]
        ids, mask = left_pad(enc, tok.pad_token_id)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "position_ids": (mask.cumsum(1) - 1).clamp(min=0).to(self.device)}


class Scorer(Protocol):
    """The reward hook: a reward per sample of ``inputs`` (``RewardScorer``, or ``RemoteRewardScorer`` over HTTP)."""

    def __call__(self, inputs: dict[str, torch.Tensor], labels: Sequence[Any] | None = None,
                 prompt_len: int | None = None) -> torch.Tensor: ...


class ExperienceMaker:
    def __init__(self, strategy: DeepspeedStrategy, actor: Any, critic: Any | None, ref: FrozenModel | None,
                 scorer: Scorer, cfg: PPOConfig, kl_ctl: FixedKLController, reward_moments: RunningMoments,
                 eos_token_id: int, pad_token_id: int) -> None:
        self.strategy = strategy
        self.actor = actor
        self.critic = critic
        self.ref = ref
        self.scorer = scorer
        self.cfg = cfg
        self.kl_ctl = kl_ctl
        self.moments = reward_moments
        self.eos = eos_token_id
        self.pad = pad_token_id

    @torch.no_grad()
    def make(self, prompts: list[list[int]], step: int,
             labels: Sequence[Any] | None = None) -> tuple[Experience, dict[str, float]]:
        """``labels``: one per prompt (--label_key), handed to the scorer with each of its samples."""
        cfg, dev = self.cfg, self.strategy.device
        samples = [p for p in prompts for _ in range(cfg.n_samples_per_prompt)]
        sample_labels = [label for label in labels or [None] * len(prompts) for _ in range(cfg.n_samples_per_prompt)]
        m = cfg.micro_rollout_batch_size
        chunks = [samples[i:i + m] for i in range(0, len(samples), m)]
        calls = len(chunks)
        gens = []
        for i, chunk in enumerate(chunks):
            ids, mask = left_pad(chunk, self.pad)
            # the seed names this rank's i-th call of this step: a resumed run draws the same samples
            gen = generate(self.actor, ids.to(dev), mask.to(dev), cfg.sampling, eos_token_id=self.eos,
                           pad_token_id=self.pad, zero_stage=self.strategy.cfg.zero_stage,
                           seed=batch_seed(cfg.seed, step, self.strategy.rank * calls + i))
            gens.append((gen, mask))
        exp = layout_rollout(gens, self.pad, dev)

        # scores, log-probabilities and values in micro batches over the common layout
        self.actor.eval()
        if self.critic is not None:
            self.critic.eval()
        parts: dict[str, list[torch.Tensor]] = {"old_logp": [], "ref_logp": [], "values": [], "score": []}
        for start in range(0, len(exp), m):
            rows = torch.arange(start, min(start + m, len(exp)), device=dev)
            inputs = exp.inputs(rows)
            parts["old_logp"].append(action_logprobs(self.actor, inputs, exp.prompt_len))
            if self.ref is not None:
                parts["ref_logp"].append(action_logprobs(self.ref, inputs, exp.prompt_len))
            if self.critic is not None:
                parts["values"].append(critic_values(self.critic, inputs, exp.prompt_len))
            parts["score"].append(self.scorer(inputs, sample_labels[start:start + m], exp.prompt_len))
        self.actor.train()
        if self.critic is not None:
            self.critic.train()
        exp.old_logp = torch.cat(parts["old_logp"])
        metrics = assign_advantages(
            exp, torch.cat(parts["score"]), torch.cat(parts["ref_logp"]) if self.ref is not None else None,
            torch.cat(parts["values"]) if self.critic is not None else None, cfg, self.kl_ctl, self.moments,
            lambda values: self.strategy.all_reduce(values, op=ReduceOp.SUM))
        return exp, metrics


Totals = Callable[[dict[str, float]], dict[str, float]]  # sums over every rank that holds part of the rollout


def assign_advantages(exp: Experience, score: torch.Tensor, ref_logp: torch.Tensor | None,
                      values: torch.Tensor | None, cfg: PPOConfig, kl_ctl: FixedKLController,
                      moments: RunningMoments, totals: Totals) -> dict[str, float]:
    """Scores into rewards and per-token advantages (and returns, with a critic), in place on ``exp``
    (whose ``old_logp`` is set). ``totals`` sums statistics over the ranks that share the rollout (the
    identity when one process holds all of it); returns this part's metrics."""
    dev = exp.sequences.device
    mask = exp.action_mask.float()
    exp.old_logp = exp.old_logp * mask
    kl = (kl_estimate(exp.old_logp, ref_logp, cfg.kl_estimator) * mask if ref_logp is not None
          else torch.zeros_like(mask))
    values = values * mask if values is not None else None
    metrics = {"reward": float(score.mean()), "response_length": float(mask.sum(1).mean()),
               "kl": float(kl.sum(1).mean()), "kl_coef": kl_ctl.value}
    reward = score
    if cfg.normalize_reward:
        sums = totals({"sum": float(score.double().sum()), "sq": float((score.double() ** 2).sum()),
                       "n": float(score.numel())})
        moments.update(sums["sum"], sums["sq"], sums["n"])
        reward = moments.normalize(score)
    reward = reward.clamp(*cfg.reward_clip_range)
    n = cfg.n_samples_per_prompt
    if cfg.advantage_estimator is AdvantageEstimator.RLOO:
        reward = rloo_baseline(reward, n)
    elif cfg.advantage_estimator is AdvantageEstimator.GROUP_NORM:
        reward = group_norm(reward, n)
    elif cfg.advantage_estimator is AdvantageEstimator.REINFORCE_BASELINE:
        reward = group_mean_baseline(reward, n)
    if cfg.use_kl_loss:  # the actor's loss holds the KL (update.train_actor); the reward does not
        exp.ref_logp = ref_logp * mask if ref_logp is not None else None
        token_rewards = torch.zeros_like(kl)
    else:
        token_rewards = -kl_ctl.value * kl
    token_rewards[torch.arange(len(exp), device=dev), last_token_index(exp.action_mask)] += reward
    if cfg.advantage_estimator.trains_critic:
        assert values is not None
        exp.advantages, exp.returns = gae(token_rewards, values, mask, cfg.gamma, cfg.lambd)
        exp.values = values
        exp.advantages = whiten(exp.advantages, mask, totals, divide_by_std=cfg.advantage_std_norm)
    else:
        exp.advantages = discounted_returns(token_rewards, mask, cfg.gamma)
        if cfg.advantage_estimator in (AdvantageEstimator.REINFORCE, AdvantageEstimator.REINFORCE_BASELINE):
            exp.advantages = whiten(exp.advantages, mask, totals, divide_by_std=cfg.advantage_std_norm)
    return metrics


def layout_rollout(gens: list[tuple[Generation, torch.Tensor]], pad: int, dev: torch.device) -> Experience:
    """Generations (each with its prompts' attention mask) in one layout: prompts right-aligned at P,
    answers from P on."""
    P = max(g.prompt_len for g, _ in gens)
    T = max(g.responses.shape[1] for g, _ in gens)
    S = sum(g.sequences.shape[0] for g, _ in gens)
    seq = torch.full((S, P + T), pad, dtype=torch.long, device=dev)
    attn = torch.zeros((S, P + T), dtype=torch.long, device=dev)
    action = torch.zeros((S, T), dtype=torch.bool, device=dev)
    r = 0
    for g, prompt_mask in gens:
        b, p, t = g.sequences.shape[0], g.prompt_len, g.responses.shape[1]
        seq[r:r + b, P - p:P] = g.sequences[:, :p]
        attn[r:r + b, P - p:P] = prompt_mask.to(dev)
        seq[r:r + b, P:P + t] = torch.where(g.response_mask, g.responses, pad)
        action[r:r + b, :t] = g.response_mask
        r += b
    attn[:, P:] = action.long()
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)
    empty = torch.zeros((S, T), device=dev)
    return Experience(seq, attn, position_ids, P, action, empty, empty, None, None)


def whiten(x: torch.Tensor, mask: torch.Tensor, totals: Totals, divide_by_std: bool = True) -> torch.Tensor:
    """(x - mean) / std over every rank's answer tokens (only x - mean without ``divide_by_std``)."""
    t = totals({"sum": float((x * mask).double().sum()), "sq": float(((x * mask) ** 2).double().sum()),
                "n": float(mask.sum())})
    mean = t["sum"] / max(t["n"], 1.0)
    if not divide_by_std:
        return (x - mean) * mask
    var = max(t["sq"] / max(t["n"], 1.0) - mean * mean, 0.0)
    return (x - mean) / (var ** 0.5 + 1e-8) * mask
