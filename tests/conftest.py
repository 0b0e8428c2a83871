"""Shared pytest setup: offline/CPU environment, markers, tiny model fixtures.

No hub access exists in CI, so every test that needs a model or tokenizer uses
the locally built tiny assets below (built once per session, ~1 s).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # works without `pip install -e .` too
    sys.path.insert(0, str(REPO_ROOT))

# Defaults for plain `pytest` runs (scripts/test.sh sets the same): set before any
# test imports deepspeed/transformers, which read them at import time.
for _key, _value in {
    "DS_ACCELERATOR": "cpu",
    "WANDB_MODE": "offline",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

EXAMPLE_DATA = REPO_ROOT / "examples" / "data"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped when torch.cuda is not available")
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return  # don't pay the torch import for nothing
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def example_data_dir() -> Path:
    """examples/data: the shipped JSONL datasets."""
    return EXAMPLE_DATA


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Byte-level BPE (vocab 512) trained on examples/data, ChatML chat template."""
    from openrl_ckpt.utils.tiny import build_tiny_tokenizer, example_texts

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(str(out), example_texts(EXAMPLE_DATA))
    return str(out)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: str) -> str:
    """2-layer Llama (hidden 64, GQA 4/2), seed 0, saved together with the tokenizer."""
    from openrl_ckpt.utils.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_model")
    return build_tiny_model(str(out), tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_dropout_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: str) -> str:
    """Same as tiny_model_dir but attention_dropout=0.1, so training consumes RNG (RNG-restore tests)."""
    from openrl_ckpt.utils.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_dropout_model")
    return build_tiny_model(str(out), tiny_tokenizer_dir, attention_dropout=0.1)
