"""Knowledge distillation: (1 - kd_coef) * SFT loss + kd_coef * a distillation loss against a frozen teacher."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from openrl_ckpt.models.loss import sft_loss
from openrl_ckpt.strategy.deepspeed import FrozenModel
from openrl_ckpt.trainers.base import StepOutput
from openrl_ckpt.trainers.common import batch_tokens, check_frozen_identity, model_inputs
from openrl_ckpt.trainers.sft import SFTAlgorithm

# (student logits, teacher logits, loss mask) -> scalar
DistillLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class KDAlgorithm:
    name = "kd"

    def __init__(self, engine: Any, teacher: FrozenModel, device: torch.device, distill_loss: DistillLoss,
                 kd_coef: float, teacher_identity: dict[str, Any] | None = None) -> None:
        self.engine = engine
        self.teacher = teacher
        self.device = device
        self.distill_loss = distill_loss
        self.kd_coef = kd_coef
        self.teacher_identity = teacher_identity or {}
        self.sft = SFTAlgorithm(engine, device)

    def _losses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = model_inputs(batch, self.device)
        student = self.engine(**inputs).logits
        teacher = self.teacher(**inputs).logits
        vocab = student.shape[-1]
        if teacher.shape[-1] > vocab:  # the same tokenizer (checked at start); extra rows are embedding padding
            teacher = teacher[..., :vocab]
        input_ids, loss_mask = inputs["input_ids"], batch["loss_mask"].to(self.device)
        return sft_loss(student, input_ids, loss_mask)[0], self.distill_loss(student, teacher, loss_mask)

    def train_step(self, batch: dict[str, Any]) -> StepOutput:
        sft, kd = self._losses(batch)
        loss = (1 - self.kd_coef) * sft + self.kd_coef * kd
        return StepOutput(loss=loss, metrics={"loss": loss.item(), "sft_loss": sft.item(), "kd_loss": kd.item()},
                          tokens=batch_tokens(batch))

    def eval_step(self, batch: dict[str, Any]) -> dict[str, tuple[float, float]]:
        return self.sft.eval_step(batch)  # the student's own NLL on held-out responses

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher_identity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_frozen_identity(state.get("teacher", {}), self.teacher_identity, "--teacher_model")
