"""DeepSpeed engines in and out of checkpoints: staging their files as data, loading them back.

``stage_engines`` runs each engine's ``save_checkpoint`` with its file writes held back (and copied to
host memory under --async_save), so the checkpoint's contents become a list the manager writes later,
where it gathers a failed write from every rank and names the file. ``load_engines`` loads model,
optimizer, scheduler and RNG, through DeepSpeed's universal format when the world size or ZeRO stage
changed. ``DeepspeedEngines`` bundles both for the loop's ``Checkpointer``.
"""

from __future__ import annotations

import copy
import datetime
import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from openrl_ckpt.checkpoint.comm import TorchDistComm
from openrl_ckpt.checkpoint.contents import StagedWrite
from openrl_ckpt.checkpoint.files import TMP_PREFIX, CheckpointError, start_writeback
from openrl_ckpt.checkpoint.manager import CheckpointManager, Resumed
from openrl_ckpt.checkpoint.state import restore_rng, seed_everything
from openrl_ckpt.checkpoint.universal import convert_to_universal, needs_universal
from openrl_ckpt.strategy.hf import stage_hf_folders, stage_model_folder

if TYPE_CHECKING:
    from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy

log = logging.getLogger("openrl_ckpt")


class QueuedWrite(NamedTuple):
    """One file write DeepSpeed asked its checkpoint engine for, held back."""

    writer: Any  # the engine's own checkpoint engine, which writes DeepSpeed's format
    state: Any
    path: str  # where DeepSpeed wants it (inside the staging folder)


@dataclass(frozen=True)
class DeepSpeedFile:
    """A queued write as a checkpoint item: its path relative to the staging folder."""

    path: str
    writer: Any
    state: Any

    def write(self, folder: Path) -> None:
        target = str(folder / self.path)
        try:
            self.writer.save(self.state, target)
        except RuntimeError as e:  # torch's file writer reports a failed write this way, without its errno
            code = errno.ENOSPC if _no_room(folder) else errno.EIO
            reason = os.strerror(code) if code == errno.ENOSPC else str(e).strip().splitlines()[0][:200]
            raise OSError(code, reason, target) from e
        start_writeback(target)  # on disk while the next file is serialized


