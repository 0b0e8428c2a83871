"""A distributed sampler that resumes from a *global* consumed-sample count in O(1).

The global order of epoch ``e`` is a permutation of the dataset seeded by ``seed + e``,
extended by wrap-around to a whole number of global batches (so a dataset that is not a
multiple of the global batch, or smaller than one, still trains and every step has the same
size). Position ``p`` of that order belongs to rank ``p % world_size``, so global batch ``j``
is positions ``[j*B, (j+1)*B)`` whatever the world size: a run saved on 2 ranks resumes on 1
(or 4) at exactly the same sample, and skipping ahead is arithmetic, not iteration.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    """Optimizer steps in one epoch: the last partial global batch is filled by wrap-around."""
    return math.ceil(num_samples / global_batch_size)


class ResumableDistributedSampler(Sampler[int]):
    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        world_size: int,
        rank: int,
        *,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by world size {world_size}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = steps_per_epoch(num_samples, global_batch_size)
        self.epoch_positions = self.steps_per_epoch * global_batch_size
        self.epoch = 0
        self._start = 0  # first global position of this epoch still to be drawn

    def set_consumed(self, consumed_samples: int) -> None:
        """Point at the sample after ``consumed_samples`` global samples (whole global batches)."""
        if consumed_samples % self.global_batch_size:
            raise ValueError(f"consumed samples {consumed_samples} is not a multiple of the global batch "
                             f"{self.global_batch_size}")
        self.epoch, self._start = divmod(consumed_samples, self.epoch_positions)

    def __iter__(self) -> Iterator[int]:
        positions = range(self._start + self.rank, self.epoch_positions, self.world_size)
        if not self.shuffle:
            yield from (p % self.num_samples for p in positions)
            return
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        yield from (order[p % self.num_samples] for p in positions)

    def __len__(self) -> int:
        return len(range(self._start + self.rank, self.epoch_positions, self.world_size))


class EvalSampler(Sampler[int]):
    """Every index once, sharded over ranks; padded by wrap-around so all ranks run the same
    number of batches (ZeRO-3 forwards are collective). Padding positions yield ``-1 - index``
    so the caller can give them zero weight."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int) -> None:
        self.num_samples = num_samples
        chunk = batch_size * world_size
        self.total = math.ceil(num_samples / chunk) * chunk
        self.world_size = world_size
        self.rank = rank

    def __iter__(self) -> Iterator[int]:
        for p in range(self.rank, self.total, self.world_size):
            yield p if p < self.num_samples else -1 - (p % self.num_samples)

    def __len__(self) -> int:
        return len(range(self.rank, self.total, self.world_size))
