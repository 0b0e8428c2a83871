"""PPO building blocks on a tiny model: the critic's per-token values, the rollout layout and the
batch-size checks of train_ppo."""

from __future__ import annotations

import pytest
import torch

from openrl_ckpt.errors import UserError


def test_critic_values_at_every_position_match_the_reward_at_the_last(tiny_model_dir) -> None:
    from openrl_ckpt.models.actor import ModelConfig
    from openrl_ckpt.models.reward import load_reward_model

    model = load_reward_model(ModelConfig(pretrain=tiny_model_dir), "score", require_head=False).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        values = model(ids, attention_mask=mask, all_values=True)
        reward = model(ids, attention_mask=mask)
    assert values.shape == (2, 4)
    torch.testing.assert_close(values[[0, 1], [3, 2]], reward)


def test_layout_puts_prompts_right_aligned_and_answers_after() -> None:
    from openrl_ckpt.data.padding import left_pad
    from openrl_ckpt.inference.generation import Generation
    from openrl_ckpt.trainers.ppo.experience import last_token_index, layout_rollout

    pad = 0
    ids1, m1 = left_pad([[3, 4], [5]], pad)
    g1 = Generation(torch.cat([ids1, torch.tensor([[7, 2], [8, 9]])], 1), torch.tensor([[True, True], [True, True]]),
                    2, [True, False])
    ids2, m2 = left_pad([[6, 6, 6]], pad)
    g2 = Generation(torch.cat([ids2, torch.tensor([[2, 0, 0]])], 1), torch.tensor([[True, False, False]]), 3, [True])
    exp = layout_rollout([(g1, m1), (g2, m2)], pad, torch.device("cpu"))
    assert exp.prompt_len == 3
    assert exp.sequences.tolist() == [[0, 3, 4, 7, 2, 0], [0, 0, 5, 8, 9, 0], [6, 6, 6, 2, 0, 0]]
    assert exp.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    assert exp.position_ids[1].tolist()[2:5] == [0, 1, 2]
    assert last_token_index(exp.action_mask).tolist() == [1, 1, 0]


def test_batch_checks_name_the_numbers() -> None:
    from openrl_ckpt.cli.train_ppo import check_batches, parse_args

    base = ["--pretrain", "p", "--reward_pretrain", "r", "--prompt_data", "d"]
    args = parse_args(base + ["--rollout_batch_size", "3"])
    with pytest.raises(UserError, match="--rollout_batch_size 3 must be a multiple of the world size 2"):
        check_batches(args, 2)
    args = parse_args(base + ["--rollout_batch_size", "4", "--n_samples_per_prompt", "3",
                              "--micro_rollout_batch_size", "4"])
    with pytest.raises(UserError, match=r"= 12 samples must be a multiple of --micro_rollout_batch_size 4 x world "
                                        r"size 2 = 8"):
        check_batches(args, 2)
    args = parse_args(base + ["--rollout_batch_size", "4", "--micro_rollout_batch_size", "2",
                              "--train_batch_size", "8"])
    with pytest.raises(UserError, match="= 4 samples must be a multiple of --train_batch_size 8"):
        check_batches(args, 2)
    args = parse_args(base + ["--rollout_batch_size", "8", "--n_samples_per_prompt", "2",
                              "--micro_rollout_batch_size", "4", "--train_batch_size", "8"])
    assert check_batches(args, 2) == 16


FLAG_ERRORS = [
    (["--enable_ema", "--zero_stage", "3"], "--enable_ema with --zero_stage 3: not supported by train_ppo yet"),
    (["--lora_rank", "8"], "--lora_rank: not supported by train_ppo yet"),
    (["--advantage_estimator", "rloo"], "--advantage_estimator rloo compares the samples of each prompt"),
    (["--ptx_coef", "0", "--pretrain_data", "d"], "--ptx_coef must be positive with --pretrain_data, got 0.0"),
    (["--advantage_estimator", "reinforce_baseline"], "reinforce_baseline compares the samples of each prompt"),
    (["--remote_rm_url", "http://127.0.0.1:1/get_reward"], "give the reward as --reward_pretrain .* or "
     "--remote_rm_url .*, one of the two"),
    (["--label_key", "answer"], "--label_key sends a column to the reward server: it needs --remote_rm_url"),
    (["--use_kl_loss", "--init_kl_coef", "0"], "--use_kl_loss needs a reference model"),
    (["--reward_clip_range", "1", "-1"], "--reward_clip_range needs low < high"),
    (["--generate_max_len", "0"], "--generate_max_len must be at least 1, got 0"),
]
def test_vllm_engines_are_train_ppo_rays() -> None:
    from openrl_ckpt.cli.train_ppo import main

    with pytest.raises(UserError, match="vLLM rollout engines run under train_ppo_ray"):
        main(["--pretrain", "p", "--reward_pretrain", "r", "--prompt_data", "d", "--vllm_num_engines", "1"])


@pytest.mark.parametrize("extra, message", FLAG_ERRORS)
def test_flag_checks(extra: list[str], message: str) -> None:
    from openrl_ckpt.cli.train_ppo import check_args, parse_args

    args = parse_args(["--pretrain", "p", "--reward_pretrain", "r", "--prompt_data", "d", *extra])
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        check_args(args)


def test_whiten_takes_out_the_mean_and_optionally_the_scale() -> None:
    from openrl_ckpt.trainers.ppo.experience import whiten

    x = torch.tensor([[1.0, 3.0, 99.0], [5.0, 7.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # masked positions count for nothing
    mean, std = 4.0, 5.0 ** 0.5  # of 1, 3, 5, 7
    assert torch.allclose(whiten(x, mask, dict), (x - mean) / std * mask, atol=1e-6)
    assert torch.equal(whiten(x, mask, dict, divide_by_std=False), (x - mean) * mask)  # --no_advantage_std_norm
