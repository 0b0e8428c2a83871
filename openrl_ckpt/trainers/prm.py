"""Process reward model: the causal LM predicts each step's label token at the step's placeholder."""

from __future__ import annotations

from typing import Any

import torch

from openrl_ckpt.data.prm_dataset import IGNORE
from openrl_ckpt.models.loss import process_reward_loss
from openrl_ckpt.trainers.base import StepOutput
from openrl_ckpt.trainers.common import batch_tokens, model_inputs, real_rows


class PRMAlgorithm:
    name = "prm"

    def __init__(self, engine: Any, device: torch.device, reward_token_ids: list[int] | None) -> None:
        self.engine = engine
        self.device = device
        self.reward_token_ids = reward_token_ids

    def _losses(self, batch: dict[str, Any], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.engine(**model_inputs(batch, self.device)).logits
        probs = batch["step_probs"].to(self.device) if "step_probs" in batch else None
        return process_reward_loss(logits, targets, self.reward_token_ids, probs)

    def train_step(self, batch: dict[str, Any]) -> StepOutput:
        losses, correct = self._losses(batch, batch["step_targets"].to(self.device))
        loss = losses.mean() if losses.numel() else losses.sum()  # a micro batch with every step cut off: 0
        metrics = {"loss": loss.item(), "acc": correct.float().mean().item() if correct.numel() else 0.0}
        return StepOutput(loss=loss, metrics=metrics, tokens=batch_tokens(batch))

    def eval_step(self, batch: dict[str, Any]) -> dict[str, tuple[float, float]]:
        real = real_rows(batch, self.device).bool().unsqueeze(1)  # padding rows of the eval sampler weigh nothing
        targets = batch["step_targets"].to(self.device).masked_fill(~real, IGNORE)
        losses, correct = self._losses(batch, targets)
        n = float(losses.numel())
        return {"eval_loss": (float(losses.sum()), n), "eval_acc": (float(correct.float().sum()), n)}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
