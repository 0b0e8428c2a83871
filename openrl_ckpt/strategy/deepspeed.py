"""DeepspeedStrategy: the one place that talks to DeepSpeed and torch.distributed."""

from __future__ import annotations

import copy
import errno
import logging
import math
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from openrl_ckpt.checkpoint.comm import TorchDistComm
from openrl_ckpt.checkpoint.inspect import HF_DIR
from openrl_ckpt.checkpoint.manager import (TMP_PREFIX, CheckpointError, CheckpointManager, Resumed, Stage,
                                             start_writeback)
from openrl_ckpt.checkpoint.state import restore_rng, seed_everything
from openrl_ckpt.checkpoint.universal import convert_to_universal, needs_universal
from openrl_ckpt.errors import UserError

log = logging.getLogger("openrl_ckpt")


@dataclass(frozen=True)
class StrategyConfig:
    seed: int = 42
    zero_stage: int = 2
    bf16: bool = False
    micro_train_batch_size: int = 1
    train_batch_size: int = 8
    max_norm: float = 1.0
    adam_offload: bool = False
    grad_accum_dtype: str = "fp32"  # with bf16: what gradients are accumulated and reduced in


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    lr_scheduler: str = "cosine_with_min_lr"
    lr_warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1


class FrozenModel:
    """Forward passes without gradients; ``move``: parked on the CPU, on the device only while called."""

    def __init__(self, module: Any, device: torch.device, move: bool) -> None:
        self.module = module
        self.device = device
        self.move = move

    @torch.no_grad()
    def __call__(self, **inputs: Any) -> Any:
        if not self.move:
            return self.module(**inputs)
        self.module.to(self.device)
        try:
            return self.module(**inputs)
        finally:
            self.module.to("cpu")


