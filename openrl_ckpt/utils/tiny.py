"""Tiny, locally built tokenizer and Llama models.

There is no Hugging Face hub access in CI, so tests, the quickstart and the
benchmarks build their own assets here: a byte-level BPE tokenizer trained on
the shipped example texts and randomly initialised Llama models. Everything is
deterministic (same arguments -> byte-identical files) so tests can compare
weights across runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep `import openrl_ckpt.utils.tiny` cheap
    from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Order fixes the ids: pad=0, bos=1, eos=2, unk=3, im_start=4, im_end=5.
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IM_START, IM_END]

# ChatML, as used by Qwen / SmolLM2-Instruct. Generation prompt opens the
# assistant turn so batch inference can continue it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MAX_POSITIONS = 1024

# Text used when no corpus is given and the repo's examples/data is not around
# (e.g. a non-editable install).
_FALLBACK_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is 12 plus 30? Answer: 12 plus 30 is 42.",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Sort the list 5, 2, 9: the sorted list is 2, 5, 9.",
    "Certainly! Here is a helpful answer. Whatever, figure it out yourself.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000",
]


def repo_root() -> Path:
    """The checkout root (parent of the package directory)."""
    return Path(__file__).resolve().parents[2]


def _iter_strings(obj: object) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _iter_strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _iter_strings(value)


def example_texts(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Every string in examples/data/*.jsonl, in a fixed (sorted file, line) order.

    Falls back to a small built-in corpus when the directory does not exist.
    """
    root = Path(data_dir) if data_dir is not None else repo_root() / "examples" / "data"
    texts: list[str] = []
    for path in sorted(root.glob("*.jsonl")) if root.is_dir() else []:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    texts.extend(_iter_strings(json.loads(line)))
    return texts or list(_FALLBACK_TEXT)


def build_tiny_tokenizer(out_dir: str, texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`, wrap it for transformers, save to `out_dir`.

    No BOS/EOS is added automatically by `encode` (like Qwen/SmolLM2); datasets
    append EOS themselves. Reload with `AutoTokenizer.from_pretrained(out_dir)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(texts)  # materialise: the trainer may iterate from several threads
    if not corpus:
        raise ValueError("build_tiny_tokenizer needs at least one text")

    tok = Tokenizer(models.BPE())  # byte-level: every byte is in the alphabet, no unk needed
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHATML_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def _save_model(out_dir: str, config: object, tokenizer: object, seed: int) -> str:
    import torch
    from transformers import LlamaForCausalLM

    # fork_rng: seeding must not disturb the caller's (e.g. a test's) RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_model(
    out_dir: str,
    tokenizer_dir: str,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    attention_dropout: float = 0.0,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> str:
    """Randomly initialised LlamaForCausalLM sized to the tokenizer, saved with it (``tie_word_embeddings``:
    the output layer is the input embedding, as in SmolLM2 or Qwen2.5's small models).

    Returns `out_dir`, which then loads with both AutoModelForCausalLM and
    AutoTokenizer. Same arguments -> byte-identical model.safetensors.
    """
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        attention_dropout=attention_dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    return _save_model(out_dir, config, tokenizer, seed)


def build_smollm2_shaped(out_dir: str, tokenizer_dir: str | None = None, seed: int = 0) -> str:
    """A randomly initialised model with SmolLM2-135M's shape (~135M params), for benchmarks.

    The embedding keeps SmolLM2's 49152 rows even though the tiny tokenizer is
    smaller (ids simply never reach the upper rows), so compute and memory match
    the real model. Without `tokenizer_dir` a tiny tokenizer is built from the
    shipped example texts into `out_dir`.
    """
    from transformers import AutoTokenizer, LlamaConfig

    if tokenizer_dir is None:
        tokenizer = build_tiny_tokenizer(out_dir, example_texts())
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return _save_model(out_dir, config, tokenizer, seed)


def build_reward_model(out_dir: str, base_dir: str, *, seed: int = 0, mean: float | None = None,
                       std: float | None = None) -> str:
    """A reward model on the backbone of the causal LM in `base_dir` with a randomly initialised
    `score` head (seeded), saved with the tokenizer as train_rm saves one. `mean`/`std`: reward
    statistics stored in the config, as train_rm --normalize_reward does."""
    import torch

    from openrl_ckpt.models.actor import ModelConfig, load_tokenizer
    from openrl_ckpt.models.reward import load_reward_model, set_reward_normalization

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_reward_model(ModelConfig(pretrain=base_dir), "score", require_head=False)
    if mean is not None:
        set_reward_normalization(model, mean, 1.0 if std is None else std)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(base_dir).save_pretrained(out_dir)
    return out_dir