def _no_room(folder: Path) -> bool:
    """Whether the file system of ``folder`` is full (what a failed torch write most often means)."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 1 << 20  # under 1 MiB left


def open_checkpoint_manager(ckpt_path: str, max_ckpt_num: int, max_ckpt_mem_gb: float,
                            background: bool = False, timeout: datetime.timedelta | None = None) -> CheckpointManager:
    """A prepared manager over the default process group; ``background``: with a process group of its
    own for background saves (whose collectives wait ``timeout``, as the default group's do)."""
    background_comm = TorchDistComm(private=True, timeout=timeout) if background else None
    manager = CheckpointManager(ckpt_path, TorchDistComm(), max_ckpt_num=max_ckpt_num, max_ckpt_mem_gb=max_ckpt_mem_gb,
                                background_comm=background_comm)
    manager.prepare()
    return manager


def stage_engines(engines: dict[str, Any], staging: Path, host_copy: bool = False) -> list[StagedWrite]:
    """Each engine's ``save_checkpoint`` into ``staging/<name>/`` (collective), its file writes queued
    and returned as items. ``host_copy`` copies the state to host memory first (the only part that
    blocks training under --async_save); without it the items must be written before the next
    optimizer step changes the tensors they hold."""
    queue: list[QueuedWrite] = []
    for name, engine in engines.items():
        # every name of a frozen weight, tied aliases included (an lm_head tied to a frozen embedding)
        frozen = frozenset(n for n, p in engine.module.named_parameters(remove_duplicate=False)
                           if not p.requires_grad)
        real = engine.checkpoint_engine
        engine.checkpoint_engine = _DeferredWrites(real, queue, host_copy, frozen)
        try:
            engine.save_checkpoint(str(staging), tag=name, client_state={}, save_latest=False,
                                   exclude_frozen_parameters=bool(frozen))
        finally:
            engine.checkpoint_engine = real
    if host_copy and torch.cuda.is_available():
        torch.cuda.synchronize()  # the device-to-host copies are complete before training moves on
    return [DeepSpeedFile(os.path.relpath(q.path, staging), q.writer, q.state) for q in queue]


def load_engines(strategy: DeepspeedStrategy, resumed: Resumed, engines: dict[str, Any]) -> None:
    """Load model, optimizer and scheduler of each engine, then this rank's RNG.

    A checkpoint saved on another world size or ZeRO stage is converted to DeepSpeed's universal
    format first (by rank 0, into a temp folder beside it that is removed after loading); the
    committed checkpoint itself is never modified.
    """
    saved = resumed.state
    zero_stage = strategy.cfg.zero_stage
    elastic = saved.world_size != strategy.world_size or saved.zero_stage not in (None, zero_stage)
    universal = None
    if elastic and any(needs_universal(resumed.path / name) for name in engines):
        universal = resumed.path.parent / f"{TMP_PREFIX}universal-{resumed.path.name}"
        err = _convert(strategy, resumed, list(engines), universal) if strategy.is_rank_0 else None
        err = strategy.broadcast_object(err)
        if err:
            raise CheckpointError(err)
    for name, engine in engines.items():
        frozen = any(not p.requires_grad for p in engine.module.parameters())
        engine._config.load_universal_checkpoint = universal is not None
        try:
            path, _ = engine.load_checkpoint(str(universal or resumed.path), tag=name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True, load_module_strict=not frozen)
        finally:
            engine._config.load_universal_checkpoint = False
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {resumed.path}/{name}")
    if universal is not None:
        strategy.barrier()
        if strategy.is_rank_0:
            shutil.rmtree(universal, ignore_errors=True)
    if saved.world_size == strategy.world_size and len(saved.rng) == strategy.world_size:
        restore_rng(saved.rng[strategy.rank])
    else:
        seed_everything(strategy.cfg.seed + resumed.step)


def _convert(strategy: DeepspeedStrategy, resumed: Resumed, names: list[str], universal: Path) -> str | None:
    """Rank 0: the universal form of each engine into ``universal``; returns the error, if any."""
    saved = resumed.state
    log.info("%s was saved on %d rank(s) with ZeRO-%s and this run has %d with ZeRO-%d: converting it to "
             "DeepSpeed's universal checkpoint format in %s", resumed.path, saved.world_size, saved.zero_stage,
             strategy.world_size, strategy.cfg.zero_stage, universal)
    if strategy.cfg.zero_stage == 3:
        log.warning("ZeRO-3 on another world size: DeepSpeed's universal load continues the run but not bit for "
                    "bit (a few 1e-5 in the weights after a few steps on a tiny model); ZeRO-1/2 and ZeRO-0 "
                    "continue exactly up to summation order")
    started = time.perf_counter()
    try:
        for name in names:
            convert_to_universal(resumed.path, name, universal)
    except (OSError, ValueError, RuntimeError, AssertionError) as e:
        return f"cannot convert {resumed.path} to the universal format: {e}"
    log.info("converted %s to the universal format in %.1fs", resumed.path, time.perf_counter() - started)
    return None


class DeepspeedEngines:
    """The trained engines of a run as the ``Checkpointer`` sees them: staged into a checkpoint (engine
    files, Hugging Face folders) and loaded back from one."""

    def __init__(self, strategy: DeepspeedStrategy, engines: dict[str, Any], tokenizer: Any) -> None:
        self.strategy = strategy
        self.engines = engines
        self.tokenizer = tokenizer  # saved into each checkpoint's hf/<engine>/, so an export needs nothing else

    def open_manager(self, ckpt_path: str, max_ckpt_num: int, max_ckpt_mem_gb: float,
                     background: bool) -> CheckpointManager:
        manager = open_checkpoint_manager(ckpt_path, max_ckpt_num, max_ckpt_mem_gb, background,
                                          timeout=self.strategy.collective_timeout)
        if not manager.shared_storage and manager.is_leader:
            # Node-local storage: DeepSpeed writes the model states (which every rank reads back under
            # ZeRO-0/1/2) on data-parallel rank 0 only, so the first rank of each storage writes them too,
            # as DeepSpeed's own use_node_local_storage does for local rank 0.
            for engine in self.engines.values():
                engine.save_non_zero_checkpoint = True
        return manager

    def stage(self, staging: Path, *, host_copy: bool, engine_files: bool, hf_weights: bool) -> list[StagedWrite]:
        items = stage_engines(self.engines, staging, host_copy) if engine_files else []
        return items + stage_hf_folders(self.strategy, self.engines, self.tokenizer, hf_weights)

    def stage_export(self) -> StagedWrite | None:
        """The first engine (the model; PPO's actor) as --save_path would hold it, gathered for rank 0."""
        return stage_model_folder(self.strategy, next(iter(self.engines.values())), self.tokenizer)

    def load(self, resumed: Resumed) -> None:
        load_engines(self.strategy, resumed, self.engines)


class _DeferredWrites:
    """Stands in for an engine's checkpoint engine during ``save_checkpoint``: each file write is
    queued (its state copied to host memory first when ``host_copy``), everything else goes to the
    engine's own checkpoint engine, which later writes the queued files in DeepSpeed's format."""

    def __init__(self, real: Any, queue: list[QueuedWrite], host_copy: bool,
                 frozen: frozenset[str] = frozenset()) -> None:
        self._real = real
        self._queue = queue
        self._host_copy = host_copy
        self._frozen = frozen

    def save(self, state_dict: Any, path: str) -> None:
        module = state_dict.get("module") if isinstance(state_dict, dict) else None
        if self._frozen and isinstance(module, dict):
            # DeepSpeed's exclude_frozen_parameters finds frozen weights with named_parameters(), which
            # skips tied aliases: a tied lm_head (the whole embedding) would stay in a LoRA checkpoint.
            state_dict = {**state_dict, "module": {k: v for k, v in module.items() if k not in self._frozen}}
        self._queue.append(QueuedWrite(self._real, _to_host(state_dict) if self._host_copy else state_dict, path))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _to_host(obj: Any, memo: dict[tuple[Any, ...], torch.Tensor] | None = None) -> Any:
    """A copy of a (nested) state dict whose tensors are new CPU tensors, so training can go on
    changing the originals while the copy is written. Views of the same memory (tied weights) share
    one copy, so the file holds them once, as a direct save would."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.dtype,
               obj.device)
        if key not in memo:
            memo[key] = obj.detach().to("cpu", copy=True)
        return memo[key]
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping's type (OrderedDict, defaultdict)
        for k, v in obj.items():
            out[k] = _to_host(v, memo)
        return out
    if isinstance(obj, list):
        return [_to_host(v, memo) for v in obj]
    if isinstance(obj, tuple):
        items = [_to_host(v, memo) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return copy.deepcopy(obj)
