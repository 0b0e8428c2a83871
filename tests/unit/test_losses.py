import math

import torch

from openrl_ckpt.models.loss import sft_loss, token_logprobs


def test_sft_loss_matches_hand_computed_cross_entropy():
    # vocab 3, one sequence of 3 tokens; logits chosen so the softmaxes are easy to write out
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    input_ids = torch.tensor([[2, 1, 0]])
    loss_mask = torch.tensor([[False, True, True]])
    # token 1 predicted from uniform logits: -log(1/3); token 0 from [1,0,0]: -log(e/(e+2))
    expected = (math.log(3) + -math.log(math.e / (math.e + 2))) / 2
    loss, count = sft_loss(logits, input_ids, loss_mask)
    assert count.item() == 2
    assert abs(loss.item() - expected) < 1e-6


def test_sft_loss_ignores_masked_tokens():
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3] = True
    loss, count = sft_loss(logits, ids, mask)
    assert count.item() == 1
    assert torch.allclose(loss, -token_logprobs(logits, ids)[0, 2])
