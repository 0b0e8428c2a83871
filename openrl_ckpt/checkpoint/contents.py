"""What a checkpoint holds, as data: the files captured at a step, to be written into its staging folder.

Staging a checkpoint returns a ``CheckpointContents``: a plain list of ``StagedWrite`` items, each
naming its path inside the checkpoint folder and holding what it writes (DeepSpeed's queued state
dicts, a Hugging Face folder, a safetensors file, a small file). Staging blocks training; writing
the list is the part that can run later, in the background under --async_save. Items from several
sources (each engine, an EMA, a test) are simply concatenated. An item may stand for files that other
processes write (Ray PPO's actor and critic groups): its ``write`` returns their ``GroupFiles`` reports,
which the commit checks instead of hashing those files again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class GroupFiles:
    """The files one process group wrote into a staging folder: relative path -> {"size", "crc32"}."""

    group: str
    files: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "files": self.files}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GroupFiles:
        return cls(group=data["group"], files=data["files"])


class StagedWrite(Protocol):
    """One file (or folder) of a checkpoint, captured at the step and written later."""

    @property
    def path(self) -> str:
        """Relative to the checkpoint folder, posix form."""
        ...

    def write(self, folder: Path) -> list[GroupFiles] | None:
        """Write into ``folder`` (the staging folder); an I/O failure raises OSError naming the file.
        Files written by other process groups come back as their reports (None: written here)."""
        ...


@dataclass(frozen=True)
class BytesFile:
    path: str
    data: bytes

    def write(self, folder: Path) -> None:
        target = folder / self.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.data)


@dataclass(frozen=True)
class TensorFile:
    """Tensors as one safetensors file (never pickle): e.g. PPO's EMA weights."""

    path: str
    tensors: dict[str, torch.Tensor]

    def write(self, folder: Path) -> None:
        target = folder / self.path
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors, str(target), metadata={"format": "pt"})


@dataclass
class CheckpointContents:
    writes: list[StagedWrite] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [w.path for w in self.writes]

    def extend(self, writes: list[StagedWrite]) -> None:
        self.writes.extend(writes)

    def write_into(self, folder: Path) -> list[GroupFiles]:
        """Write every item, in order; returns the reports of files other process groups wrote. Each item
        is dropped once written: host copies of a model's state are as large as the model, and the next
        one is serialized while the disk writes this one."""
        reports: list[GroupFiles] = []
        while self.writes:
            reports.extend(self.writes.pop(0).write(folder) or [])
        return reports
