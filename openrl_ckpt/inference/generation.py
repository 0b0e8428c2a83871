"""Sampling answers to left-padded prompts with Hugging Face ``generate``, on a plain model or on a
DeepSpeed engine of any ZeRO stage (a frozen one from ``prepare_frozen`` or a training engine).

The contract of :func:`generate`:

- **Determinism.** With ``seed`` set, the samples depend only on the seed, the model weights and
  this call's inputs (ids, mask, sampling settings): the same call gives the same tokens, and the
  caller's RNG streams are left exactly as they were. With ``seed=None`` sampling draws from the
  global torch RNG (so a caller that checkpoints its RNG state resumes the same stream).
- **Independence from other ranks.** The tokens a rank samples never depend on what other ranks
  generate. Under ZeRO-3 on several ranks the weights are partitioned and every forward pass gathers
  them collectively, so this uses ``synced_gpus``: a rank whose rows are all finished keeps running
  forward passes (without sampling, so without drawing random numbers) until every rank is done.
  Ranks may therefore pass different batch sizes, prompt lengths and finish at different steps, but
  **every rank must call generate the same number of times** (a rank with no work passes a dummy
  row; see ``openrl_ckpt.inference.batching.calls_per_rank``).
- The model is put in eval mode (no dropout, no activation checkpointing, KV cache on) for the
  call and back in its previous mode afterwards; no gradients are taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from openrl_ckpt.errors import UserError


@dataclass(frozen=True)
class SamplingConfig:
    """``--max_new_tokens --temperature --top_p --top_k --greedy_sampling``."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    greedy: bool = False
    repetition_penalty: float = 1.0  # 1: off; above 1 makes repeating a token less likely

    def check(self) -> None:
        if not self.repetition_penalty > 0:
            raise UserError(f"--repetition_penalty must be positive (1.0: off), got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.greedy and not self.temperature > 0:
            raise UserError(f"--temperature must be positive (or use --greedy_sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top_k must be 0 (off) or positive, got {self.top_k}")


@dataclass
class Generation:
    """``sequences``: [B, P + T] the prompts (left-padded, as given) followed by T generated positions;
    ``response_mask``: [B, T], True for each generated token up to and including the first EOS (later
    positions are padding); ``prompt_len``: P; ``ends_with_eos``: per row, whether the answer stopped
    at EOS (False: cut by max_new_tokens)."""

    sequences: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int
    ends_with_eos: list[bool]

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len:]

    def response_ids(self, row: int, keep_eos: bool = False) -> list[int]:
        """The generated tokens of one row, cut at its first EOS (kept with ``keep_eos``)."""
        ids = self.responses[row][self.response_mask[row]].tolist()
        return ids if keep_eos or not self.ends_with_eos[row] else ids[:-1]


def response_mask(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, list[bool]]:
    """True up to and including the first EOS of each row (all True for a row without EOS), and
    whether each row has one."""
    is_eos = responses == eos_token_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), responses.shape[1])
    positions = torch.arange(responses.shape[1], device=responses.device)
    return positions[None, :] <= first[:, None], has_eos.tolist()


def unwrap(model_or_engine: Any) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model_or_engine, "module", model_or_engine)


@torch.no_grad()
def generate(model_or_engine: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             sampling: SamplingConfig, *, eos_token_id: int, pad_token_id: int, zero_stage: int = 0,
             seed: int | None = None) -> Generation:
    """Continue each left-padded prompt row once (see the module docstring for the contract).

    ``model_or_engine``: a causal LM (PEFT-wrapped or not) or a DeepSpeed engine holding one;
    ``input_ids``/``attention_mask``: [B, P] on the model's device, padded on the left;
    ``zero_stage``: the engine's ZeRO stage (3 turns on synced_gpus when several ranks run).
    """
    model = unwrap(model_or_engine)
    synced = zero_stage == 3 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    kwargs: dict[str, Any] = dict(
        max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy, num_beams=1, use_cache=True,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, synced_gpus=synced,
        return_dict_in_generate=False, repetition_penalty=sampling.repetition_penalty)
    if not sampling.greedy:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    was_training = model.training
    model.eval()
    try:
        if seed is None:
            sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        else:
            devices = [input_ids.device] if input_ids.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        model.train(was_training)
    prompt_len = input_ids.shape[1]
    mask, ends_with_eos = response_mask(sequences[:, prompt_len:], eos_token_id)
    return Generation(sequences=sequences, response_mask=mask, prompt_len=prompt_len, ends_with_eos=ends_with_eos)
