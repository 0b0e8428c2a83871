"""Where the answer starts in ``tokenize(prompt + answer)``: the exact loss mask of every job.

Counting ``len(tokenize(prompt))`` is wrong whenever the tokenizer merges characters across the
join: a template ending in a space (``'Assistant: '``) gives byte-level BPE and SentencePiece one
token `` Paris`` for the space and the answer's first word, so that first answer token was counted
as prompt and never trained, and elsewhere the split fell mid-word. Here a token belongs to the
answer when any of its characters does: with a fast tokenizer from its character offsets, with a
slow one (no offsets) from the common prefix of the two tokenizations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def first_answer_token(offsets: Sequence[tuple[int, int]], prompt_chars: int) -> int:
    """The index of the first token that ends past ``prompt_chars`` (i.e. holds an answer character).

    Special tokens the tokenizer adds have the empty span (0, 0) and so never start the answer;
    with no answer token at all, the sequence's length.
    """
    for index, (_, end) in enumerate(offsets):
        if end > prompt_chars:
            return index
    return len(offsets)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def tokenize_with_answer_start(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                               add_special_tokens: bool) -> list[tuple[list[int], int]]:
    """For each pair, (token ids of ``prompt + answer``, index of its first answer token); one batched call."""
    if not prompts:
        return []
    fulls = [prompt + answer for prompt, answer in zip(prompts, answers)]
    kwargs = {"add_special_tokens": add_special_tokens, "return_attention_mask": False,
              "return_token_type_ids": False}
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(fulls, return_offsets_mapping=True, **kwargs)
        return [(ids, first_answer_token(offsets, len(prompt)))
                for ids, offsets, prompt in zip(encoded["input_ids"], encoded["offset_mapping"], prompts)]
    full_ids = tokenizer(fulls, **kwargs)["input_ids"]
    prompt_ids = tokenizer(list(prompts), **kwargs)["input_ids"]
    return [(ids, min(common_prefix_length(ids, p), len(p))) for ids, p in zip(full_ids, prompt_ids)]
