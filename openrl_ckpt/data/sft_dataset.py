"""Tokenized SFT / continued-pretraining examples, stored flat so indexing is O(1) and deterministic."""

from __future__ import annotations

from dataclasses import dataclass, replace

import datasets
import numpy as np
import torch

from openrl_ckpt.data.answer_split import tokenize_with_answer_start, tokenize_with_spans
from openrl_ckpt.data.templates import TemplateConfig, render_conversation, render_example
from openrl_ckpt.errors import UserError

_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class TokenizedStats:
    """What tokenization did to the rows, for the startup log and the all-dropped error."""

    total: int
    kept: int
    dropped_prompt_too_long: int
    dropped_empty_response: int
    truncated: int


class SFTDataset(torch.utils.data.Dataset):
    """Token ids of every kept row in one flat array, with offsets and the first target position.

    ``__getitem__(i)`` -> ``{"input_ids": list[int], "loss_start": int, "index": i}``; tokens at
    positions >= ``loss_start`` are targets (see ``collate``). With ``spans`` (--multiturn: one list of
    [start, stop) token spans per example, every assistant turn) the item also holds ``"loss_spans"``
    and only the tokens inside them are targets.
    """

    def __init__(self, token_ids: np.ndarray, offsets: np.ndarray, loss_starts: np.ndarray,
                 spans: list[list[tuple[int, int]]] | None = None) -> None:
        self._ids = token_ids
        self._offsets = offsets
        self._loss_starts = loss_starts
        self._spans = None
        if spans is not None:
            self._span_offsets = np.zeros(len(spans) + 1, dtype=np.int64)
            np.cumsum([len(s) for s in spans], out=self._span_offsets[1:])
            self._spans = np.asarray([pair for s in spans for pair in s], dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self._loss_starts)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        start, end = self._offsets[index], self._offsets[index + 1]
        item = {"input_ids": self._ids[start:end].tolist(), "loss_start": int(self._loss_starts[index]), "index": index}
        if self._spans is not None:
            a, b = self._span_offsets[index], self._span_offsets[index + 1]
            item["loss_spans"] = [tuple(pair) for pair in self._spans[a:b].tolist()]
        return item


