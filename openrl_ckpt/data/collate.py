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


def target_mask(sample: dict, length: int) -> torch.Tensor:
    """[length] bools: the sample's targets, from ``loss_start`` on or inside its ``loss_spans`` (--multiturn);
    never its first token."""
    positions = torch.arange(length)
    if "loss_spans" not in sample:
        return positions >= max(sample["loss_start"], 1)
    mask = torch.zeros(length, dtype=torch.bool)
    for start, stop in sample["loss_spans"]:
        mask[max(start, 1):stop] = True
    return mask


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
        loss_mask[row, :length] = target_mask(sample, length)
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
    loss_mask = torch.cat([target_mask(s, length) for s, length in zip(samples, lengths)])
    return {
        "input_ids": input_ids.unsqueeze(0),
        "position_ids": position_ids.unsqueeze(0),
        "loss_mask": loss_mask.unsqueeze(0),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
    }


def sequence_batch(seqs: list[list[int]], loss_starts: list[int], pad_token_id: int,
                   packing: bool) -> dict[str, torch.Tensor]:
    """Several sequences as one model input that per-sequence sums can be read back from.

    Padded: rows right-padded to the longest, with ``attention_mask``. Packed: one row with
    ``position_ids`` restarting per sequence. Either way ``segment`` [rows, T] numbers each token's
    sequence (-1 on padding), ``loss_mask`` marks target tokens (from ``loss_start``, never a
    sequence's first token) and ``last`` [N] holds the flat index of each sequence's last token,
    where a reward head reads.
    """
    lengths = [len(s) for s in seqs]
    if packing:
        batch = pack_collate([{"input_ids": s, "loss_start": start, "index": 0} for s, start in zip(seqs, loss_starts)])
        batch.pop("index")
        batch["segment"] = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(lengths)).unsqueeze(0)
        batch["last"] = torch.tensor(lengths).cumsum(0) - 1
        return batch
    batch = pad_collate([{"input_ids": s, "loss_start": start, "index": 0} for s, start in zip(seqs, loss_starts)],
                        pad_token_id)
    batch.pop("index")
    width = batch["input_ids"].shape[1]
    rows = torch.arange(len(seqs)).unsqueeze(1).expand(-1, width)
    batch["segment"] = torch.where(batch["attention_mask"].bool(), rows, torch.full_like(rows, -1))
    batch["last"] = torch.arange(len(seqs)) * width + torch.tensor(lengths) - 1
    return batch


def pair_collate(samples: list[dict], pad_token_id: int, packing: bool = False) -> dict[str, torch.Tensor]:
    """B pairs as 2B sequences, chosen ones first: sequence i and i + B share a prompt."""
    seqs = [s["chosen_ids"] for s in samples] + [s["rejected_ids"] for s in samples]
    starts = [s["chosen_start"] for s in samples] + [s["rejected_start"] for s in samples]
    batch = sequence_batch(seqs, starts, pad_token_id, packing)
    batch["margin"] = torch.tensor([s["margin"] for s in samples], dtype=torch.float32)
    batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    return batch


def kto_collate(samples: list[dict], pad_token_id: int, eos_token_id: int, max_len: int,
                packing: bool = False) -> dict:
    """B labelled rows, and under ``"kl"`` B mismatched rows (prompt i with answer i + 1) for KTO's KL
    reference point. A mismatched row longer than ``max_len`` is cut keeping EOS last, like every other."""
    n = len(samples)
    starts = [len(s["prompt_ids"]) for s in samples]
    mismatched = []
    for i, s in enumerate(samples):
        seq = s["prompt_ids"] + samples[(i + 1) % n]["answer_ids"]
        mismatched.append(seq if len(seq) <= max_len else [*seq[: max_len - 1], eos_token_id])
    batch: dict = sequence_batch([s["prompt_ids"] + s["answer_ids"] for s in samples], starts, pad_token_id, packing)
    batch["kl"] = sequence_batch(mismatched, starts, pad_token_id, packing)
    batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.bool)
    batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    return batch
