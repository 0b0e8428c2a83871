"""Token id lists to one padded batch: ids and attention mask, on the CPU (callers move them to their device).

Left padding ends every row at its last token, where generation continues; right padding starts every
row at column 0.
"""

from __future__ import annotations

import torch


def left_pad(seqs: list[list[int]], pad_token_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``, each ``[len(seqs), width]`` (default width: the longest sequence), padding on the left."""
    return _pad(seqs, pad_token_id, width, left=True)


def right_pad(seqs: list[list[int]], pad_token_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``, each ``[len(seqs), width]`` (default width: the longest sequence), padding on the right."""
    return _pad(seqs, pad_token_id, width, left=False)


def _pad(seqs: list[list[int]], pad_token_id: int, width: int | None, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        columns = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, columns] = torch.tensor(s, dtype=torch.long)
        mask[row, columns] = 1
    return ids, mask
