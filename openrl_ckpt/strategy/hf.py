"""Hugging Face format, both ways: writing a model folder (--save_path, each checkpoint's ``hf/<engine>/``)
and reading an engine's full weights back from a committed checkpoint's DeepSpeed files (``ckpt export``).

Writing: ``full_state_dict`` gathers the weights (ZeRO-3: one parameter at a time) onto rank 0,
``write_hf`` writes a folder (a PEFT adapter folder for a LoRA model), ``save_model`` swaps one in
atomically, and ``stage_hf_folders`` stages the copies a checkpoint holds.

Reading: which weights? By default exactly what ``save_model`` writes at that step, the engine's
module weights in the training dtype. ZeRO-0/1/2 store that module whole in ``mp_rank_00_model_states.pt``;
ZeRO-3 stores only shards, so its weights are the optimizer's fp32 partitions consolidated and cast to the
training dtype, which is how ZeRO-3 makes its module weights after each step. A different ``dtype`` is cast
from the fp32 master weights when the optimizer holds them (bf16 training), so ``--dtype fp32`` exports the
optimizer's full-precision weights rather than upcast bf16 ones.

DeepSpeed's files are pickles written by DeepSpeed: the module states are read with ``weights_only``; the
optimizer shards (ZeRO-3, fp32 master weights) go through DeepSpeed's own consolidation, which unpickles
them fully, so export only checkpoints you trust (as with any DeepSpeed checkpoint).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from openrl_ckpt.checkpoint.contents import StagedWrite
from openrl_ckpt.checkpoint.faults import fault_point
from openrl_ckpt.checkpoint.files import STEP_DIR
from openrl_ckpt.checkpoint.inspect import HF_DIR
from openrl_ckpt.errors import UserError
from openrl_ckpt.models.export import without_tied_copies
from openrl_ckpt.utils.atomic import atomic_folder

if TYPE_CHECKING:
    from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy

log = logging.getLogger("openrl_ckpt")

# ---------------------------------------------------------------------------- reading

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# what reading a file that is not what it claims raises (the weights-only unpickler fed other bytes can
# also fail on its own stack: IndexError)
_LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError, pickle.UnpicklingError,
                zipfile.BadZipFile)


@dataclass
class EngineWeights:
    state_dict: dict[str, torch.Tensor]
    train_dtype: torch.dtype
    zero_stage: int
    source: str  # "module" (as the engine held it) or "fp32 master" (the optimizer's partitions)


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _train_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    if (ds_config.get("bf16") or {}).get("enabled"):
        return torch.bfloat16
    if (ds_config.get("fp16") or {}).get("enabled"):
        return torch.float16
    return torch.float32


def _model_states(engine_dir: Path) -> dict[str, Any]:
    files = sorted(engine_dir.glob("*model_states.pt"))
    if not files:
        raise UserError(f"{engine_dir}: no DeepSpeed model states (*model_states.pt)")
    try:
        states = torch.load(files[0], map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as e:
        raise UserError(f"{files[0]}: unreadable DeepSpeed model states ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:100]})") from None
    if not isinstance(states, dict) or "module" not in states or "ds_config" not in states:
        raise UserError(f"{files[0]}: not a DeepSpeed model states file")
    return states


def _fp32_master(step_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    quiet = io.StringIO()
    try:  # DeepSpeed prints progress on stdout and stderr: keep the tool's output to its own lines
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=tag, exclude_frozen_parameters=True)
    except (*_LOAD_ERRORS, FileNotFoundError, NotImplementedError) as e:
        raise UserError(f"{step_dir / tag}: DeepSpeed cannot consolidate the fp32 weights "
                        f"({str(e).splitlines()[0][:200]})") from None


def read_engine_weights(step_dir: Path, tag: str, dtype: torch.dtype | None = None) -> EngineWeights:
    """The engine's full weights (trainable ones only when frozen ones were left out) in ``dtype``
    (default: the training dtype, bitwise what --save_path would have written)."""
    states = _model_states(step_dir / tag)
    ds_config = states["ds_config"]
    train_dtype = _train_dtype(ds_config)
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    want = dtype or train_dtype
    module: dict[str, torch.Tensor] = states["module"]
    if stage <= 2 and (want == train_dtype or train_dtype == torch.float32):
        # the module as the engine held it (fp32 training: these are the master weights too)
        sd = {k: v if v.dtype == want or not v.is_floating_point() else v.to(want) for k, v in module.items()}
        return EngineWeights(sd, train_dtype, stage, "module")
    master = _fp32_master(step_dir, tag)
    buffers = set(states.get("buffer_names") or [])
    sd = {}
    for k, v in master.items():
        if k in buffers and k in module:  # buffers are not in the optimizer: take the module's own copy
            v = module[k]
            sd[k] = v.to(want) if v.is_floating_point() and want != train_dtype else v
        else:
            sd[k] = v.to(want)
    return EngineWeights(sd, train_dtype, stage, "fp32 master")


# ---------------------------------------------------------------------------- writing


def is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def unwrap(engine_or_model: Any) -> torch.nn.Module:
    """The module of a DeepSpeed engine, or the model itself."""
    return getattr(engine_or_model, "module", engine_or_model)


def full_state_dict(strategy: DeepspeedStrategy, engine_or_model: Any) -> dict[str, torch.Tensor] | None:
    """On rank 0, the weights a Hugging Face folder of this model holds; None on other ranks.

    Gathered under ZeRO-3 one parameter at a time. A PEFT model gives its trainable (adapter)
    weights only: that is all its folder holds, and the frozen base is never gathered.
    """
    model = unwrap(engine_or_model)
    adapter_only = is_peft(model)
    if strategy.cfg.zero_stage != 3:
        if not strategy.is_rank_0:
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
            if strategy.is_rank_0:
                out[name] = param.detach().cpu().clone()
    if strategy.is_rank_0 and not adapter_only:
        persistent = set(model.state_dict())  # non-persistent buffers (rotary tables) are not saved
        for name, buf in model.named_buffers():
            if name in persistent:
                out[name] = buf.detach().cpu().clone()
    return out if strategy.is_rank_0 else None


def write_hf(engine_or_model: Any, tokenizer: Any, folder: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    """A Hugging Face folder (a PEFT adapter folder for a LoRA model) with config and tokenizer; without
    ``state_dict``, everything but the weights. Called on rank 0 only."""
    model = unwrap(engine_or_model)
    folder.mkdir(parents=True, exist_ok=True)
    weights = state_dict is not None
    if state_dict is None:  # PEFT looks up its trainable names (a head in modules_to_save): give it empty ones
        state_dict = {k: torch.empty(0) for k, p in model.named_parameters() if p.requires_grad} if is_peft(
            model) else {}
    try:
        model.save_pretrained(folder, state_dict=without_tied_copies(model, state_dict), safe_serialization=True)
    except (RuntimeError, ValueError) as e:  # how safetensors reports a failed write
        raise OSError(errno.EIO, str(e).strip().splitlines()[0][:200], str(folder)) from e
    if not weights:
        for f in folder.glob("*.safetensors"):
            f.unlink()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


@dataclass(frozen=True)
class HFFolder:
    """A checkpoint's ``hf/<engine>/``: config, tokenizer (and adapter config), the weights when gathered."""

    path: str
    model: Any
    tokenizer: Any
    state_dict: dict[str, torch.Tensor] | None

    def write(self, folder: Path) -> None:
        write_hf(self.model, self.tokenizer, folder / self.path, self.state_dict)


