"""DeepspeedStrategy: process group, DeepSpeed engines, the optimizer step and collectives.

Everything that talks to DeepSpeed and torch.distributed lives in this package: engine set-up here,
engine checkpoint I/O in ``engine_checkpoint.py``, Hugging Face writing and reading in ``hf.py``.
"""

from __future__ import annotations

import datetime
import enum
import logging
import math
import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from openrl_ckpt.checkpoint.faults import fault_point
from openrl_ckpt.checkpoint.state import seed_everything
from openrl_ckpt.errors import UserError
from openrl_ckpt.strategy.build_lock import SHM_OP_NAME, clear_stale_build_lock
from openrl_ckpt.strategy.peers import start_watch

log = logging.getLogger("openrl_ckpt")


class ReduceOp(str, enum.Enum):
    MEAN = "mean"
    SUM = "sum"
    MAX = "max"


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
    zpg: int = 1  # ZeRO++ hierarchical partition size; 1: off
    overlap_comm: bool = False
    full_determinism: bool = False
    torch_compile: bool = False
    # how long a rank waits in a collective for the others (--collective_timeout_mins); a dead peer is
    # noticed sooner (its connection closes), so this bounds only a hung one
    collective_timeout_mins: float = 10.0


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
        if cfg.collective_timeout_mins <= 0:
            raise UserError(f"--collective_timeout_mins must be positive, got {cfg.collective_timeout_mins}")
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
        else:
            clear_stale_build_lock(SHM_OP_NAME)  # DeepSpeed builds its CPU all-reduce op in init_distributed
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False, timeout=self.collective_timeout)
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        start_watch(self.rank, self.world_size, self.collective_timeout)
        fault_point("start")
        seed_everything(self.cfg.seed)
        if self.cfg.full_determinism:
            import transformers

            transformers.enable_full_determinism(self.cfg.seed)
        self.grad_accum = self.accumulation_steps(self.world_size)
        _unlink_shm_workspace(self.rank)

    @property
    def collective_timeout(self) -> datetime.timedelta:
        return datetime.timedelta(minutes=self.cfg.collective_timeout_mins)

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
    def zero_stage(self) -> int:
        return self.cfg.zero_stage

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step, all ranks together (--train_batch_size)."""
        return self.cfg.train_batch_size

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
        if c.zpg > 1:
            zero["zero_hpz_partition_size"] = c.zpg
        if c.overlap_comm:
            zero.update(overlap_comm=True, contiguous_gradients=True)
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
        kwargs = ({"min_lr": optim.learning_rate * optim.min_lr_ratio} if optim.lr_scheduler == "cosine_with_min_lr"
                  else {})
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
        if self.cfg.torch_compile:
            engine.compile()
        return engine

    def prepare_frozen(self, model: torch.nn.Module, offload: bool = False) -> FrozenModel:
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
    def all_reduce(self, values: dict[str, float], op: ReduceOp = ReduceOp.MEAN) -> dict[str, float]:
        if not values:
            return {}
        # on the device: NCCL reduces only CUDA tensors (gloo takes the CPU ones)
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == ReduceOp.MAX else dist.ReduceOp.SUM)
            if op == ReduceOp.MEAN:
                t /= self.world_size
        return dict(zip(values, t.tolist()))

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (a picklable value: an error message, a name)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def _cpu_adam(groups: list[dict[str, Any]], optim: OptimConfig) -> torch.optim.Optimizer:
    """DeepSpeedCPUAdam for --adam_offload; its C++ op is compiled on first use (then cached)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    log.info("--adam_offload: loading DeepSpeed's CPU Adam op (compiled on first use, which can take "
             "minutes; cached in ~/.cache/torch_extensions)")
    clear_stale_build_lock("cpu_adam")
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
