"""Padded and packed batches: shapes, loss masks, and that packing changes no logit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from openrl_ckpt.data.collate import pack_collate, pad_collate

SAMPLES = [
    {"input_ids": [5, 6, 7, 8, 9], "loss_start": 2, "index": 3},
    {"input_ids": [10, 11, 12], "loss_start": 0, "index": 7},
    {"input_ids": [13, 14, 15, 16], "loss_start": 4, "index": 1},
]


def test_pad_collate_shapes_and_masks():
    batch = pad_collate(SAMPLES, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 0, 0], [13, 14, 15, 16, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert batch["loss_mask"].tolist() == [
        [False, False, True, True, True],
        [False, True, True, False, False],  # the first token is never a target, even with loss_start 0
        [False, False, False, False, False],  # loss_start == length: nothing to learn
    ]
    assert batch["index"].tolist() == [3, 7, 1]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["index"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.bool


def test_pack_collate_shapes_positions_and_masks():
    batch = pack_collate(SAMPLES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0]]
    assert batch["index"].tolist() == [3, 7, 1]
    assert batch["position_ids"].dtype == torch.long and batch["loss_mask"].dtype == torch.bool


def tiny_llama(attn_implementation: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).train()


def masked_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The trainer's loss: predict token t from t-1 wherever loss_mask[t]."""
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    mask = loss_mask[:, 1:].float()
    return (losses * mask).sum() / mask.sum()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_logits_equal_padded_logits(attn_implementation):
    model = tiny_llama(attn_implementation)
    generator = torch.Generator().manual_seed(1)
    samples = [
        {"input_ids": torch.randint(1, 64, (n,), generator=generator).tolist(), "loss_start": s, "index": i}
        for i, (n, s) in enumerate([(7, 3), (4, 1), (1, 0), (6, 2)])
    ]
    padded = pad_collate(samples, pad_token_id=0)
    packed = pack_collate(samples)
    with torch.no_grad():
        # use_cache=False matters: with a cache, transformers skips the packed-sequence mask (config default is True).
        padded_logits = model(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False
        ).logits
        packed_logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], attention_mask=None, use_cache=False
        ).logits
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(packed_logits[0], padded_logits[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        masked_loss(packed_logits, packed["input_ids"], packed["loss_mask"]),
        masked_loss(padded_logits, padded["input_ids"], padded["loss_mask"]),
        rtol=0,
        atol=1e-6,
    )


def test_packed_samples_leak_without_the_block_mask():
    """Negative control: an explicit all-ones mask turns packing detection off, and the second sample sees the first."""
    model = tiny_llama("sdpa")
    samples = [
        {"input_ids": [1, 2, 3, 4], "loss_start": 1, "index": 0},
        {"input_ids": [5, 6, 7], "loss_start": 1, "index": 1},
    ]
    packed = pack_collate(samples)
    with torch.no_grad():
        isolated = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False).logits[0]
        blocked = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False)
        blocked = blocked.logits[0, 4:]
        leaked = model(
            input_ids=packed["input_ids"],
            position_ids=packed["position_ids"],
            attention_mask=torch.ones_like(packed["input_ids"]),
            use_cache=False,
        ).logits[0, 4:]
    torch.testing.assert_close(blocked, isolated, rtol=0, atol=1e-5)
    assert (leaked - isolated).abs().max() > 1e-3


def test_left_and_right_padding_on_the_cpu():
    from openrl_ckpt.data.padding import left_pad, right_pad

    ids, mask = left_pad([[3, 4], [5]], pad_token_id=0)
    assert ids.tolist() == [[3, 4], [0, 5]] and mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = right_pad([[3, 4], [5]], pad_token_id=9, width=3)
    assert ids.tolist() == [[3, 4, 9], [5, 9, 9]] and mask.tolist() == [[1, 1, 0], [1, 0, 0]]
    assert ids.device.type == "cpu" and ids.dtype == mask.dtype == torch.long
