"""What the trainers share: model inputs from a batch, token counts, per-sequence
log-probabilities, and the identity of a frozen model (reference, teacher), checked on resume since
it is not checkpointed."""

from __future__ import annotations

import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from openrl_ckpt.errors import UserError
from openrl_ckpt.models.actor import ModelConfig, load_causal_lm, model_fingerprint
from openrl_ckpt.models.loss import sequence_logps
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy, FrozenModel

_SAMPLE = 1 << 20

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors a model's forward takes (padded batches carry attention_mask, packed ones position_ids)."""
    return {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}


def batch_logps(model: Any, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of target-token log-probabilities and target-token count of each sequence in the batch, [N] each."""
    logits = model(**model_inputs(batch, device)).logits
    return sequence_logps(logits, batch["input_ids"].to(device), batch["loss_mask"].to(device),
                          batch["segment"].to(device), len(batch["last"]))


def batch_tokens(batch: dict[str, Any]) -> int:
    """Real (non-padding) tokens in a batch, for throughput."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def real_rows(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """1.0 for real samples, 0.0 for the padding an evaluation sampler adds (negative index)."""
    return (batch["index"] >= 0).to(device, torch.float32)


def reference_identity(path: str, model: torch.nn.Module) -> dict[str, Any]:
    """Architecture fingerprint plus, for a local folder, a sampled digest of its weight files
    (size and the first and last MiB of each), enough to tell two checkpoints apart in milliseconds."""
    digest = zlib.crc32(model_fingerprint(model).encode())
    folder = Path(path)
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(_SAMPLE)
            fh.seek(max(size - _SAMPLE, 0))
            tail = fh.read(_SAMPLE)
        digest = zlib.crc32(f"{f.name}:{size}".encode() + head + tail, digest)
    return {"path": path, "fingerprint": f"{digest:08x}"}


def check_frozen_identity(saved: dict[str, Any], current: dict[str, Any], flag: str) -> None:
    """A resumed run must use the same frozen model (reference, teacher) as the run that saved the checkpoint."""
    if saved and saved.get("fingerprint") != current["fingerprint"]:
        raise UserError(f"{flag} {current['path']}: not the model this run started with ({saved.get('path')}); "
                        "a resumed run must use the same one")


def load_frozen(cfg: ModelConfig, strategy: DeepspeedStrategy, offload: bool) -> tuple[FrozenModel, dict[str, Any]]:
    """A frozen causal LM (reference policy, teacher; no LoRA, no activation checkpointing) and its
    identity for the checkpoint."""
    model = load_causal_lm(replace(cfg, lora_rank=0, gradient_checkpointing=False))
    identity = reference_identity(cfg.pretrain, model)
    return strategy.prepare_frozen(model, offload), identity
