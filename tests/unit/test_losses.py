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


# ---- preference losses, each against its formula written out with math on plain floats

from openrl_ckpt.models.loss import (  # noqa: E402
    dpo_loss,
    ipo_loss,
    kto_loss,
    pairwise_logexp_loss,
    pairwise_sigmoid_loss,
    sequence_logps,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_pairwise_losses_with_margin():
    c, r, m = _t(1.5, -0.2, 3.0), _t(0.5, 0.3, -1.0), _t(0.0, 0.25, 2.0)
    for i in range(3):
        expected_sigmoid = -math.log(_sigmoid(c[i].item() - r[i].item() - m[i].item()))
        expected_logexp = math.log(1 + math.exp(r[i].item() - c[i].item() + m[i].item()))
        assert abs(pairwise_sigmoid_loss(c, r, m)[i].item() - expected_sigmoid) < 1e-12
        assert abs(pairwise_logexp_loss(c, r, m)[i].item() - expected_logexp) < 1e-12


def test_pairwise_logexp_does_not_overflow():
    loss = pairwise_logexp_loss(_t(-1000.0), _t(1000.0), _t(0.0))
    assert loss.item() == 2000.0


def test_dpo_sigmoid_loss():
    pc, pr, rc, rr, beta = -10.0, -14.0, -11.0, -12.5, 0.1
    h = (pc - rc) - (pr - rr)  # 1 - (-1.5) = 2.5
    expected = -math.log(_sigmoid(beta * h))
    assert abs(dpo_loss(_t(pc), _t(pr), _t(rc), _t(rr), beta).item() - expected) < 1e-12


def test_cdpo_label_smoothing():
    pc, pr, rc, rr, beta, eps = -3.0, -2.0, -3.5, -1.0, 0.5, 0.2
    h = (pc - rc) - (pr - rr)
    expected = -(1 - eps) * math.log(_sigmoid(beta * h)) - eps * math.log(_sigmoid(-beta * h))
    assert abs(dpo_loss(_t(pc), _t(pr), _t(rc), _t(rr), beta, eps).item() - expected) < 1e-12


def test_ipo_loss():
    pc, pr, rc, rr, beta = -1.2, -2.0, -1.0, -1.5, 0.25
    expected = (((pc - rc) - (pr - rr)) - 1 / (2 * beta)) ** 2
    assert abs(ipo_loss(_t(pc), _t(pr), _t(rc), _t(rr), beta).item() - expected) < 1e-12


def test_kto_desirable_and_undesirable_terms_with_clamped_kl():
    policy, ref = _t(-5.0, -7.0), _t(-6.0, -6.5)
    desirable = torch.tensor([True, False])
    beta, wd, wu = 0.3, 1.5, 0.7
    for kl in (0.4, -2.0):  # a negative estimate is clamped to 0
        z = max(kl, 0.0)
        expected = [wd * (1 - _sigmoid(beta * ((-5.0 + 6.0) - z))), wu * (1 - _sigmoid(beta * (z - (-7.0 + 6.5))))]
        got = kto_loss(policy, ref, desirable, _t(kl)[0], beta, wd, wu)
        assert torch.allclose(got, _t(*expected), atol=1e-12)


def test_kto_kl_reference_point_carries_no_gradient():
    policy = torch.tensor([-1.0], requires_grad=True)
    kl = (policy * -3).sum()  # 3.0, built from the policy as the estimate is; not clamped
    kto_loss(policy, torch.tensor([-2.0]), torch.tensor([True]), kl, 0.1).sum().backward()
    s = _sigmoid(0.1 * ((-1.0 + 2.0) - 3.0))
    assert abs(policy.grad.item() - (-0.1 * s * (1 - s))) < 1e-7


def test_sequence_logps_sums_each_sequence_in_padded_and_packed_batches():
    from openrl_ckpt.data.collate import sequence_batch

    torch.manual_seed(0)
    seqs, starts = [[3, 4, 5, 6], [7, 8], [1, 2, 3]], [2, 1, 0]
    table = torch.randn(10, 10)  # logits depend on the current token only, so packing changes nothing
    sums = {}
    for packing in (False, True):
        b = sequence_batch(seqs, starts, pad_token_id=0, packing=packing)
        logits = table[b["input_ids"]]
        sums[packing], counts = sequence_logps(logits, b["input_ids"], b["loss_mask"], b["segment"], 3)
        assert counts.tolist() == [2.0, 1.0, 2.0]  # targets from max(start, 1) to the end
    logp = torch.log_softmax(table, -1)
    expected = [logp[4, 5] + logp[5, 6], logp[7, 8], logp[1, 2] + logp[2, 3]]
    assert torch.allclose(sums[False], torch.stack(expected), atol=1e-6)
    assert torch.allclose(sums[True], torch.stack(expected), atol=1e-6)


def test_kd_forward_and_reverse_losses():
    from openrl_ckpt.models.loss import kd_forward_loss, kd_reverse_loss

    # one sequence of 3 tokens, vocab 2; position 0 predicts token 1 (a target), position 1 predicts token 2 (not)
    student = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[False, True, False]])
    ps = [math.exp(0) / (1 + math.e), math.e / (1 + math.e)]
    pt = [math.e / (1 + math.e), 1 / (1 + math.e)]
    forward = -sum(t * math.log(s) for t, s in zip(pt, ps))
    reverse = sum(s * (math.log(s) - math.log(t)) for t, s in zip(pt, ps))
    assert abs(kd_forward_loss(student, teacher, mask).item() - forward) < 1e-6
    assert abs(kd_reverse_loss(student, teacher, mask).item() - reverse) < 1e-6
    assert kd_reverse_loss(teacher, teacher, mask).item() < 1e-7  # KL of a distribution to itself