def _unlink_shm_workspace(rank: int) -> None:
    """Remove this rank's name for DeepSpeed's CPU all-reduce workspace once every rank has mapped it.

    On CPU, DeepSpeed creates a 69 MB /dev/shm file per rank and never removes it, so each run would
    leak them into RAM-backed storage. The mappings outlive the name, so unlinking right after
    start-up frees the memory when the processes exit, even after kill -9.
    """
    name = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    if not name.exists():
        return
    dist.barrier()  # every rank has opened every other rank's workspace by now
    name.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeepspeedStrategy:
    def __init__(self, cfg: StrategyConfig) -> None:
        if cfg.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"--zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
        self.cfg = cfg
        self.world_size = 1
        self.rank = 0
        self.grad_accum = 1
        self._grad_norm: float | None = None  # measured here where DeepSpeed does not report one
        self._hf_ds_config: Any = None  # kept alive: transformers reads it during from_pretrained

    # ------------------------------------------------------------------ set-up
    def setup_distributed(self) -> None:
        """Join the process group (a single process gets one of its own) and check batch sizes."""
        import deepspeed

        if "RANK" not in os.environ:  # `python -m ...`: a world of one, no launcher needed
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False)
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        seed_everything(self.cfg.seed)
        self.grad_accum = self.accumulation_steps(self.world_size)
        _unlink_shm_workspace(self.rank)

    def accumulation_steps(self, world_size: int) -> int:
        micro, glob = self.cfg.micro_train_batch_size, self.cfg.train_batch_size
        if micro < 1 or glob < 1 or glob % (micro * world_size):
            raise UserError(f"--train_batch_size {glob} must be a positive multiple of --micro_train_batch_size "
                            f"{micro} x world size {world_size} = {micro * world_size}")
        return glob // (micro * world_size)

    @property
    def is_rank_0(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def ds_config(self, train: bool = True) -> dict[str, Any]:
        c = self.cfg
        zero: dict[str, Any] = {"stage": c.zero_stage, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8,
                                "stage3_param_persistence_threshold": 1e4, "stage3_prefetch_bucket_size": 5e7,
                                "stage3_gather_16bit_weights_on_model_save": True}
        if c.adam_offload and train:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": c.micro_train_batch_size,
            "train_batch_size": c.train_batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": c.max_norm,
            "zero_optimization": zero,
            "bf16": {"enabled": c.bf16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
            "checkpoint": {"tag_validation": "Ignore"},
        }
        if c.bf16:
            config["data_types"] = {"grad_accum_dtype": c.grad_accum_dtype}
        return config

    def before_model_load(self) -> None:
        """Under ZeRO-3, let transformers partition weights while loading (no full copy per rank)."""
        if self.cfg.zero_stage == 3 and self._hf_ds_config is None:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config())

    # ------------------------------------------------------------------ engines
    def prepare(self, model: torch.nn.Module, optim: OptimConfig, total_steps: int) -> Any:
        """Wrap a trainable model with its AdamW and LR schedule in a DeepSpeed engine."""
        import deepspeed
        from transformers import get_scheduler

        groups = _param_groups(model, optim.weight_decay)
        if self.cfg.adam_offload:
            optimizer: torch.optim.Optimizer = _cpu_adam(groups, optim)
        else:
            # fused: one in-place kernel per tensor; the per-tensor loop would allocate temporaries the size
            # of the whole flat ZeRO partition (~0.5 GB per rank at 135M parameters) at every step
            optimizer = torch.optim.AdamW(groups, lr=optim.learning_rate, betas=optim.betas, fused=True)
        log.info("optimizer: %s, ZeRO stage %d, %s%s%s", type(optimizer).__name__, self.cfg.zero_stage,
                 "bf16" if self.cfg.bf16 else "fp32",
                 ", gradient checkpointing" if getattr(model, "is_gradient_checkpointing", False) else "",
                 ", optimizer states offloaded to the CPU" if self.cfg.adam_offload else "")
        kwargs = {"min_lr": optim.learning_rate * optim.min_lr_ratio} if optim.lr_scheduler == "cosine_with_min_lr" else {}
        try:
            scheduler = get_scheduler(optim.lr_scheduler, optimizer,
                                      num_warmup_steps=math.ceil(total_steps * optim.lr_warmup_ratio),
                                      num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)
        except ValueError as e:
            raise UserError(f"--lr_scheduler {optim.lr_scheduler}: {e}") from None
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                          config=self.ds_config(train=True))
        if self.cfg.zero_stage == 0 and self.world_size == 1:
            # one rank has nothing to reduce, and DeepSpeed's fallback all-reduce would flatten a copy
            # of every gradient (the whole model's worth of memory) at each step
            engine.enable_backward_allreduce = False
        return engine

    def prepare_frozen(self, model: torch.nn.Module, offload: bool = False) -> "FrozenModel":
        """A model used only for forward passes (reference, teacher, reward model).

        Under ZeRO-3 it becomes a DeepSpeed engine without optimizer, so its weights stay partitioned
        (``offload``: partitions live on the CPU). Otherwise it is the plain module on the device, or
        with ``offload`` on the CPU, moved to the device for each forward pass.
        """
        import deepspeed

        model.eval().requires_grad_(False)
        if self.cfg.zero_stage == 3:
            c = self.cfg
            zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 1e4,
                                    "stage3_prefetch_bucket_size": 5e7}
            if offload:
                zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
            config = {"train_micro_batch_size_per_gpu": c.micro_train_batch_size,
                      "train_batch_size": c.micro_train_batch_size * self.world_size,
                      "zero_optimization": zero, "bf16": {"enabled": c.bf16}, "steps_per_print": 10**9}
            engine, *_ = deepspeed.initialize(model=model, config=config)
            engine.eval()
            return FrozenModel(engine, self.device, move=False)
        model.to("cpu" if offload else self.device)
        return FrozenModel(model, self.device, move=offload and self.device.type != "cpu")

    def backward(self, loss: torch.Tensor, engine: Any) -> None:
        engine.backward(loss)

    def optimizer_step(self, engine: Any) -> None:
        """DeepSpeed steps the optimizer and scheduler only at accumulation boundaries."""
        plain = not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled())
        if plain and engine.is_gradient_accumulation_boundary():
            # ZeRO-0 in fp32 steps the plain torch optimizer: DeepSpeed clips with the gradient norm but
            # drops it, and zeroes the gradients in step(), so measure it here (grads are reduced by now)
            grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
            self._grad_norm = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        engine.step()

    def grad_norm(self, engine: Any) -> float:
        """The global gradient norm (before clipping) of the last optimizer step; nan if none was taken."""
        norm = engine.get_global_grad_norm()
        if norm is None:
            norm = self._grad_norm
        return float(norm) if norm is not None else float("nan")

    def setup_dataloader(self, dataset: Dataset, sampler: Sampler[int], batch_size: int,
                         collate_fn: Callable[[list[Any]], Any]) -> DataLoader:
        # A private generator: creating a loader iterator must not draw from the global torch RNG,
        # or a run resumed mid-epoch would see different dropout masks than an uninterrupted one.
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                          num_workers=0, drop_last=False, generator=torch.Generator())

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, values: dict[str, float], op: str = "mean") -> dict[str, float]:
        if not values:
            return {}
        # on the device: NCCL reduces only CUDA tensors (gloo takes the CPU ones)
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
            if op == "mean":
                t /= self.world_size
        return dict(zip(values, t.tolist()))

    def barrier(self) -> None:
        dist.barrier()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_manager(self, ckpt_path: str, max_ckpt_num: int, max_ckpt_mem_gb: float,
                           background: bool = False) -> CheckpointManager:
        """``background``: give the manager a process group of its own for background saves."""
        manager = CheckpointManager(ckpt_path, TorchDistComm(), max_ckpt_num=max_ckpt_num,
                                    max_ckpt_mem_gb=max_ckpt_mem_gb,
                                    background_comm=TorchDistComm(private=True) if background else None)
        manager.prepare()
        return manager

    def save_engines(self, engines: dict[str, Any], host_copy: bool = False) -> Stage:
        """The manager's ``stage``: each engine's ``save_checkpoint`` with its file writes held back and
        returned as one ``flush``, so the manager gathers a failed write from every rank and names the
        file. ``host_copy`` copies the state to host memory first (the only part that blocks training
        under --async_save); without it the flush must run before the next optimizer step."""
        def stage(tmp: Path) -> Callable[[], None]:
            writes: list[tuple[Any, Any, str]] = []
            for name, engine in engines.items():
                # every name of a frozen weight, tied aliases included (an lm_head tied to a frozen embedding)
                frozen = frozenset(n for n, p in engine.module.named_parameters(remove_duplicate=False)
                                   if not p.requires_grad)
                exclude_frozen = bool(frozen)
                real = engine.checkpoint_engine
                engine.checkpoint_engine = _DeferredWrites(real, writes, host_copy, frozen)
                try:
                    engine.save_checkpoint(str(tmp), tag=name, client_state={}, save_latest=False,
                                           exclude_frozen_parameters=exclude_frozen)
                finally:
                    engine.checkpoint_engine = real
            if host_copy and torch.cuda.is_available():
                torch.cuda.synchronize()  # the device-to-host copies are complete before training moves on

            def flush() -> None:
                while writes:
                    writer, state, path = writes.pop(0)  # popped: each host copy is freed once written
                    try:
                        writer.save(state, path)
                    except RuntimeError as e:  # torch's file writer reports a failed write this way
                        raise OSError(errno.EIO, str(e).strip().splitlines()[0][:200], path) from e
                    start_writeback(path)  # on disk while the next file is serialized
            return flush
        return stage

    def load_engines(self, resumed: Resumed, engines: dict[str, Any]) -> None:
        """Load model, optimizer and scheduler of each engine, then this rank's RNG.

        A checkpoint saved on another world size or ZeRO stage is converted to DeepSpeed's universal
        format first (by rank 0, into a temp folder beside it that is removed after loading); the
        committed checkpoint itself is never modified.
        """
        saved = resumed.state
        elastic = saved.world_size != self.world_size or saved.zero_stage not in (None, self.cfg.zero_stage)
        universal = None
        if elastic and any(needs_universal(resumed.path / name) for name in engines):
            universal = resumed.path.parent / f"{TMP_PREFIX}universal-{resumed.path.name}"
            if self.is_rank_0:
                log.info("%s was saved on %d rank(s) with ZeRO-%s and this run has %d with ZeRO-%d: converting it "
                         "to DeepSpeed's universal checkpoint format in %s", resumed.path, saved.world_size,
                         saved.zero_stage, self.world_size, self.cfg.zero_stage, universal)
                if self.cfg.zero_stage == 3:
                    log.warning("ZeRO-3 on another world size: DeepSpeed's universal load continues the run "
                                "but not bit for bit (a few 1e-5 in the weights after a few steps on a tiny "
                                "model); ZeRO-1/2 and ZeRO-0 continue exactly up to summation order")
            err = None
            if self.is_rank_0:
                started = time.perf_counter()
                try:
                    for name in engines:
                        convert_to_universal(resumed.path, name, universal)
                    log.info("converted %s to the universal format in %.1fs", resumed.path,
                             time.perf_counter() - started)
                except (OSError, ValueError, RuntimeError, AssertionError) as e:
                    err = f"cannot convert {resumed.path} to the universal format: {e}"
            err = TorchDistComm().broadcast_object(err)
            if err:
                raise CheckpointError(err)
        for name, engine in engines.items():
            frozen = any(not p.requires_grad for p in engine.module.parameters())
            engine._config.load_universal_checkpoint = universal is not None
            try:
                path, _ = engine.load_checkpoint(str(universal or resumed.path), tag=name,
                                                 load_optimizer_states=True, load_lr_scheduler_states=True,
                                                 load_module_strict=not frozen)
            finally:
                engine._config.load_universal_checkpoint = False
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load {resumed.path}/{name}")
        if universal is not None:
            self.barrier()
            if self.is_rank_0:
                shutil.rmtree(universal, ignore_errors=True)
        if saved.world_size == self.world_size and len(saved.rng) == self.world_size:
            restore_rng(saved.rng[self.rank])
        else:
            seed_everything(self.cfg.seed + resumed.step)

    # ------------------------------------------------------------------ export
    def full_state_dict(self, engine_or_model: Any) -> dict[str, torch.Tensor] | None:
        """On rank 0, the weights a Hugging Face folder of this model holds; None on other ranks.

        Gathered under ZeRO-3 one parameter at a time. A PEFT model gives its trainable (adapter)
        weights only: that is all its folder holds, and the frozen base is never gathered.
        """
        model = getattr(engine_or_model, "module", engine_or_model)
        adapter_only = _is_peft(model)
        if self.cfg.zero_stage != 3:
            if not self.is_rank_0:
                return None
            if adapter_only:
                return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        import deepspeed

        out: dict[str, torch.Tensor] = {}
        for name, param in model.named_parameters():
            if adapter_only and not param.requires_grad:
                continue
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.is_rank_0:
                    out[name] = param.detach().cpu().clone()
        if self.is_rank_0 and not adapter_only:
            persistent = set(model.state_dict())  # non-persistent buffers (rotary tables) are not saved
            for name, buf in model.named_buffers():
                if name in persistent:
                    out[name] = buf.detach().cpu().clone()
        return out if self.is_rank_0 else None

    def write_hf(self, engine_or_model: Any, tokenizer: Any, folder: Path,
                 state_dict: dict[str, torch.Tensor] | None) -> None:
        """Rank 0 only: a Hugging Face folder (a PEFT adapter folder for a LoRA model) with config and
        tokenizer; without ``state_dict``, everything but the weights."""
        model = getattr(engine_or_model, "module", engine_or_model)
        folder.mkdir(parents=True, exist_ok=True)
        weights = state_dict is not None
        if state_dict is None:  # PEFT looks up its trainable names (a head in modules_to_save): give it empty ones
            state_dict = {k: torch.empty(0) for k, p in model.named_parameters() if p.requires_grad} if _is_peft(
                model) else {}
        try:
            model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        except (RuntimeError, ValueError) as e:  # how safetensors reports a failed write
            raise OSError(errno.EIO, str(e).strip().splitlines()[0][:200], str(folder)) from e
        if not weights:
            for f in folder.glob("*.safetensors"):
                f.unlink()
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    def with_hf_files(self, stage: Callable[[Path], Callable[[], None] | None], engines: dict[str, Any],
                      tokenizer: Any, weights: bool) -> Callable[[Path], Callable[[], None]]:
        """``stage`` plus, for each engine, its Hugging Face folder under ``hf/<name>/`` in the checkpoint:
        config, tokenizer (and adapter config) always, so an export needs nothing outside the checkpoint;
        the weights too when ``weights`` (--save_hf_ckpt). Weights are gathered now (collective); rank 0
        writes the files in the flush, where the manager gathers a failed write from every rank."""
        def staged(tmp: Path) -> Callable[[], None]:
            engine_flush = stage(tmp)
            weights_of = {name: self.full_state_dict(e) if weights else None for name, e in engines.items()}

            def flush() -> None:
                if engine_flush is not None:
                    engine_flush()
                if self.is_rank_0:
                    for name, engine in engines.items():
                        self.write_hf(engine, tokenizer, tmp / HF_DIR / name, weights_of.pop(name))
            return flush
        return staged

    def save_model(self, engine_or_model: Any, tokenizer: Any, save_path: str) -> None:
        """A Hugging Face folder (safetensors, config, tokenizer; a PEFT adapter folder for a LoRA model),
        swapped in atomically."""
        state_dict = self.full_state_dict(engine_or_model)
        if self.is_rank_0:
            target = Path(save_path)
            tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                self.write_hf(engine_or_model, tokenizer, tmp, state_dict)
                old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
                if target.exists():
                    os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise UserError(f"--save_path {save_path}: cannot write the model ({e.strerror or e})") from None
            log.info("saved the Hugging Face %s to %s", "adapter" if _is_peft(
                getattr(engine_or_model, "module", engine_or_model)) else "model", target)
        self.barrier()


