"""Loading causal LMs and tokenizers, with clear errors for the usual mistakes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from openrl_ckpt.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    pretrain: str
    bf16: bool = False
    flash_attn: bool = False
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    gradient_checkpointing_use_reentrant: bool = False
    lora_rank: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    load_in_4bit: bool = False
    aux_loss_coef: float = 0.0


def checkpointing_kwargs(cfg: ModelConfig) -> dict[str, bool]:
    """Activation checkpointing's arguments (--gradient_checkpointing_use_reentrant)."""
    return {"use_reentrant": cfg.gradient_checkpointing_use_reentrant}


def check_pretrain(pretrain: str) -> None:
    path = Path(pretrain)
    looks_local = path.exists() or pretrain.startswith((".", "/", "~")) or pretrain.count("/") > 1
    if not looks_local:
        return  # a hub id: transformers says what is wrong if it can't be fetched
    if not path.is_dir():
        raise UserError(f"--pretrain {pretrain}: no such directory")
    if not (path / "config.json").exists():
        raise UserError(f"--pretrain {pretrain}: holds no model (no config.json)")


def attn_implementation(cfg: ModelConfig) -> str:
    if not cfg.flash_attn:
        return cfg.attn_implementation
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        raise UserError("--flash_attn needs the flash-attn package (pip install 'openrl_ckpt[gpu]' on a CUDA "
                        "machine); drop the flag to use PyTorch's sdpa attention") from None
    return "flash_attention_2"


def load_tokenizer(pretrain: str, padding_side: str = "right", use_fast: bool = True) -> Any:
    """The tokenizer of ``pretrain`` (``use_fast=False``: --disable_fast_tokenizer), with a pad token."""
    from transformers import AutoTokenizer

    check_pretrain(pretrain)
    try:
        tok = AutoTokenizer.from_pretrained(pretrain, padding_side=padding_side, use_fast=use_fast)
    except (OSError, ValueError) as e:
        raise UserError(f"--pretrain {pretrain}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(cfg: ModelConfig) -> torch.nn.Module:
    """A causal LM ready for DeepSpeed: dtype, attention kernel, checkpointing, LoRA (QLoRA with --load_in_4bit)."""
    from transformers import AutoModelForCausalLM

    check_pretrain(cfg.pretrain)
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cfg.bf16 else torch.float32,
                              "attn_implementation": attn_implementation(cfg), **quantization_kwargs(cfg)}
    if cfg.aux_loss_coef > 0:
        kwargs["output_router_logits"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.pretrain, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"--pretrain {cfg.pretrain}: cannot load a causal LM ({str(e).splitlines()[0]})") from None
    model.config.use_cache = False
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        # freezes the 4-bit base, keeps norms in fp32 and enables input gradients (and checkpointing)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing_kwargs(cfg))
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(cfg))
    if cfg.lora_rank > 0:
        model = apply_lora(model, cfg)
    return model


def quantization_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """from_pretrained arguments for --load_in_4bit (NF4 with double quantization, computing in the
    training dtype), or a one-line error where QLoRA cannot run. bitsandbytes is imported only here."""
    if not cfg.load_in_4bit:
        return {}
    if cfg.lora_rank <= 0:
        raise UserError("--load_in_4bit (QLoRA) trains LoRA adapters on a frozen 4-bit model: set --lora_rank > 0")
    if not torch.cuda.is_available():
        raise UserError("--load_in_4bit (QLoRA) needs bitsandbytes CUDA kernels and this machine has no GPU")
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise UserError("--load_in_4bit cannot be combined with --zero_stage 3 (4-bit weights are not partitioned); "
                        "use --zero_stage 0, 1 or 2")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--load_in_4bit needs the bitsandbytes package (pip install 'openrl_ckpt[bnb]')") from None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if cfg.bf16 else torch.float32
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute),
            "device_map": {"": torch.cuda.current_device()}}


def apply_lora(model: torch.nn.Module, cfg: ModelConfig, *, causal_lm: bool = True,
               modules_to_save: list[str] | None = None) -> torch.nn.Module:
    """Wrap ``model`` in PEFT LoRA; only the adapters (and ``modules_to_save``, e.g. a reward model's
    head, trained in full) keep gradients. ``causal_lm=False`` for models whose forward is not a
    causal LM's (reward models, critics): PEFT then passes the forward's arguments through unchanged."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets: str | list[str] = cfg.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM if causal_lm else None, r=cfg.lora_rank,
                      lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      modules_to_save=modules_to_save, exclude_modules=modules_to_save)
    if cfg.gradient_checkpointing and not cfg.load_in_4bit:  # prepare_model_for_kbit_training did it
        model.enable_input_require_grads()
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise UserError(f"--target_modules {cfg.target_modules}: {e}") from None
    if cfg.load_in_4bit:  # adapters in the training dtype, so DeepSpeed's bf16 optimizer takes them
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(dtype)
    return model


def model_fingerprint(model: torch.nn.Module) -> str:
    """Identity of an architecture: its config (minus paths and runtime switches) and parameter shapes.

    Stored in each checkpoint so a resume with a different model is refused up front.
    """
    config = getattr(model, "config", None)
    conf = json.loads(config.to_json_string(use_diff=False)) if config is not None else {}
    for volatile in ("_name_or_path", "transformers_version", "use_cache", "torch_dtype", "dtype",
                     "_attn_implementation", "attn_implementation", "output_router_logits"):
        conf.pop(volatile, None)
    shapes = []
    for name, p in model.named_parameters():
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 keeps the full shape aside
        shapes.append(f"{name}:{tuple(shape)}")
    blob = json.dumps(conf, sort_keys=True) + "\n".join(shapes)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
