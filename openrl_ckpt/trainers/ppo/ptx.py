"""The pretraining data of --ptx_coef: one micro batch per actor micro step on every rank, drawn
through a resumable sampler whose global position is part of the PPO state."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.data import Dataset

from openrl_ckpt.data.collate import pad_collate
from openrl_ckpt.data.sampler import ResumableDistributedSampler
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy


class PtxFeed:
    def __init__(self, strategy: DeepspeedStrategy, dataset: Dataset, micro_batch_size: int, pad_token_id: int,
                 seed: int) -> None:
        self.sampler = ResumableDistributedSampler(len(dataset), micro_batch_size * strategy.world_size,  # type: ignore
                                                   strategy.world_size, strategy.rank, seed=seed)
        self.loader = strategy.setup_dataloader(dataset, self.sampler, micro_batch_size,
                                                partial(pad_collate, pad_token_id=pad_token_id))
        self.consumed = 0  # global samples drawn so far (all ranks, all epochs of the data)
        self._it: Iterator[dict[str, torch.Tensor]] | None = None

    def next(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self.sampler.set_consumed(self.consumed)
            self._it = iter(self.loader)
        batch = next(self._it, None)
        if batch is None:  # the end of an epoch of the data: the next one starts
            self.sampler.set_consumed(self.consumed)
            self._it = iter(self.loader)
            batch = next(self._it)
        self.consumed += self.sampler.global_batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = int(state["consumed"])
        self._it = None
