"""Loss functions: small, pure, each tested against its formula written out by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for t >= 1, shape [B, T-1], computed in fp32."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over target tokens; returns (loss, number of target tokens).

    ``loss_mask[:, t]`` marks token t as a target (predicted from token t-1).
    """
    mask = loss_mask[:, 1:].to(torch.float32)
    count = mask.sum()
    nll = -token_logprobs(logits, input_ids)
    return (nll * mask).sum() / count.clamp(min=1.0), count
