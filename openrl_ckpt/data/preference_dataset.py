"""Tokenized preference data: pairs (reward model, DPO, paired KTO) and labelled rows (KTO).

A pair is (prompt, chosen, rejected, margin). Without ``--prompt_key`` a plain-text pair is two whole
texts (empty prompt), and a chat pair is two conversations whose turns before the last assistant
turn form the prompt; they must agree on it. Each sequence is ``prompt + answer + EOS``; one longer
than ``--max_len`` is cut to ``max_len`` with EOS kept as its last token, because a reward head reads
the last token. A row whose prompt leaves no room for an answer is dropped (and counted).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import datasets
import numpy as np
import torch

from openrl_ckpt.data.answer_split import tokenize_with_answer_start
from openrl_ckpt.data.templates import TemplateConfig, render_example, row_text
from openrl_ckpt.errors import UserError

log = logging.getLogger("openrl_ckpt")

_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class PreferenceConfig:
    """``--prompt_key --chosen_key --rejected_key --input_template --apply_chat_template``."""

    prompt_key: str | None
    chosen_key: str
    rejected_key: str
    input_template: str | None
    apply_chat_template: bool


@dataclass(frozen=True)
class PreferenceStats:
    total: int
    kept: int
    dropped_prompt_too_long: int
    dropped_identical: int
    truncated: int


class _Ragged:
    """Many token sequences in one flat int64 array (O(1) indexing, no per-row Python objects)."""

    def __init__(self, seqs: list[list[int]]) -> None:
        self.offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in seqs], out=self.offsets[1:])
        self.ids = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(self.offsets[-1]))

    def __getitem__(self, i: int) -> list[int]:
        return self.ids[self.offsets[i] : self.offsets[i + 1]].tolist()


class PreferenceDataset(torch.utils.data.Dataset):
    """``__getitem__(i)`` -> ``{"chosen_ids", "rejected_ids", "chosen_start", "rejected_start", "margin", "index"}``.

    Both sequences render the same prompt; each one's answer (and EOS) starts at its own ``*_start``
    token, since the token that joins prompt and answer can differ between the two answers.
    """

    def __init__(self, chosen: list[list[int]], rejected: list[list[int]], starts: list[tuple[int, int]],
                 margins: list[float]) -> None:
        self._chosen, self._rejected = _Ragged(chosen), _Ragged(rejected)
        self._starts = np.asarray(starts, dtype=np.int64).reshape(-1, 2)
        self._margins = np.asarray(margins, dtype=np.float64)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} pairs")
        return {"chosen_ids": self._chosen[i], "rejected_ids": self._rejected[i],
                "chosen_start": int(self._starts[i, 0]), "rejected_start": int(self._starts[i, 1]),
                "margin": float(self._margins[i]), "index": i}


class LabelledDataset(torch.utils.data.Dataset):
    """KTO rows: ``{"prompt_ids", "answer_ids", "label", "index"}``, answer ending with EOS.

    Prompt and answer are kept apart so a batch can pair a prompt with another row's answer
    (KTO's KL reference point).
    """

    def __init__(self, prompts: list[list[int]], answers: list[list[int]], labels: list[bool]) -> None:
        self._prompts, self._answers = _Ragged(prompts), _Ragged(answers)
        self._labels = np.asarray(labels, dtype=bool)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} rows")
        return {"prompt_ids": self._prompts[i], "answer_ids": self._answers[i], "label": bool(self._labels[i]),
                "index": i}

    @property
    def num_desirable(self) -> int:
        return int(self._labels.sum())


def check_columns(raw: datasets.Dataset, keys: dict[str, str | None], source: str) -> None:
    """Name a missing column up front (``{flag: key}``) instead of failing at row 1."""
    for flag, key in keys.items():
        if key is not None and key not in raw.column_names:
            raise UserError(f"{source}: no column '{key}' ({flag}); columns: {', '.join(raw.column_names)}")


def render_pair(row: Mapping, cfg: PreferenceConfig, tokenizer, *, where: str) -> tuple[str, str, str, float]:
    """(prompt, chosen answer, rejected answer, margin) text of one row."""
    prompt, chosen = _render_answer(row, cfg, cfg.chosen_key, "--chosen_key", tokenizer, where)
    rejected_prompt, rejected = _render_answer(row, cfg, cfg.rejected_key, "--rejected_key", tokenizer, where)
    if rejected_prompt != prompt:
        raise UserError(f"{where}: the '{cfg.chosen_key}' and '{cfg.rejected_key}' conversations differ before "
                        "their last assistant turn; put the shared prompt under --prompt_key")
    return prompt, chosen, rejected, _margin(row, where)


def _render_answer(row: Mapping, cfg: PreferenceConfig, key: str, flag: str, tokenizer, where: str) -> tuple[str, str]:
    if cfg.prompt_key is None and not cfg.apply_chat_template:
        return "", row_text(row, key, flag, where)
    if cfg.prompt_key is None:  # a whole conversation: the last assistant turn is the answer
        tc = TemplateConfig(input_key=key, output_key=None, input_template=None, apply_chat_template=True,
                            input_flag=flag, output_flag="--prompt_key")
    else:
        tc = TemplateConfig(input_key=cfg.prompt_key, output_key=key, input_template=cfg.input_template,
                            apply_chat_template=cfg.apply_chat_template, input_flag="--prompt_key", output_flag=flag)
    return render_example(row, tc, tokenizer, where=where)


def _margin(row: Mapping, where: str) -> float:
    value = row.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: 'margin' must be a finite number, got {value!r}")
    return float(value)


def label_value(value: object, key: str, where: str) -> bool:
    """A KTO label: a boolean, or the integers 0 and 1."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise UserError(f"{where}: '{key}' (--label_key) must be true/false or 0/1, got {value!r}")


class _Tokenizer:
    """Batched tokenization with the EOS and ``max_len`` rules of this module."""

    def __init__(self, tokenizer, max_len: int, add_special_tokens: bool) -> None:
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no eos_token; preference training needs one to end each answer")
        self.tok, self.max_len, self.add_special = tokenizer, max_len, add_special_tokens
        self.eos = tokenizer.eos_token_id
        self.truncated = 0

    def split(self, prompts: list[str], answers: list[str]) -> list[tuple[list[int], int]]:
        """(ids of prompt + answer, first answer token) of each pair."""
        return tokenize_with_answer_start(self.tok, prompts, answers, self.add_special)

    def finish(self, ids: list[int]) -> list[int]:
        """Append EOS; cut to max_len keeping EOS last."""
        if not ids or ids[-1] != self.eos:
            ids = [*ids, self.eos]
        if len(ids) > self.max_len:
            self.truncated += 1
            ids = [*ids[: self.max_len - 1], self.eos]
        return ids

    def fits(self, prompt_len: int) -> bool:
        return prompt_len < self.max_len - 1  # room for at least one answer token and EOS


def _rows(raw: datasets.Dataset):
    """(row number from 1, row) in chunks, so tokenization is batched."""
    for start in range(0, len(raw), _CHUNK_ROWS):
        batch = raw[start : start + _CHUNK_ROWS]
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        yield [(start + j + 1, {k: batch[k][j] for k in keys}) for j in range(n)]


def _warn_identical(count: int, source: str) -> None:
    if count:
        log.warning("%s: %d pairs have the same chosen and rejected answer; they carry no preference and are "
                    "dropped", source, count)


def build_preference_dataset(raw: datasets.Dataset, tokenizer, cfg: PreferenceConfig, *, max_len: int,
                             source: str) -> tuple[PreferenceDataset, PreferenceStats]:
    check_columns(raw, {"--prompt_key": cfg.prompt_key, "--chosen_key": cfg.chosen_key,
                        "--rejected_key": cfg.rejected_key}, source)
    tk = _Tokenizer(tokenizer, max_len, add_special_tokens=not cfg.apply_chat_template)
    chosen_out: list[list[int]] = []
    rejected_out: list[list[int]] = []
    starts: list[tuple[int, int]] = []
    margins: list[float] = []
    too_long = identical = 0
    for chunk in _rows(raw):
        rendered = []
        for n, row in chunk:
            prompt, chosen, rejected, margin = render_pair(row, cfg, tokenizer, where=f"{source} row {n}")
            if chosen == rejected:
                identical += 1
                continue
            rendered.append((prompt, chosen, rejected, margin))
        prompts = [r[0] for r in rendered]
        chosen = tk.split(prompts, [r[1] for r in rendered])
        rejected = tk.split(prompts, [r[2] for r in rendered])
        for (_, _, _, margin), (c, c_start), (r, r_start) in zip(rendered, chosen, rejected):
            if not tk.fits(max(c_start, r_start)):
                too_long += 1
                continue
            chosen_out.append(tk.finish(c))
            rejected_out.append(tk.finish(r))
            starts.append((c_start, r_start))
            margins.append(margin)
    stats = PreferenceStats(total=len(raw), kept=len(starts), dropped_prompt_too_long=too_long,
                            dropped_identical=identical, truncated=tk.truncated)
    _warn_identical(identical, source)
    if stats.kept == 0:
        raise UserError(f"{source}: all {stats.total} pairs were dropped: {too_long} prompts too long for --max_len "
                        f"{max_len}, {identical} with chosen identical to rejected")
    return PreferenceDataset(chosen_out, rejected_out, starts, margins), stats


@dataclass(frozen=True)
class LabelledConfig:
    """Unpaired KTO data: ``--input_key --output_key --label_key`` (+ template flags)."""

    input_key: str
    output_key: str | None
    label_key: str
    input_template: str | None
    apply_chat_template: bool


def build_kto_rows(raw: datasets.Dataset, tokenizer, pairs: PreferenceConfig, rows: LabelledConfig, *,
                   unpaired: bool, max_len: int, source: str) -> tuple[LabelledDataset, PreferenceStats]:
    """KTO's rows: unpaired (``rows``) when asked for or when the data has no ``--chosen_key`` column, else
    each pair split into a desirable and an undesirable row."""
    if unpaired or pairs.chosen_key not in raw.column_names:
        return build_labelled_dataset(raw, tokenizer, rows, max_len=max_len, source=source)
    return split_pairs(raw, tokenizer, pairs, max_len=max_len, source=source)


def build_labelled_dataset(raw: datasets.Dataset, tokenizer, cfg: LabelledConfig, *, max_len: int,
                           source: str) -> tuple[LabelledDataset, PreferenceStats]:
    """Unpaired KTO rows (prompt, answer, desirable?)."""
    if cfg.output_key is None:
        raise UserError(f"{source}: unpaired KTO rows need --output_key (the answer) and --label_key; columns: "
                        f"{', '.join(raw.column_names)}")
    check_columns(raw, {"--input_key": cfg.input_key, "--output_key": cfg.output_key,
                        "--label_key": cfg.label_key}, source)
    tc = TemplateConfig(input_key=cfg.input_key, output_key=cfg.output_key, input_template=cfg.input_template,
                        apply_chat_template=cfg.apply_chat_template)
    rows = []
    for chunk in _rows(raw):
        for n, row in chunk:
            where = f"{source} row {n}"
            prompt, answer = render_example(row, tc, tokenizer, where=where)
            rows.append((prompt, answer, label_value(row.get(cfg.label_key), cfg.label_key, where)))
    return _labelled(rows, tokenizer, max_len, cfg.apply_chat_template, source, identical=0)


def split_pairs(raw: datasets.Dataset, tokenizer, cfg: PreferenceConfig, *, max_len: int,
                source: str) -> tuple[LabelledDataset, PreferenceStats]:
    """Paired data as KTO rows: each chosen answer desirable, each rejected answer undesirable."""
    check_columns(raw, {"--prompt_key": cfg.prompt_key, "--chosen_key": cfg.chosen_key,
                        "--rejected_key": cfg.rejected_key}, source)
    rows, identical = [], 0
    for chunk in _rows(raw):
        for n, row in chunk:
            prompt, chosen, rejected, _ = render_pair(row, cfg, tokenizer, where=f"{source} row {n}")
            if chosen == rejected:
                identical += 1
                continue
            rows += [(prompt, chosen, True), (prompt, rejected, False)]
    _warn_identical(identical, source)
    return _labelled(rows, tokenizer, max_len, cfg.apply_chat_template, source, identical)


def _labelled(rows: list[tuple[str, str, bool]], tokenizer, max_len: int, chat: bool, source: str,
              identical: int) -> tuple[LabelledDataset, PreferenceStats]:
    tk = _Tokenizer(tokenizer, max_len, add_special_tokens=not chat)
    prompts_out: list[list[int]] = []
    answers_out: list[list[int]] = []
    labels: list[bool] = []
    too_long = 0
    for start in range(0, len(rows), _CHUNK_ROWS):
        chunk = rows[start : start + _CHUNK_ROWS]
        split = tk.split([r[0] for r in chunk], [r[1] for r in chunk])
        for (_, _, label), (full, start) in zip(chunk, split):
            if not tk.fits(start):
                too_long += 1
                continue
            full = tk.finish(full)
            prompts_out.append(full[:start])
            answers_out.append(full[start:])
            labels.append(label)
    stats = PreferenceStats(total=len(rows), kept=len(labels), dropped_prompt_too_long=too_long,
                            dropped_identical=identical, truncated=tk.truncated)
    if stats.kept == 0:
        raise UserError(f"{source}: all {stats.total} rows were dropped: {too_long} prompts too long for --max_len "
                        f"{max_len}")
    return LabelledDataset(prompts_out, answers_out, labels), stats