def _is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _cpu_adam(groups: list[dict[str, Any]], optim: OptimConfig) -> torch.optim.Optimizer:
    """DeepSpeedCPUAdam for --adam_offload; its C++ op is compiled on first use (then cached)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    log.info("--adam_offload: loading DeepSpeed's CPU Adam op (compiled on first use, which can take "
             "minutes; cached in ~/.cache/torch_extensions)")
    try:
        return DeepSpeedCPUAdam(groups, lr=optim.learning_rate, betas=optim.betas)
    except (RuntimeError, ImportError, OSError, subprocess.SubprocessError) as e:  # how a failed JIT build surfaces
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--adam_offload: DeepSpeed's CPU Adam op cannot be built or loaded on this machine "
                        f"({reason}); it needs a C++ compiler and ninja (see DS_BUILD_CPU_ADAM=1 pip install "
                        f"deepspeed), or drop --adam_offload") from None


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (the usual AdamW recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions weights into 1-D shards at load time
        (no_decay if ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class _DeferredWrites:
    """Stands in for an engine's checkpoint engine during ``save_checkpoint``: each file write is
    queued (its state copied to host memory first when ``host_copy``), everything else goes to the
    engine's own checkpoint engine, which later writes the queued files in DeepSpeed's format."""

    def __init__(self, real: Any, queue: list[tuple[Any, Any, str]], host_copy: bool,
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
        self._queue.append((self._real, _to_host(state_dict) if self._host_copy else state_dict, path))

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
