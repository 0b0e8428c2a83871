"""--enable_ema: an exponential moving average of the actor's weights, kept in fp32 on the CPU and
checkpointed as a safetensors file inside each checkpoint (never pickle)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from openrl_ckpt.checkpoint.contents import StagedWrite, TensorFile
from openrl_ckpt.errors import UserError

EMA_FILE = "ema.safetensors"


class EmaWeights:
    """ema = beta * ema + (1 - beta) * w after each actor optimizer step. Every rank holds the full
    model (ZeRO 0-2), so every rank keeps the same average and rank 0 writes it."""

    def __init__(self, module: torch.nn.Module, beta: float) -> None:
        self.beta = beta
        self.tensors = {k: p.detach().float().cpu().clone() for k, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, p in module.named_parameters():
            self.tensors[k].mul_(self.beta).add_(p.detach().float().cpu(), alpha=1.0 - self.beta)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy to write while training goes on changing the average."""
        return {k: v.clone() for k, v in self.tensors.items()}

    def load(self, path: Path) -> None:
        saved = load_file(str(path))
        if saved.keys() != self.tensors.keys():
            raise ValueError(f"{path}: the EMA weights do not match this actor's parameters")
        self.tensors = saved

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Put the averaged weights into the model (for the export)."""
        for k, p in module.named_parameters():
            p.copy_(self.tensors[k].to(p.device, p.dtype))


class EmaPart:
    """The EMA as a part of each checkpoint (``ema.safetensors``, written by rank 0)."""

    def __init__(self, ema: EmaWeights) -> None:
        self.ema = ema

    def stage(self, is_rank_0: bool) -> list[StagedWrite]:
        return [TensorFile(EMA_FILE, self.ema.snapshot())] if is_rank_0 else []

    def load(self, checkpoint_dir: Path) -> None:
        path = checkpoint_dir / EMA_FILE
        if not path.exists():
            raise UserError(f"--enable_ema: {checkpoint_dir} holds no EMA weights (the run that saved it had no "
                            "--enable_ema); resume without it or start a fresh --ckpt_path")
        self.ema.load(path)
