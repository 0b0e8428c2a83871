"""The few collectives the checkpoint manager needs, behind a tiny interface.

The manager runs unchanged in unit tests (``SingleProcessComm``) and under DeepSpeed
(``TorchDistComm``, which uses the already initialised default process group).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Protocol


class Comm(Protocol):
    rank: int
    world_size: int
    local_rank: int

    def barrier(self) -> None: ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...


class SingleProcessComm:
    rank = 0
    world_size = 1
    local_rank = 0

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]


class TorchDistComm:
    """Collectives over a torch.distributed group: the default one (gloo on CPU, nccl on GPU), or a
    group of its own (``private=True``: a new gloo group over all ranks, its collectives waiting
    ``timeout``), which a background thread can use while the training thread runs collectives on the
    default group."""

    def __init__(self, private: bool = False, timeout: datetime.timedelta | None = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        # new_group is itself collective: every rank creates its private groups in the same order
        self._group = dist.new_group(backend="gloo", timeout=timeout) if private else None
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    def barrier(self) -> None:
        self._dist.barrier(group=self._group)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=src, group=self._group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self._group)
        return out
