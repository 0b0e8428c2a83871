"""Reward model: a pairwise loss on the rewards of chosen and rejected answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from openrl_ckpt.trainers.base import StepOutput
from openrl_ckpt.trainers.common import batch_tokens, model_inputs, real_rows

PairLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (chosen, rejected, margin) -> [B]


class RewardModelAlgorithm:
    name = "rm"

    def __init__(self, engine: Any, device: torch.device, loss: PairLoss, compute_fp32_loss: bool = False,
                 margin_loss: bool = False) -> None:
        self.engine = engine
        self.device = device
        self.loss = loss
        self.fp32 = compute_fp32_loss
        self.margin_loss = margin_loss  # --margin_loss: the rows' "margin" enters the loss; otherwise 0

    def _margin(self, batch: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
        margin = batch["margin"].to(self.device, like.dtype)
        return margin if self.margin_loss else torch.zeros_like(margin)

    def _rewards(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = self.engine(**model_inputs(batch, self.device), last_index=batch["last"].to(self.device))
        if self.fp32:
            rewards = rewards.float()
        half = len(batch["index"])
        return rewards[:half], rewards[half:]

    def train_step(self, batch: dict[str, Any]) -> StepOutput:
        chosen, rejected = self._rewards(batch)
        loss = self.loss(chosen, rejected, self._margin(batch, chosen)).mean()
        metrics = {"loss": loss.item(), "acc": (chosen > rejected).float().mean().item(),
                   "chosen_reward": chosen.mean().item(), "rejected_reward": rejected.mean().item()}
        return StepOutput(loss=loss, metrics=metrics, tokens=batch_tokens(batch))

    def eval_step(self, batch: dict[str, Any]) -> dict[str, tuple[float, float]]:
        chosen, rejected = self._rewards(batch)
        real = real_rows(batch, self.device)
        n = float(real.sum())
        loss = self.loss(chosen, rejected, self._margin(batch, chosen)).float()
        both = torch.cat([chosen, rejected]).float()
        real2 = torch.cat([real, real])
        return {"eval_loss": (float((loss * real).sum()), n),
                "eval_acc": (float(((chosen > rejected).float() * real).sum()), n),
                "eval_reward_gap": (float(((chosen - rejected).float() * real).sum()), n),
                # over every scored answer: the statistics --normalize_reward stores
                "eval_reward_mean": (float((both * real2).sum()), 2 * n),
                "eval_reward_sq": (float((both.square() * real2).sum()), 2 * n)}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

