"""The locally built tiny tokenizer/model: loadable offline, deterministic, ChatML template."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrl_ckpt.utils.tiny import (
    CHATML_TEMPLATE,
    build_smollm2_shaped,
    build_tiny_model,
    build_tiny_tokenizer,
    example_texts,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tokenizer_loads_with_auto(tiny_tokenizer_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert len(tok) == 512
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    # ChatML markers must be single, unsplittable tokens.
    assert tok("<|im_start|>user<|im_end|>").input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") in tok("hi<|im_end|>").input_ids
    # Byte-level: any text round-trips, including unseen characters.
    text = "Sort these numbers: 3, 1, 2. Ünïcødé ✓"
    ids = tok(text).input_ids
    assert tok.eos_token_id not in ids and tok.bos_token_id not in ids  # nothing added implicitly
    assert tok.decode(ids) == text
    # The BPE learned merges from the shipped data: its frequent phrases are few tokens.
    assert len(tok("Reverse the order of these words:").input_ids) <= 8


def test_model_loads_with_auto(tiny_model_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.vocab_size == len(tok)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert cfg.max_position_embeddings == 1024 and not cfg.tie_word_embeddings
    assert cfg.attention_dropout == 0.0
    batch = tok(["What is the capital of Peru?", "hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.loss)


def test_dropout_model(tiny_dropout_model_dir: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dropout_model_dir)
    assert model.config.attention_dropout == pytest.approx(0.1)


def test_builds_are_deterministic(tmp_path: Path) -> None:
    texts = example_texts()
    build_tiny_tokenizer(str(tmp_path / "tok_a"), texts)
    build_tiny_tokenizer(str(tmp_path / "tok_b"), texts)
    assert _sha(tmp_path / "tok_a" / "tokenizer.json") == _sha(tmp_path / "tok_b" / "tokenizer.json")

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    torch.rand(3)  # same position in the stream as `before`
    a = Path(build_tiny_model(str(tmp_path / "a"), str(tmp_path / "tok_a")))
    after = torch.rand(3)
    b = Path(build_tiny_model(str(tmp_path / "b"), str(tmp_path / "tok_b")))
    c = Path(build_tiny_model(str(tmp_path / "c"), str(tmp_path / "tok_a"), seed=1))
    assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors")
    assert _sha(a / "model.safetensors") != _sha(c / "model.safetensors")
    # Building must not reseed the caller's RNG stream.
    torch.manual_seed(123)
    torch.rand(3)
    assert torch.equal(after, torch.rand(3)) and not torch.equal(before, after)


def test_chat_template(tiny_tokenizer_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert tok.chat_template == CHATML_TEMPLATE
    messages = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids  # v5 may return a BatchEncoding
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


@pytest.mark.slow
def test_smollm2_shaped(tmp_path: Path, tiny_tokenizer_dir: str) -> None:
    out = build_smollm2_shaped(str(tmp_path / "smol"), tiny_tokenizer_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(out)
        AutoTokenizer.from_pretrained(out)
    finally:
        shutil.rmtree(out)  # ~540 MB; pytest would keep it around in its basetemp
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (49152, 576, 1536)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.tie_word_embeddings
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
