"""Process reward model data: texts whose steps end with a placeholder token, and one label per step.

A row is ``{input_key: "step 1 ки step 2 ки", label_key: ["+", "-"]}``: the model reads the text and,
at each placeholder, predicts the step's label. Hard labels are reward tokens (``--reward_tokens + -``:
the loss is over those tokens only; without the flag, over the whole vocabulary); soft labels are the
probability that the step is good, with exactly two reward tokens (good, bad). A text longer than
``--max_len`` is cut, and so are the labels of the placeholders cut off. Each placeholder and reward
token must be one token of the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch

from openrl_ckpt.data.preference_dataset import check_columns
from openrl_ckpt.data.templates import row_text
from openrl_ckpt.errors import UserError

IGNORE = -100  # no label at this token


@dataclass(frozen=True)
class PRMConfig:
    """``--input_key --label_key --placeholder_token --reward_tokens``."""

    input_key: str
    label_key: str
    placeholder_token: str
    reward_tokens: tuple[str, ...] | None


def single_token_id(tokenizer: Any, token: str, flag: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(f"{flag} {token!r} is {len(ids)} tokens for this tokenizer; it must be exactly one")
    return ids[0]


class PRMDataset(torch.utils.data.Dataset):
    """``__getitem__(i)`` -> ``{"input_ids", "step_targets", "step_probs", "index"}``: per token, the target
    class at each placeholder (an index into the reward tokens, or a vocabulary id without them; IGNORE
    elsewhere) and, for soft labels, the probability of the first reward token (NaN elsewhere)."""

    def __init__(self, ids: list[list[int]], targets: list[list[int]], probs: list[list[float]] | None) -> None:
        self._offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in ids], out=self._offsets[1:])
        self._ids = np.asarray([t for x in ids for t in x], dtype=np.int64)
        self._targets = np.asarray([t for x in targets for t in x], dtype=np.int64)
        self._probs = None if probs is None else np.asarray([p for x in probs for p in x], dtype=np.float32)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} rows")
        a, b = self._offsets[i], self._offsets[i + 1]
        return {"input_ids": self._ids[a:b].tolist(), "step_targets": self._targets[a:b].tolist(),
                "step_probs": None if self._probs is None else self._probs[a:b].tolist(), "index": i}

    @property
    def soft(self) -> bool:
        return self._probs is not None


def _labels(value: object, cfg: PRMConfig, where: str) -> list[str] | list[float]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: '{cfg.label_key}' (--label_key) must be a non-empty list of step labels, got "
                        f"{type(value).__name__}")
    if all(isinstance(v, str) for v in value):
        return value
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1
           for v in value):
        return [float(v) for v in value]
    raise UserError(f"{where}: '{cfg.label_key}' (--label_key) must hold reward tokens (text) or probabilities in "
                    f"[0, 1], got {value[:4]!r}")


def build_prm_dataset(raw: datasets.Dataset, tokenizer: Any, cfg: PRMConfig, *, max_len: int,
                      source: str) -> tuple[PRMDataset, dict[str, int]]:
    check_columns(raw, {"--input_key": cfg.input_key, "--label_key": cfg.label_key}, source)
    placeholder = single_token_id(tokenizer, cfg.placeholder_token, "--placeholder_token")
    reward_ids = [single_token_id(tokenizer, t, "--reward_tokens") for t in cfg.reward_tokens or ()]
    ids_out: list[list[int]] = []
    targets_out: list[list[int]] = []
    probs_out: list[list[float]] = []
    soft: bool | None = None
    truncated = 0
    texts = raw[cfg.input_key]
    for n, (text, value) in enumerate(zip(texts, raw[cfg.label_key]), start=1):
        where = f"{source} row {n}"
        text = row_text({cfg.input_key: text}, cfg.input_key, "--input_key", where)
        labels = _labels(value, cfg, where)
        row_soft = isinstance(labels[0], float)
        if soft is not None and row_soft != soft:
            raise UserError(f"{where}: mixes soft (probability) and hard (token) labels with earlier rows")
        soft = row_soft
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        positions = [t for t, token in enumerate(ids) if token == placeholder]
        if len(positions) != len(labels):
            raise UserError(f"{where}: {len(positions)} --placeholder_token {cfg.placeholder_token!r} steps but "
                            f"{len(labels)} labels")
        if len(ids) > max_len:
            truncated += 1
            ids = ids[:max_len]
            positions = [t for t in positions if t < max_len]
        targets = [IGNORE] * len(ids)
        probs = [math.nan] * len(ids)
        for t, label in zip(positions, labels):
            if row_soft:
                probs[t], targets[t] = float(label), 0
            else:
                targets[t] = _hard_target(str(label), tokenizer, cfg, reward_ids, where)
        ids_out.append(ids)
        targets_out.append(targets)
        probs_out.append(probs)
    if soft and len(reward_ids) != 2:
        raise UserError(f"{source}: probability labels need exactly two --reward_tokens (good, bad), got "
                        f"{len(reward_ids)}")
    if not ids_out:
        raise UserError(f"{source}: no rows")
    return PRMDataset(ids_out, targets_out, probs_out if soft else None), {"rows": len(ids_out),
                                                                           "truncated": truncated}


def _hard_target(label: str, tokenizer: Any, cfg: PRMConfig, reward_ids: Sequence[int], where: str) -> int:
    if cfg.reward_tokens is None:  # the whole vocabulary competes
        return single_token_id(tokenizer, label, f"{where}: label")
    if label not in cfg.reward_tokens:
        raise UserError(f"{where}: label {label!r} is not one of --reward_tokens {' '.join(cfg.reward_tokens)}")
    return cfg.reward_tokens.index(label)


def prm_collate(samples: list[dict], pad_token_id: int, packing: bool = False) -> dict[str, torch.Tensor]:
    """Padded (right) or packed (one row, ``position_ids`` restarting per sample) batches with the step
    targets aligned to the tokens."""
    lengths = [len(s["input_ids"]) for s in samples]
    soft = samples[0]["step_probs"] is not None
    if packing:
        batch = {"input_ids": torch.tensor([t for s in samples for t in s["input_ids"]]).unsqueeze(0),
                 "position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
                 "step_targets": torch.tensor([t for s in samples for t in s["step_targets"]]).unsqueeze(0)}
        if soft:
            batch["step_probs"] = torch.tensor([p for s in samples for p in s["step_probs"]]).unsqueeze(0)
    else:
        width = max(lengths)
        batch = {"input_ids": torch.full((len(samples), width), pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros((len(samples), width), dtype=torch.long),
                 "step_targets": torch.full((len(samples), width), IGNORE, dtype=torch.long)}
        if soft:
            batch["step_probs"] = torch.full((len(samples), width), math.nan)
        for row, (s, n) in enumerate(zip(samples, lengths)):
            batch["input_ids"][row, :n] = torch.tensor(s["input_ids"])
            batch["attention_mask"][row, :n] = 1
            batch["step_targets"][row, :n] = torch.tensor(s["step_targets"])
            if soft:
                batch["step_probs"][row, :n] = torch.tensor(s["step_probs"])
    batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    return batch
