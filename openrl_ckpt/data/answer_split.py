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


def tokenize_with_spans(tokenizer: Any, texts: Sequence[str], char_spans: Sequence[Sequence[tuple[int, int]]],
                        add_special_tokens: bool) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """For each text, its token ids and, per character span, the token span [start, stop) of the tokens
    holding any of its characters (--multiturn: every assistant turn); a span no token holds is dropped."""
    if not texts:
        return []
    kwargs = {"add_special_tokens": add_special_tokens, "return_attention_mask": False,
              "return_token_type_ids": False}
    out = []
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(list(texts), return_offsets_mapping=True, **kwargs)
        for ids, offsets, spans in zip(encoded["input_ids"], encoded["offset_mapping"], char_spans):
            token_spans = []
            for lo, hi in spans:
                inside = [t for t, (s, e) in enumerate(offsets) if e > s and e > lo and s < hi]
                if inside:
                    token_spans.append((inside[0], inside[-1] + 1))
            out.append((ids, token_spans))
        return out
    for text, spans in zip(texts, char_spans):
        ids = tokenizer(text, **kwargs)["input_ids"]
        token_spans = []
        for lo, hi in spans:
            before, through = (tokenizer(text[:cut], **kwargs)["input_ids"] for cut in (lo, hi))
            start = min(common_prefix_length(ids, before), len(before))
            stop = max(min(common_prefix_length(ids, through), len(through)), start)
            if stop > start:
                token_spans.append((start, stop))
        out.append((ids, token_spans))
    return out


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
