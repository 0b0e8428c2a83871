"""The reward model class: head at the last real token, save/load round trip, normalisation, head checks."""

from __future__ import annotations

import json

import pytest
import torch

from openrl_ckpt.errors import UserError
from openrl_ckpt.models.actor import ModelConfig
from openrl_ckpt.models.reward import load_reward_model, set_reward_normalization


@pytest.fixture(scope="module")
def fresh_rm(tiny_model_dir):
    torch.manual_seed(0)
    return load_reward_model(ModelConfig(pretrain=tiny_model_dir), "score", require_head=False).eval()


def test_reward_is_read_at_the_last_real_token_with_either_padding(fresh_rm):
    ids = torch.tensor([[5, 6, 7, 8]])
    alone = fresh_rm(ids, torch.ones_like(ids))
    right = fresh_rm(torch.tensor([[5, 6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]]))
    left = fresh_rm(torch.tensor([[0, 0, 5, 6, 7, 8]]), torch.tensor([[0, 0, 1, 1, 1, 1]]),
                    position_ids=torch.tensor([[0, 0, 0, 1, 2, 3]]))
    assert torch.allclose(alone, right, atol=1e-5) and torch.allclose(alone, left, atol=1e-5)
    explicit = fresh_rm(torch.tensor([[5, 6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]]),
                        last_index=torch.tensor([3]))
    assert torch.allclose(alone, explicit, atol=1e-6)


def test_saved_folder_loads_back_with_head_and_normalisation(fresh_rm, tmp_path):
    ids = torch.tensor([[5, 6, 7], [9, 10, 11]])
    before = fresh_rm(ids, torch.ones_like(ids))
    set_reward_normalization(fresh_rm, mean=0.25, std=2.0)
    try:
        fresh_rm.save_pretrained(tmp_path)
    finally:
        fresh_rm.config.normalize_reward = False
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["value_head_prefix"], config["normalize_reward"], config["mean"], config["std"]) == \
        ("score", True, 0.25, 2.0)
    loaded = load_reward_model(ModelConfig(pretrain=str(tmp_path)), "score").eval()
    assert torch.allclose(loaded(ids, torch.ones_like(ids)), (before - 0.25) / 2.0, atol=1e-6)
    loaded.train()  # training sees raw rewards
    assert torch.allclose(loaded(ids, torch.ones_like(ids)), before, atol=1e-6)


def test_head_prefix_must_match_the_saved_head(fresh_rm, tmp_path):
    fresh_rm.save_pretrained(tmp_path)
    with pytest.raises(UserError,
                       match="--value_head_prefix value_head: .* head is 'score'; pass --value_head_prefix score"):
        load_reward_model(ModelConfig(pretrain=str(tmp_path)), "value_head")
    # a head saved by another tool (no prefix in the config) is found from the weight names
    config = json.loads((tmp_path / "config.json").read_text())
    del config["value_head_prefix"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="has no 'value_head' head; its weights outside the backbone are under 'score'"):
        load_reward_model(ModelConfig(pretrain=str(tmp_path)), "value_head", require_head=False)


def test_scoring_needs_a_trained_head(tiny_model_dir):
    with pytest.raises(UserError, match=r"holds no reward head \(no 'score.weight'\); train one with train_rm"):
        load_reward_model(ModelConfig(pretrain=tiny_model_dir), "score")