def stage_hf_folders(strategy: DeepspeedStrategy, engines: dict[str, Any], tokenizer: Any,
                     weights: bool) -> list[StagedWrite]:
    """Each engine's Hugging Face folder in the checkpoint, so an export needs nothing outside it; with
    ``weights`` (--save_hf_ckpt) the weights too, gathered now (collective). Rank 0 writes them."""
    gathered = {name: full_state_dict(strategy, engine) if weights else None for name, engine in engines.items()}
    if not strategy.is_rank_0:
        return []
    return [HFFolder(f"{HF_DIR}/{name}", unwrap(engine), tokenizer, gathered[name]) for name, engine in engines.items()]


def stage_model_folder(strategy: DeepspeedStrategy, engine_or_model: Any, tokenizer: Any) -> HFFolder | None:
    """What --save_path would hold now, gathered (collective) for rank 0 to write: a model export."""
    state_dict = full_state_dict(strategy, engine_or_model)
    return HFFolder(".", unwrap(engine_or_model), tokenizer, state_dict) if strategy.is_rank_0 else None


def save_model(strategy: DeepspeedStrategy, engine_or_model: Any, tokenizer: Any, save_path: str) -> None:
    """A Hugging Face folder (safetensors, config, tokenizer; a PEFT adapter folder for a LoRA model),
    swapped in atomically (collective: every rank calls it). The periodic exports inside it
    (``global_step<N>/``, --export_steps) stay."""
    state_dict = full_state_dict(strategy, engine_or_model)
    err = None
    if strategy.is_rank_0:
        target = Path(save_path)
        try:
            fault_point("export")
            with atomic_folder(target, replace=True, carry=lambda name: STEP_DIR.match(name) is not None) as tmp:
                write_hf(engine_or_model, tokenizer, tmp, state_dict)
        except OSError as e:
            fix = "make room" if e.errno == errno.ENOSPC else "fix that"
            err = (f"--save_path {save_path}: cannot write the model ({e.strerror or e}); nothing was written there "
                   f"and the checkpoints are intact: {fix} and rerun the same command, which exports again")
        else:
            log.info("saved the Hugging Face %s to %s", "adapter" if is_peft(unwrap(engine_or_model)) else "model",
                     target)
    err = strategy.broadcast_object(err)  # every rank stops on rank 0's failure, none waits for it
    if err:
        raise UserError(err, exit_code=1)
