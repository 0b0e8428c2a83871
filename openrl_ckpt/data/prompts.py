"""Prompts for sampling (PPO rollouts, batch inference): dataset rows rendered with the template and
tokenized, with the prompts that are empty or too long left out. Which rows, and what the caller
says about the ones left out, is the caller's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from openrl_ckpt.data.templates import TemplateConfig, render_prompt


@dataclass(frozen=True)
class TokenizedPrompt:
    row: int  # the dataset row it was rendered from
    text: str
    ids: list[int]


def tokenize_prompts(raw: datasets.Dataset, rows: Sequence[int], template: TemplateConfig, tokenizer: Any,
                     source: str, max_tokens: int, suffix: str = "") -> list[TokenizedPrompt]:
    """The prompts of ``rows`` with 1 to ``max_tokens`` tokens, in row order, each ending in ``suffix``
    (conditional SFT's score prompt). A chat-rendered prompt is tokenized without special tokens: the
    chat template already wrote them."""
    texts = [render_prompt(raw[i], template, tokenizer, where=f"{source} row {i + 1}") + suffix for i in rows]
    ids = tokenizer(texts, add_special_tokens=not template.apply_chat_template,
                    return_attention_mask=False)["input_ids"]
    return [TokenizedPrompt(row=row, text=text, ids=x) for row, text, x in zip(rows, texts, ids)
            if 0 < len(x) <= max_tokens]
