"""Checks that two models read text the same way (distillation teacher, PPO reward models)."""

from __future__ import annotations

from typing import Any


def tokenizer_difference(a: Any, b: Any) -> str | None:
    """None when both tokenizers map every token and special token to the same id; else what differs."""
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        return f"vocabulary sizes {len(va)} and {len(vb)}"
    differing = [t for t, i in va.items() if vb.get(t) != i]
    if differing:
        return f"{len(differing)} tokens map to different ids (e.g. {differing[0]!r})"
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(a, name) != getattr(b, name):
            return f"{name} {getattr(a, name)} vs {getattr(b, name)}"
    return None
