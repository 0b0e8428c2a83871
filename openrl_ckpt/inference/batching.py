"""How batch inference cuts its work into micro batches and shares them over ranks.

The work is a list of items in output order (generation: prompt ``i // best_of_n``, sample
``i % best_of_n``; scoring: row ``i``). Micro batch ``b`` holds items ``[b*M, (b+1)*M)`` and belongs
to rank ``b % world_size``; it is sampled with its own seed ``batch_seed(seed, iteration, b)``. So
the items, their batches and their seeds do not depend on the number of ranks: every item is done
exactly once, and the merged file is the same on 1 rank or 8. Ranks with one batch fewer than
others run a dummy batch where every rank must make the same number of forward calls (ZeRO-3);
its results are dropped, never written.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any

from openrl_ckpt.errors import UserError

# Exit status of batch_inference when --iter starts past the end of the data: nothing is left to
# generate, and the loop scripts stop cleanly on it (argparse and other user errors exit 2).
EXIT_DATA_EXHAUSTED = 3


def select_rows(num_rows: int, iteration: int | None, rollout_batch_size: int | None) -> range:
    """Rows ``[iter*R, (iter+1)*R)`` of the dataset (the last slice may be shorter), or all rows
    without --iter. Past the end: a UserError with exit status EXIT_DATA_EXHAUSTED."""
    if iteration is None:
        return range(num_rows)
    if rollout_batch_size is None or rollout_batch_size < 1:
        raise UserError("--iter needs --rollout_batch_size (a positive number of prompts per iteration)")
    if iteration < 0:
        raise UserError(f"--iter must be 0 or more, got {iteration}")
    start = iteration * rollout_batch_size
    if start >= num_rows:
        raise UserError(f"--iter {iteration} is past the end of the data: it starts at row {start} "
                        f"(--iter x --rollout_batch_size {rollout_batch_size}) and the dataset has {num_rows} rows; "
                        f"nothing left to generate (exit status {EXIT_DATA_EXHAUSTED})",
                        exit_code=EXIT_DATA_EXHAUSTED)
    return range(start, min(start + rollout_batch_size, num_rows))


def num_batches(num_items: int, micro_batch_size: int) -> int:
    return math.ceil(num_items / micro_batch_size)


def batch_items(batch: int, num_items: int, micro_batch_size: int) -> range:
    return range(batch * micro_batch_size, min((batch + 1) * micro_batch_size, num_items))


def rank_batches(n_batches: int, world_size: int, rank: int) -> list[int]:
    """The micro batches this rank runs, in order."""
    return list(range(rank, n_batches, world_size))


def calls_per_rank(n_batches: int, world_size: int) -> int:
    """Forward calls every rank makes when calls must match across ranks (its batches + dummies)."""
    return math.ceil(n_batches / world_size)


def batch_seed(seed: int, iteration: int, batch: int) -> int:
    """A sampling seed per micro batch: a hash, so neighbouring batches and iterations get unrelated
    streams, and the value does not depend on the number of ranks."""
    digest = hashlib.sha256(f"openrl_ckpt:{seed}:{iteration}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def merge_ordered(parts: Iterable[list[tuple[int, Any]]], num_items: int) -> list[Any]:
    """Join every rank's ``(item index, record)`` pairs into one list in item order; every item
    must come exactly once (a missing or repeated item is a bug, not a user error)."""
    out: list[Any] = [None] * num_items
    seen = [False] * num_items
    for part in parts:
        for index, record in part:
            if not 0 <= index < num_items or seen[index]:
                raise RuntimeError(f"batch inference produced item {index} twice or out of range ({num_items} items)")
            seen[index] = True
            out[index] = record
    missing = seen.count(False)
    if missing:
        raise RuntimeError(f"batch inference lost {missing} of {num_items} items")
    return out
