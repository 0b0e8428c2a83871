"""KTO: desirable and undesirable answers against a reference point, the policy's KL from the reference.

Unpaired batches carry, next to their B labelled rows, B mismatched rows (prompt i, answer i + 1) whose
policy/reference log-ratio estimates the KL; ``--vanilla_loss`` batches are pairs, and each side's
reference point is the other side's mean log-ratio. Either estimate is averaged over all ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from openrl_ckpt.models.loss import kto_loss
from openrl_ckpt.strategy.deepspeed import FrozenModel
from openrl_ckpt.trainers.base import StepOutput
from openrl_ckpt.trainers.common import batch_logps, batch_tokens, check_frozen_identity, real_rows


class KTOAlgorithm:
    name = "kto"

    def __init__(self, engine: Any, reference: FrozenModel, device: torch.device, *, beta: float,
                 desirable_weight: float, undesirable_weight: float, vanilla: bool,
                 mean_over_ranks: Callable[[float], float], reference_identity: dict[str, Any] | None = None) -> None:
        self.engine = engine
        self.reference = reference
        self.device = device
        self.beta = beta
        self.weights = (desirable_weight, undesirable_weight)
        self.vanilla = vanilla
        self.mean_over_ranks = mean_over_ranks
        self.reference_identity = reference_identity or {}

    def _log_ratios(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(policy logps, reference logps, desirable?) of the labelled rows: for pairs, chosen then rejected."""
        policy, _ = batch_logps(self.engine, batch, self.device)
        ref, _ = batch_logps(self.reference, batch, self.device)
        if self.vanilla:
            half = len(batch["index"])
            desirable = torch.arange(2 * half, device=self.device) < half
        else:
            desirable = batch["label"].to(self.device)
        return policy, ref, desirable

    def _kl(self, value: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.mean_over_ranks(float(value)), device=self.device)

    def train_step(self, batch: dict[str, Any]) -> StepOutput:
        policy, ref, desirable = self._log_ratios(batch)
        ratio = (policy - ref).detach()
        if self.vanilla:  # each side's reference point is the other side's KL
            kl_desirable, kl_undesirable = self._kl(ratio[~desirable].mean()), self._kl(ratio[desirable].mean())
            kl = torch.where(desirable, kl_desirable, kl_undesirable)
            metrics = {"kl": 0.5 * float(kl_desirable.clamp(min=0) + kl_undesirable.clamp(min=0))}
        else:
            with torch.no_grad():
                mismatched = batch["kl"]
                kl = self._kl((batch_logps(self.engine, mismatched, self.device)[0]
                               - batch_logps(self.reference, mismatched, self.device)[0]).mean())
            metrics = {"kl": float(kl.clamp(min=0))}
        loss = kto_loss(policy, ref, desirable, kl, self.beta, *self.weights).mean()
        metrics["loss"] = loss.item()
        tokens = batch_tokens(batch) + (0 if self.vanilla else batch_tokens(batch["kl"]))
        return StepOutput(loss=loss, metrics=metrics, tokens=tokens)

    def eval_step(self, batch: dict[str, Any]) -> dict[str, tuple[float, float]]:
        policy, ref, desirable = self._log_ratios(batch)
        real = real_rows(batch, self.device)
        if self.vanilla:
            real = torch.cat([real, real])
        ratio = policy - ref
        good, bad = desirable.float() * real, (~desirable).float() * real
        return {"eval_desirable_logratio": (float((ratio * good).sum()), float(good.sum())),
                "eval_undesirable_logratio": (float((ratio * bad).sum()), float(bad.sum()))}

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference_identity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_frozen_identity(state.get("reference", {}), self.reference_identity, "--ref_pretrain")
