"""SFT: next-token cross-entropy on response tokens (all tokens in --pretrain_mode)."""

from __future__ import annotations

from typing import Any

import torch

from openrl_ckpt.models.loss import sft_loss, token_logprobs
from openrl_ckpt.trainers.base import StepOutput
from openrl_ckpt.trainers.common import batch_tokens, model_inputs


class SFTAlgorithm:
    name = "sft"

    def __init__(self, engine: Any, device: torch.device, aux_loss_coef: float = 0.0) -> None:
        self.engine = engine
        self.device = device
        self.aux_loss_coef = aux_loss_coef

    def _forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.engine(**model_inputs(batch, self.device))

    def train_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        out = self._forward(batch)
        input_ids, loss_mask = batch["input_ids"].to(self.device), batch["loss_mask"].to(self.device)
        loss, _ = sft_loss(out.logits, input_ids, loss_mask)
        metrics = {"loss": loss.item()}
        aux = getattr(out, "aux_loss", None)
        if self.aux_loss_coef > 0 and aux is not None:
            metrics["aux_loss"] = aux.item()
            loss = loss + self.aux_loss_coef * aux
        return StepOutput(loss=loss, metrics=metrics, tokens=batch_tokens(batch))

    def eval_step(self, batch: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
        out = self._forward(batch)
        input_ids = batch["input_ids"].to(self.device)
        real = (batch["index"] >= 0).to(self.device).unsqueeze(1)  # padding rows weigh nothing
        mask = (batch["loss_mask"].to(self.device) & real)[:, 1:].float()
        nll = -token_logprobs(out.logits, input_ids)
        return {"eval_loss": (float((nll * mask).sum()), float(mask.sum()))}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
