"""PPO's small stateful pieces and sample-level baselines, pure and JSON-serialisable: the KL
coefficient controllers, the running reward normaliser, and the group baselines (rloo, group_norm)."""

from __future__ import annotations

import math
from typing import Any

import torch


class FixedKLController:
    """The KL coefficient stays at --init_kl_coef."""

    def __init__(self, value: float) -> None:
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Moves the coefficient so the measured KL approaches ``target``: with
    e = clip(kl / target - 1, -0.2, 0.2), value *= 1 + e * n_steps / horizon (Ziegler et al. 2019)."""

    def __init__(self, value: float, target: float, horizon: int) -> None:
        super().__init__(value)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class RunningMoments:
    """Mean and standard deviation of every value seen so far (parallel Welford merge of batch moments)."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 0.0

    def update(self, batch_sum: float, batch_sum_sq: float, batch_count: float) -> None:
        """Merge a batch given as its sum, sum of squares and size (all ranks' together)."""
        if batch_count <= 0:
            return
        batch_mean = batch_sum / batch_count
        batch_var = max(batch_sum_sq / batch_count - batch_mean * batch_mean, 0.0)
        total = self.count + batch_count
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * batch_count + delta * delta * self.count * batch_count / total
        self.mean += delta * batch_count / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def normalize(self, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return (x - self.mean) / (self.std + eps)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


def rloo_baseline(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Leave-one-out advantage per sample: r_i - mean of the other n - 1 rewards of its prompt.
    ``rewards``: [G * n], the n samples of each prompt adjacent."""
    r = rewards.view(-1, n)
    return (r - (r.sum(1, keepdim=True) - r) / (n - 1)).flatten()


def group_mean_baseline(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """REINFORCE with a baseline: r_i - the mean of all n rewards of its prompt (itself included)."""
    r = rewards.view(-1, n)
    return (r - r.mean(1, keepdim=True)).flatten()


def group_norm(rewards: torch.Tensor, n: int, eps: float = 1e-8) -> torch.Tensor:
    """(r - group mean) / (group std + eps), the std unbiased, per prompt's n samples."""
    r = rewards.view(-1, n)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).flatten()
