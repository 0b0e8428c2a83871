"""DPO (and IPO, cDPO): preferences against a frozen reference model, one reference forward per micro batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from openrl_ckpt.strategy.deepspeed import FrozenModel
from openrl_ckpt.trainers.base import StepOutput
from openrl_ckpt.trainers.common import batch_logps, batch_tokens, check_frozen_identity, real_rows

# (policy chosen, policy rejected, reference chosen, reference rejected) -> per-pair loss [B]
PreferenceLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DPOAlgorithm:
    name = "dpo"

    def __init__(self, engine: Any, reference: FrozenModel, device: torch.device, loss: PreferenceLoss, *,
                 beta: float, average_logps: bool = False, nll_loss_coef: float = 0.0,
                 reference_identity: dict[str, Any] | None = None) -> None:
        self.engine = engine
        self.reference = reference
        self.device = device
        self.loss = loss
        self.beta = beta
        self.average = average_logps  # IPO compares per-token averages
        self.nll_loss_coef = nll_loss_coef
        self.reference_identity = reference_identity or {}

    def _forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Policy and reference log-probabilities of the 2B sequences (chosen first), and the per-pair loss."""
        sums, counts = batch_logps(self.engine, batch, self.device)
        ref_sums, _ = batch_logps(self.reference, batch, self.device)  # the only reference pass of this batch
        denom = counts.clamp(min=1) if self.average else 1.0
        policy, ref = sums / denom, ref_sums / denom
        half = len(batch["index"])
        pc, pr, rc, rr = policy[:half], policy[half:], ref[:half], ref[half:]
        return {"loss": self.loss(pc, pr, rc, rr), "chosen_reward": self.beta * (pc - rc).detach(),
                "rejected_reward": self.beta * (pr - rr).detach(),
                "nll": -sums[:half].sum() / counts[:half].sum().clamp(min=1)}

    def train_step(self, batch: dict[str, Any]) -> StepOutput:
        out = self._forward(batch)
        loss = out["loss"].mean()
        chosen, rejected = out["chosen_reward"], out["rejected_reward"]
        metrics = {"loss": loss.item(), "chosen_reward": chosen.mean().item(),
                   "rejected_reward": rejected.mean().item(),
                   "reward_acc": (chosen > rejected).float().mean().item(),
                   "reward_margin": (chosen - rejected).mean().item()}
        if self.nll_loss_coef > 0:
            metrics["nll_loss"] = out["nll"].item()
            loss = loss + self.nll_loss_coef * out["nll"]
        return StepOutput(loss=loss, metrics=metrics, tokens=batch_tokens(batch))

    def eval_step(self, batch: dict[str, Any]) -> dict[str, tuple[float, float]]:
        out = self._forward(batch)
        real = real_rows(batch, self.device)
        n = float(real.sum())
        chosen, rejected = out["chosen_reward"], out["rejected_reward"]
        return {"eval_loss": (float((out["loss"] * real).sum()), n),
                "eval_reward_acc": (float(((chosen > rejected).float() * real).sum()), n),
                "eval_reward_margin": (float(((chosen - rejected) * real).sum()), n),
                "eval_chosen_reward": (float((chosen * real).sum()), n),
                "eval_rejected_reward": (float((rejected * real).sum()), n)}

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference_identity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_frozen_identity(state.get("reference", {}), self.reference_identity, "--ref_pretrain")
