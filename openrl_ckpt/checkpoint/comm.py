"""The few collectives the checkpoint manager needs, behind a tiny interface.

The manager runs unchanged in unit tests (``SingleProcessComm``) and under DeepSpeed
(``TorchDistComm``, which uses the already initialised default process group).
"""

from __future__ import annotations

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
    """Collectives over torch.distributed's default group (gloo on CPU, nccl on GPU)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    def barrier(self) -> None:
        self._dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out
