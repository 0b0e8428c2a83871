"""Step functions of RM, DPO and KTO on a tiny model in-process (no DeepSpeed): values at the start,
one reference forward per micro batch, the KL estimate shared over ranks."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM

from openrl_ckpt.data.collate import kto_collate, pair_collate
from openrl_ckpt.errors import UserError
from openrl_ckpt.models.loss import dpo_loss, pairwise_sigmoid_loss
from openrl_ckpt.strategy.deepspeed import FrozenModel
from openrl_ckpt.trainers.dpo import DPOAlgorithm
from openrl_ckpt.trainers.kto import KTOAlgorithm
from openrl_ckpt.trainers.rm import RewardModelAlgorithm

CPU = torch.device("cpu")
PAIRS = [{"chosen_ids": [5, 6, 7, 2], "rejected_ids": [5, 6, 9, 10, 2], "chosen_start": 2, "rejected_start": 2,
          "margin": 0.0, "index": 0},
         {"chosen_ids": [8, 11, 2], "rejected_ids": [8, 12, 2], "chosen_start": 1, "rejected_start": 1,
          "margin": 0.5, "index": 1}]
ROWS = [{"prompt_ids": [5, 6], "answer_ids": [7, 2], "label": True, "index": 0},
        {"prompt_ids": [8], "answer_ids": [12, 13, 2], "label": False, "index": 1}]


class Counting(FrozenModel):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__(module, CPU, move=False)
        self.calls = 0

    def __call__(self, **inputs):
        self.calls += 1
        return super().__call__(**inputs)


@pytest.fixture()
def policy_and_reference(tiny_model_dir):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return policy, Counting(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())


def test_dpo_starts_at_log_2_with_one_reference_forward(policy_and_reference):
    policy, reference = policy_and_reference
    algo = DPOAlgorithm(policy, reference, CPU, partial(dpo_loss, beta=0.1), beta=0.1, nll_loss_coef=0.5,
                        reference_identity={"path": "ref", "fingerprint": "abc"})
    out = algo.train_step(pair_collate(PAIRS, pad_token_id=0))
    assert reference.calls == 1, "the reference sees the batch once"
    # policy == reference: every implicit reward is 0 and the DPO loss is -log sigmoid(0) = log 2
    assert out.metrics["chosen_reward"] == 0.0 and out.metrics["reward_margin"] == 0.0
    assert abs(out.metrics["loss"] - math.log(2)) < 1e-6
    assert abs(out.loss.item() - (math.log(2) + 0.5 * out.metrics["nll_loss"])) < 1e-5
    out.loss.backward()
    assert any(p.grad is not None for p in policy.parameters())


def test_dpo_resume_refuses_another_reference(policy_and_reference):
    policy, reference = policy_and_reference
    algo = DPOAlgorithm(policy, reference, CPU, partial(dpo_loss, beta=0.1), beta=0.1,
                        reference_identity={"path": "new", "fingerprint": "def"})
    algo.load_state_dict({"reference": {"path": "new", "fingerprint": "def"}})
    with pytest.raises(UserError, match="--ref_pretrain new: not the model this run started with"):
        algo.load_state_dict({"reference": {"path": "old", "fingerprint": "abc"}})


def test_dpo_eval_skips_padding_rows(policy_and_reference):
    policy, reference = policy_and_reference
    algo = DPOAlgorithm(policy, reference, CPU, partial(dpo_loss, beta=0.1), beta=0.1)
    padded = [PAIRS[0], dict(PAIRS[1], index=-2)]  # an evaluation sampler's padding has a negative index
    with torch.no_grad():  # as Trainer.evaluate runs it
        sums = algo.eval_step(pair_collate(padded, pad_token_id=0))
    assert sums["eval_loss"][1] == 1.0 and abs(sums["eval_loss"][0] - math.log(2)) < 1e-6


@pytest.mark.parametrize("vanilla", [False, True])
def test_kto_starts_at_half_weight_and_averages_the_kl_over_ranks(policy_and_reference, vanilla):
    policy, reference = policy_and_reference
    seen = []

    def mean_over_ranks(value: float) -> float:
        seen.append(value)
        return value + 1.0  # as if another rank's estimate were higher

    algo = KTOAlgorithm(policy, reference, CPU, beta=0.1, desirable_weight=1.0, undesirable_weight=3.0,
                        vanilla=vanilla, mean_over_ranks=mean_over_ranks)
    batch = pair_collate(PAIRS, pad_token_id=0) if vanilla else kto_collate(ROWS, 0, 2, max_len=16)
    out = algo.train_step(batch)
    assert seen == ([0.0, 0.0] if vanilla else [0.0]), "policy == reference: each local estimate is 0"
    # log-ratio 0, reference point 1 (the mean over ranks): w (1 - sigmoid(+-0.1))
    good, bad = 1 - 1 / (1 + math.exp(0.1)), 3.0 * (1 - 1 / (1 + math.exp(-0.1)))
    expected = (good + bad) / 2  # one desirable, one undesirable row (or pair sides) each
    assert abs(out.metrics["loss"] - expected) < 1e-6
    assert reference.calls == (1 if vanilla else 2), "labelled rows once, mismatched rows once"


def test_rm_step_is_the_pairwise_loss_of_its_rewards():
    rewards = torch.tensor([2.0, -1.0, 0.5, 0.0], requires_grad=True)

    def engine(**kw):  # chosen [2, -1], rejected [0.5, 0]
        return rewards
    algo = RewardModelAlgorithm(engine, CPU, pairwise_sigmoid_loss, margin_loss=True)
    out = algo.train_step(pair_collate(PAIRS, pad_token_id=0))
    expected = (-math.log(1 / (1 + math.exp(-1.5))) - math.log(1 / (1 + math.exp(-(-1.0 - 0.0 - 0.5))))) / 2
    assert abs(out.loss.item() - expected) < 1e-6
    assert out.metrics["acc"] == 0.5
    # without --margin_loss the second pair's margin 0.5 is not subtracted
    plain = RewardModelAlgorithm(engine, CPU, pairwise_sigmoid_loss).train_step(pair_collate(PAIRS, pad_token_id=0))
    expected = (-math.log(1 / (1 + math.exp(-1.5))) - math.log(1 / (1 + math.exp(-(-1.0 - 0.0))))) / 2
    assert abs(plain.loss.item() - expected) < 1e-6


def test_packed_and_padded_batches_give_the_same_sequence_logps_and_rewards(tiny_model_dir):
    from openrl_ckpt.models.actor import ModelConfig
    from openrl_ckpt.models.reward import load_reward_model
    from openrl_ckpt.trainers.common import batch_logps, model_inputs

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    lm.config.use_cache = False  # as load_causal_lm sets it: packed rows need it (see collate)
    rm = load_reward_model(ModelConfig(pretrain=tiny_model_dir), require_head=False).eval()
    padded, packed = pair_collate(PAIRS, pad_token_id=0), pair_collate(PAIRS, pad_token_id=0, packing=True)
    with torch.no_grad():
        assert torch.allclose(batch_logps(lm, padded, CPU)[0], batch_logps(lm, packed, CPU)[0], atol=1e-4)
        rewards = [rm(**model_inputs(b, CPU), last_index=b["last"]) for b in (padded, packed)]
    assert torch.allclose(*rewards, atol=1e-5)
