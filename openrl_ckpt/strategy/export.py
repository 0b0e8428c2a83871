"""Full weights from one engine of a committed checkpoint, read back from DeepSpeed's files.

Which weights: by default exactly what ``save_model`` (--save_path) writes at that step, the engine's
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
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from openrl_ckpt.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile)


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
