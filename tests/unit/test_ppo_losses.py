"""PPO's pure pieces against hand-computed examples: GAE, returns, clipped policy and value losses, KL
estimators, KL controllers, the running reward normaliser and the group baselines."""

from __future__ import annotations

import math

import pytest
import torch

from openrl_ckpt.models.loss import (
    KLEstimator,
    discounted_returns,
    gae,
    kl_estimate,
    kl_loss,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
)
from openrl_ckpt.trainers.ppo.control import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    group_mean_baseline,
    group_norm,
    rloo_baseline,
)


def close(a: torch.Tensor, b: list) -> None:
    torch.testing.assert_close(a, torch.tensor(b, dtype=a.dtype), rtol=0, atol=1e-6)


def test_gae_by_hand() -> None:
    # gamma 0.9, lambda 0.8 (gamma * lambda = 0.72); row 2's last position is padding (masked out)
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lambd=0.8)
    # row 1: d2 = 1 - 0.7 = 0.3; d1 = 0.9*0.7 - 0.6 = 0.03, A1 = 0.03 + 0.72*0.3 = 0.246;
    #        d0 = 0.9*0.6 - 0.5 = 0.04, A0 = 0.04 + 0.72*0.246 = 0.21712
    # row 2: A1 = 1 - 0.4 = 0.6; d0 = 0.9*0.4 - 0.2 = 0.16, A0 = 0.16 + 0.72*0.6 = 0.592
    close(adv, [[0.21712, 0.246, 0.3], [0.592, 0.6, 0.0]])
    close(ret, [[0.71712, 0.846, 1.0], [0.792, 1.0, 0.0]])


def test_discounted_returns_by_hand() -> None:
    out = discounted_returns(torch.tensor([[1.0, 0.0, 2.0, 7.0]]), torch.tensor([[1, 1, 1, 0]]), gamma=0.5)
    close(out, [[1.5, 1.0, 2.0, 0.0]])  # G2 = 2, G1 = 0 + 0.5*2, G0 = 1 + 0.5*1


def test_policy_loss_clips_by_hand() -> None:
    logp = torch.log(torch.tensor([[1.5, 0.5, 3.0]]))
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding and must not count
    loss, clipfrac = ppo_policy_loss(logp, old, adv, mask, eps_clip=0.2)
    # token 0: rho 1.5, min(1.5, 1.2) = 1.2; token 1: rho 0.5, min(-0.5, -0.8) = -0.8
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clipfrac.item() == pytest.approx(1.0)
    loss, clipfrac = ppo_policy_loss(torch.log(torch.tensor([[1.1, 0.9]])), torch.zeros(1, 2),
                                     torch.tensor([[2.0, 2.0]]), torch.ones(1, 2), eps_clip=0.2)
    assert loss.item() == pytest.approx(-(1.1 * 2 + 0.9 * 2) / 2) and clipfrac.item() == 0.0  # inside the range


def test_value_loss_clips_by_hand() -> None:
    values = torch.tensor([[0.2, 2.0, 100.0]])
    old = torch.tensor([[1.0, 2.0, 0.0]])
    returns = torch.tensor([[0.0, 2.5, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: (0.2 - 0)^2 = 0.04, clipped 1.0 - 0.2 = 0.8 -> 0.64; token 1: 0.25 both ways
    assert ppo_value_loss(values, old, returns, mask, value_clip=0.2).item() == pytest.approx(0.5 * (0.64 + 0.25) / 2)
    assert ppo_value_loss(values, old, returns, mask, value_clip=None).item() == pytest.approx(0.5 * (0.04 + 0.25) / 2)


def test_kl_estimators_by_hand() -> None:
    logp, ref = torch.tensor([[0.0]]), torch.tensor([[-math.log(2.0)]])  # x = log 2
    x = math.log(2.0)
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(x)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(x * x / 2)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + x)  # exp(-x) - 1 + x
    assert kl_estimate(ref, logp, "k3").item() == pytest.approx(2 - 1 - x)  # never negative either way
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


def test_masked_mean() -> None:
    assert masked_mean(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]])).item() == 2.0


def test_kl_controllers_by_hand() -> None:
    fixed = FixedKLController(0.1)
    fixed.update(50.0, 1000)
    assert fixed.value == 0.1
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 1000)  # error clip(9/6 - 1) = 0.2 -> x (1 + 0.2 * 0.1)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(5.7, 1000)  # error -0.05 -> x (1 - 0.005)
    assert ctl.value == pytest.approx(0.102 * 0.995)
    again = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    again.load_state_dict(ctl.state_dict())
    assert again.value == ctl.value


def test_running_moments_by_hand() -> None:
    m = RunningMoments()
    m.update(6.0, 14.0, 3)  # [1, 2, 3]
    assert (m.mean, m.var, m.count) == (pytest.approx(2.0), pytest.approx(2 / 3), 3)
    m.update(4.0, 16.0, 1)  # + [4]: mean 2.5, population variance 1.25
    assert (m.mean, m.var, m.count) == (pytest.approx(2.5), pytest.approx(1.25), 4)
    close(m.normalize(torch.tensor([2.5, 2.5 + math.sqrt(1.25)])), [0.0, 1.0])
    restored = RunningMoments()
    restored.load_state_dict(m.state_dict())
    assert restored.state_dict() == m.state_dict()


def test_rloo_and_group_norm_by_hand() -> None:
    close(rloo_baseline(torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0]), 3), [-1.5, 0.0, 1.5, -15.0, 0.0, 15.0])
    s = 1 / math.sqrt(2)  # [1, 3]: mean 2, unbiased std sqrt(2)
    close(group_norm(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2), [-s, s, 0.0, 0.0])
    # reinforce_baseline: minus the mean of all the prompt's samples (2 and 20)
    close(group_mean_baseline(torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0]), 3), [-1.0, 0.0, 1.0, -10.0, 0.0, 10.0])


def test_kl_loss_by_hand() -> None:
    # x = logp - ref = [0.5, -1.0 | 2.0 (masked)]; k2 = x^2 / 2 = [0.125, 0.5]: mean over the 2 answer tokens
    logp, ref = torch.tensor([[0.0, -1.0, 2.0]]), torch.tensor([[-0.5, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    assert kl_loss(logp, ref, mask, KLEstimator.K2).item() == pytest.approx((0.125 + 0.5) / 2)
    assert kl_loss(logp, ref, mask, KLEstimator.K1).item() == pytest.approx((0.5 - 1.0) / 2)


def test_ema_by_hand(tmp_path) -> None:
    from openrl_ckpt.checkpoint.contents import TensorFile
    from openrl_ckpt.trainers.ppo.ema import EMA_FILE, EmaWeights

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema = EmaWeights(model, beta=0.75)
    with torch.no_grad():
        model.weight.fill_(6.0)
    ema.update(model)  # 0.75 * 2 + 0.25 * 6 = 3
    assert ema.tensors["weight"].item() == 3.0
    TensorFile(EMA_FILE, ema.snapshot()).write(tmp_path)  # what each checkpoint holds
    again = EmaWeights(model, beta=0.75)
    again.load(tmp_path / "ema.safetensors")
    again.copy_to(model)
    assert model.weight.item() == 3.0
