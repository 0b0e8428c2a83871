"""Batch SFT examples, padded or packed, with a loss mask over target tokens.

``loss_mask[t]`` is True when token ``t`` is a target, i.e. predicted from token ``t - 1``: from the
sample's ``loss_start`` on, never on padding and never on a sample's first token, so packed samples
never predict across a boundary. The loss is cross-entropy of ``logits[:, :-1]`` against
``input_ids[:, 1:]`` weighted by ``loss_mask[:, 1:]``.

Packed batches carry ``position_ids`` restarting at 0 per sample and no attention mask: transformers
then builds a block-diagonal causal mask from the position ids. That detection is skipped when the
model is called with a cache, so the forward pass must use ``use_cache=False`` (the model config
defaults to True, even in training mode).
"""

from __future__ import annotations

import torch


def pad_collate(samples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: input_ids, attention_mask, loss_mask [B, T] and index [B]."""
    width = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    loss_mask = torch.zeros((len(samples), width), dtype=torch.bool)
    for row, sample in enumerate(samples):
        length = len(sample["input_ids"])
        input_ids[row, :length] = torch.tensor(sample["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
        loss_mask[row, max(sample["loss_start"], 1) : length] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
    }


def pack_collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Concatenate samples into one row: input_ids, position_ids, loss_mask [1, sum(L)] and index [B]."""
    lengths = [len(s["input_ids"]) for s in samples]
    input_ids = torch.tensor([t for s in samples for t in s["input_ids"]], dtype=torch.long)
    position_ids = torch.cat([torch.arange(length, dtype=torch.long) for length in lengths])
    loss_mask = torch.cat(
        [torch.arange(length) >= max(s["loss_start"], 1) for s, length in zip(samples, lengths)]
    )
    return {
        "input_ids": input_ids.unsqueeze(0),
        "position_ids": position_ids.unsqueeze(0),
        "loss_mask": loss_mask.unsqueeze(0),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
    }
