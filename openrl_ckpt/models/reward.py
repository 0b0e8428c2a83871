"""Reward models: a causal LM's backbone with a scalar head read at the last real token.

The head lives under ``--value_head_prefix`` (default ``score``, as in Hugging Face's sequence
classifiers), so the saved folder is an ordinary Hugging Face folder: backbone weights under the
architecture's own prefix (``model.`` for Llama) plus ``score.weight``. Its config records the head
prefix and, with ``--normalize_reward``, the reward mean and std that ``load_reward_model`` applies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from openrl_ckpt.errors import UserError
from openrl_ckpt.models.actor import (
    ModelConfig,
    apply_lora,
    attn_implementation,
    check_pretrain,
    checkpointing_kwargs,
)

_classes: dict[tuple[type, str], type] = {}


def reward_model_class(config: Any, head_prefix: str) -> type:
    """A PreTrainedModel subclass for this architecture, so from_pretrained/save_pretrained and
    ZeRO-3 partitioned loading work as for any Hugging Face model."""
    from transformers import AutoModel

    try:
        backbone_cls = AutoModel._model_mapping[type(config)]
    except KeyError:
        raise UserError(f"model type '{config.model_type}' has no backbone class in transformers; "
                        "a reward model needs one (AutoModel)") from None
    key = (backbone_cls, head_prefix)
    if key in _classes:
        return _classes[key]
    pretrained_cls = backbone_cls.__base__

    class RewardModel(pretrained_cls):  # type: ignore[misc, valid-type]
        supports_gradient_checkpointing = True
        _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # loading from a causal LM

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            setattr(self, self.base_model_prefix, backbone_cls(config))
            setattr(self, head_prefix, nn.Linear(config.hidden_size, 1, bias=False))
            self.post_init()

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, last_index: torch.Tensor | None = None,
                    all_values: bool = False) -> torch.Tensor:
            """One reward per sequence: at ``last_index`` (flat token indices) or, when None, at each
            row's last real token (left or right padding). ``all_values``: the head at every position,
            [B, T], unnormalised (a PPO critic's per-token values)."""
            backbone = getattr(self, self.base_model_prefix)
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
            if all_values:
                return getattr(self, head_prefix)(hidden).squeeze(-1)
            if last_index is None:
                rows, width = input_ids.shape
                mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
                last = width - 1 - mask.flip(1).int().argmax(1)
                last_index = torch.arange(rows, device=hidden.device) * width + last
            reward = getattr(self, head_prefix)(hidden.flatten(0, 1)[last_index]).squeeze(-1)
            if not self.training and getattr(self.config, "normalize_reward", False):
                reward = (reward - self.config.mean) / self.config.std
            return reward

    RewardModel.__name__ = RewardModel.__qualname__ = f"{backbone_cls.__name__.removesuffix('Model')}RewardModel"
    _classes[key] = RewardModel
    return RewardModel


def saved_weight_names(pretrain: str) -> list[str] | None:
    """Tensor names in a local Hugging Face folder (from the index or the safetensors headers)."""
    folder = Path(pretrain)
    if not folder.is_dir():
        return None
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    names: list[str] = []
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names.extend(st.keys())
    return names or None


def check_head(pretrain: str, config: Any, head_prefix: str, base_prefix: str, *, require: bool) -> None:
    """Refuse a head prefix that does not match the head saved in ``pretrain``.

    ``require``: the folder must already hold this head (scoring, PPO); otherwise (train_rm from a
    causal LM) a missing head is created, but a differently named saved head is still an error.
    """
    flag = f"--value_head_prefix {head_prefix}"
    saved = getattr(config, "value_head_prefix", None)
    if saved is not None and saved != head_prefix:
        raise UserError(f"{flag}: {pretrain} is a reward model whose head is '{saved}'; "
                        f"pass --value_head_prefix {saved}")
    names = saved_weight_names(pretrain)
    if names is None:
        return  # a hub id: from_pretrained reports what it cannot find
    tops = sorted({n.split(".", 1)[0] for n in names} - {base_prefix, "lm_head"})
    if f"{head_prefix}.weight" in names:
        return
    if tops:
        raise UserError(f"{flag}: {pretrain} has no '{head_prefix}' head; its weights outside the backbone are "
                        f"under {', '.join(repr(t) for t in tops)}")
    if require:
        raise UserError(f"{flag}: {pretrain} holds no reward head (no '{head_prefix}.weight'); "
                        "train one with train_rm first")


def load_reward_model(cfg: ModelConfig, head_prefix: str = "score", *, require_head: bool = True) -> torch.nn.Module:
    """A reward model from ``cfg.pretrain``: a trained one (``require_head``), or a causal LM whose
    backbone gets a fresh head (train_rm)."""
    from transformers import AutoConfig

    check_pretrain(cfg.pretrain)
    if cfg.load_in_4bit:
        raise UserError("--load_in_4bit is not supported for reward models")
    try:
        config = AutoConfig.from_pretrained(cfg.pretrain)
    except (OSError, ValueError) as e:
        raise UserError(f"--pretrain {cfg.pretrain}: cannot read a model config ({str(e).splitlines()[0]})") from None
    cls = reward_model_class(config, head_prefix)
    check_head(cfg.pretrain, config, head_prefix, cls.base_model_prefix, require=require_head)
    config.value_head_prefix = head_prefix
    try:
        model = cls.from_pretrained(cfg.pretrain, config=config, dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                                    attn_implementation=attn_implementation(cfg))
    except (OSError, ValueError) as e:
        raise UserError(f"--pretrain {cfg.pretrain}: cannot load a reward model ({str(e).splitlines()[0]})") from None
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(cfg))
    if cfg.lora_rank > 0:  # adapters on the backbone, the head trained in full
        model = apply_lora(model, cfg, causal_lm=False, modules_to_save=[head_prefix])
    return model


def reward_token_ids(tokenizer: Any, texts: list[str], max_len: int) -> list[list[int]]:
    """Each text as a reward model reads it: tokens + EOS, cut to ``max_len`` with EOS kept last (as train_rm
    tokenizes, since the head reads the last token); a text already starting with BOS gets no second one."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    ids = []
    for x in tokenizer(texts, return_attention_mask=False)["input_ids"]:
        if bos is not None and len(x) > 1 and x[0] == x[1] == bos:
            x = x[1:]
        x = [*x, eos] if not x or x[-1] != eos else x
        ids.append(x if len(x) <= max_len else [*x[: max_len - 1], eos])
    return ids


def use_stored_normalization(model: torch.nn.Module, normalize: bool, pretrain: str) -> None:
    """--normalize_reward when scoring: the mean/std train_rm stored, or raw rewards without the flag."""
    if normalize and not getattr(model.config, "normalize_reward", False):
        raise UserError(f"--normalize_reward: {pretrain} stores no reward mean/std (train_rm --normalize_reward "
                        "stores them); drop the flag to get raw rewards")
    model.config.normalize_reward = normalize


def set_reward_normalization(model: torch.nn.Module, mean: float, std: float) -> None:
    """Record the reward statistics in the config, so the saved folder normalises when loaded."""
    config = model.config
    config.normalize_reward = True
    config.mean = float(mean)
    config.std = float(std) if std > 0 else 1.0