def build_sft_dataset(
    raw: datasets.Dataset,
    tokenizer,
    cfg: TemplateConfig,
    *,
    max_len: int,
    pretrain_mode: bool,
    source: str,
    multiturn: bool = False,
) -> tuple[SFTDataset, TokenizedStats]:
    """Render, tokenize (batched), append EOS, truncate to ``max_len`` and drop unusable rows.

    A row is dropped when its prompt alone fills ``max_len`` tokens or its response is empty; longer
    rows are cut at ``max_len`` (their EOS is lost, and they are counted). In ``pretrain_mode`` the
    rendered input (plus the output, if ``output_key`` is set; ``input_template`` is ignored, as in
    OpenRLHF) is all text and every token after the first is a target. Chat-templated text is
    tokenized without added special tokens, since chat templates write their own BOS. ``multiturn``: the
    rows are conversations and every assistant turn is a response (``build_multiturn``).
    """
    if multiturn:
        return build_multiturn(raw, tokenizer, cfg, max_len=max_len, source=source)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise UserError("the tokenizer has no eos_token; SFT needs one to end each response")
    if not pretrain_mode and cfg.output_key is None and not cfg.apply_chat_template:
        raise UserError(
            "--output_key is required for SFT (or pass --pretrain_mode, or --apply_chat_template with conversations)"
        )
    if pretrain_mode:
        cfg = replace(cfg, input_template=None)
    add_special = not cfg.apply_chat_template

    flat: list[int] = []
    lengths: list[int] = []
    loss_starts: list[int] = []
    too_long = empty = truncated = 0
    for chunk_start in range(0, len(raw), _CHUNK_ROWS):
        batch = raw[chunk_start : chunk_start + _CHUNK_ROWS]
        keys = list(batch)
        n_rows = len(batch[keys[0]]) if keys else 0
        prompts, answers = [], []
        for j in range(n_rows):
            row = {key: batch[key][j] for key in keys}
            prompt, response = render_example(row, cfg, tokenizer, where=f"{source} row {chunk_start + j + 1}")
            if (prompt + response if pretrain_mode else response) == "":
                empty += 1
                continue
            prompts.append(prompt)
            answers.append(response)
        if pretrain_mode:  # all text: no prompt to mask
            split = [(ids, 0) for ids in _token_ids(tokenizer, [p + a for p, a in zip(prompts, answers)], add_special)]
        else:
            split = tokenize_with_answer_start(tokenizer, prompts, answers, add_special)
        for ids, prompt_len in split:
            if not pretrain_mode:
                if prompt_len >= max_len:
                    too_long += 1
                    continue
                if len(ids) <= prompt_len:
                    empty += 1
                    continue
            if not ids or ids[-1] != eos_id:
                ids = [*ids, eos_id]
            if len(ids) > max_len:
                truncated += 1
                ids = ids[:max_len]
            flat.extend(ids)
            lengths.append(len(ids))
            loss_starts.append(1 if pretrain_mode else prompt_len)

    stats = TokenizedStats(
        total=len(raw),
        kept=len(lengths),
        dropped_prompt_too_long=too_long,
        dropped_empty_response=empty,
        truncated=truncated,
    )
    if stats.kept == 0:
        raise UserError(
            f"{source}: all {stats.total} rows were dropped: {too_long} prompts longer than --max_len {max_len}, "
            f"{empty} empty responses"
        )
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return SFTDataset(np.asarray(flat, dtype=np.int64), offsets, np.asarray(loss_starts, dtype=np.int64)), stats


def build_multiturn(raw: datasets.Dataset, tokenizer, cfg: TemplateConfig, *, max_len: int,
                    source: str) -> tuple[SFTDataset, TokenizedStats]:
    """--multiturn: each conversation once, with the tokens of every assistant turn as targets. A row is
    dropped when no assistant turn starts within ``max_len``; longer rows are cut (counted). No EOS is
    appended: the chat template's own end-of-turn token closes every response."""
    texts, char_spans = [], []
    empty = too_long = truncated = 0
    for n, row in enumerate(raw, start=1):
        text, spans = render_conversation(row, cfg, tokenizer, where=f"{source} row {n}")
        if not spans:
            empty += 1
            continue
        texts.append(text)
        char_spans.append(spans)
    flat: list[int] = []
    lengths: list[int] = []
    kept_spans: list[list[tuple[int, int]]] = []
    for ids, spans in tokenize_with_spans(tokenizer, texts, char_spans, add_special_tokens=False):
        if len(ids) > max_len:
            truncated += 1
            ids = ids[:max_len]
        spans = [(start, min(stop, len(ids))) for start, stop in spans if start < len(ids)]
        if not spans:
            too_long += 1
            continue
        flat.extend(ids)
        lengths.append(len(ids))
        kept_spans.append(spans)
    stats = TokenizedStats(total=len(raw), kept=len(lengths), dropped_prompt_too_long=too_long,
                           dropped_empty_response=empty, truncated=truncated)
    if stats.kept == 0:
        raise UserError(f"{source}: all {stats.total} conversations were dropped: {empty} without an assistant turn, "
                        f"{too_long} whose first one starts past --max_len {max_len}")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    starts = np.asarray([s[0][0] for s in kept_spans], dtype=np.int64)
    return SFTDataset(np.asarray(flat, dtype=np.int64), offsets, starts, kept_spans), stats


def _token_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """One batched call; skipping the masks nobody reads saves about a third of the time."""
    if not texts:
        return []
    encoded = tokenizer(
        texts, add_special_tokens=add_special_tokens, return_attention_mask=False, return_token_type_ids=False
    )
    return encoded["input_ids"]
