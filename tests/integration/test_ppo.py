"""train_ppo end to end on 2 CPU ranks with a tiny actor (attention dropout, so training draws from
the RNG), a critic and a reward model whose head reads a fixed direction of the last hidden state:
the mean reward rises; a kill during a save and a kill -9 mid-run, each followed by the same
command, end with actor and critic equal to the bit to an uninterrupted run; bad input is refused in
one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from forked import run_module
from launch import DATA, assert_bitwise_equal, committed, launch_cmd, run, weights
from test_sft_errors import assert_one_error

pytestmark = pytest.mark.slow

MODULE = "openrl_ckpt.cli.train_ppo"
PROMPT = "Sort these numbers in ascending order: 70, 93, 41"


def _reward_model(out: Path, base: str, scale: float) -> str:
    """A reward model on ``base``'s backbone whose (seeded) head is multiplied by ``scale``."""
    from safetensors.torch import load_file, save_file

    from openrl_ckpt.utils.tiny import build_reward_model

    build_reward_model(str(out), base, seed=3)
    w = load_file(str(out / "model.safetensors"))
    w["score.weight"] = w["score.weight"] * scale
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


@pytest.fixture(scope="module")
def ppo_models(tmp_path_factory, tiny_dropout_model_dir) -> tuple[str, str]:
    """(reward model: rewards spread over several units by the answer's last token; critic: the same
    backbone with a small head, so early value estimates do not drown the advantages)."""
    root = tmp_path_factory.mktemp("ppo_models")
    return _reward_model(root / "rm", tiny_dropout_model_dir, 25.0), _reward_model(root / "critic",
                                                                                  tiny_dropout_model_dir, 1.0)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """32 rows of one prompt: the reward depends on the answer alone, so a rise is the policy's doing."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text(f'{{"prompt": "{PROMPT}"}}\n' * 32)
    return path


def ppo_args(actor: str, models: tuple[str, str], data: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    # 32 prompts, 8 per update step x 4 samples: 4 steps per episode, 3 episodes = 12 steps, saves every 4;
    # a small SFT loss on the shipped SFT questions (--ptx_coef), whose data position is checkpointed, and an
    # EMA of the actor (checkpointed as safetensors; the export holds it)
    return ["--pretrain", actor, "--reward_pretrain", models[0], "--critic_pretrain", models[1],
            "--prompt_data", str(data), "--input_key", "prompt", "--rollout_batch_size", "8",
            "--n_samples_per_prompt", "4", "--micro_rollout_batch_size", "8", "--train_batch_size", "16",
            "--micro_train_batch_size", "4", "--generate_max_len", "2", "--max_epochs", "2", "--num_episodes", "3",
            "--actor_learning_rate", "1e-2", "--critic_learning_rate", "1e-2", "--lr_scheduler", "constant",
            "--lr_warmup_ratio", "0", "--init_kl_coef", "0.01", "--zero_stage", "2", "--save_steps", "4",
            "--ckpt_path", str(ckpt), "--load_checkpoint", "--save_path", str(out), "--save_value_network",
            "--pretrain_data", str(DATA / "sft.jsonl"), "--pretrain_input_key", "question", "--ptx_coef", "0.05",
            "--enable_ema", "--ema_beta", "0.9",
            "--seed", "7", *extra]


def rewards(output: str) -> list[float]:
    return [float(m) for m in re.findall(r"^step \d+/\d+ reward ([0-9.e+-]+)", output, re.M)]


def actor_weights(ckpt: Path, step: int) -> dict:
    """The trained (not averaged) actor weights in a committed checkpoint (DeepSpeed's own file)."""
    return torch.load(ckpt / f"global_step{step}" / "actor" / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)["module"]


def test_ppo_learns_and_resumes_bitwise_after_kills(tmp_path, tiny_dropout_model_dir, ppo_models, prompts):
    ref_out = tmp_path / "ref_out"
    ref = run(launch_cmd(MODULE, ppo_args(tiny_dropout_model_dir, ppo_models, prompts, tmp_path / "ref_ckpt",
                                          ref_out)))
    assert ref.returncode == 0, ref.output[-3000:]
    r = rewards(ref.output)
    assert len(r) == 12
    assert sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 1.0, f"the mean reward does not rise: {r}"
    assert (tmp_path / "ref_out_critic" / "config.json").exists()

    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    cmd = launch_cmd(MODULE, ppo_args(tiny_dropout_model_dir, ppo_models, prompts, ckpt, out))
    # a kill while the step-8 checkpoint is written (files complete, not yet committed)
    first = run(cmd, OPENRL_FAULT="before_commit@8:kill")
    assert first.returncode != 0 and ckpt.exists() and committed(ckpt) == ["global_step4"], first.output[-3000:]
    # the rerun resumes from step 4, commits step 8, and is killed -9 mid-step 10
    second = run(launch_cmd(MODULE, ppo_args(tiny_dropout_model_dir, ppo_models, prompts, ckpt, out)),
                 kill_when="step 10/12")
    assert "step 4/12, epoch 1, 32 samples consumed" in second.output, second.output[-3000:]
    assert second.returncode != 0 and committed(ckpt)[-1] == "global_step8"
    third = run(launch_cmd(MODULE, ppo_args(tiny_dropout_model_dir, ppo_models, prompts, ckpt, out)))
    assert third.returncode == 0, third.output[-3000:]
    assert "step 8/12, epoch 2, 64 samples consumed" in third.output
    assert rewards(third.output) == r[8:], "generation after the resume draws the same samples"
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp-")]
    assert_bitwise_equal(weights(ref_out), weights(out))  # the EMA
    assert_bitwise_equal(actor_weights(tmp_path / "ref_ckpt", 12), actor_weights(ckpt, 12))
    assert (ckpt / "global_step12" / "ema.safetensors").exists()
    raw, ema = actor_weights(ckpt, 12), weights(out)
    assert any(not torch.equal(raw[k], ema[k]) for k in ema), "the export holds the average, not the last weights"
    assert_bitwise_equal(weights(tmp_path / "ref_out_critic"), weights(tmp_path / "out_critic"))


def test_ppo_bad_input_is_one_line(tmp_path, tiny_model_dir, tiny_dropout_model_dir, ppo_models, prompts):
    from openrl_ckpt.utils.tiny import build_reward_model, build_tiny_model, build_tiny_tokenizer, example_texts

    def args(*extra: str) -> list[str]:
        return ppo_args(tiny_dropout_model_dir, ppo_models, prompts, tmp_path / "ckpt", tmp_path / "out", *extra)

    build_tiny_tokenizer(str(tmp_path / "tok"), example_texts(), vocab_size=300)
    other_rm = build_reward_model(str(tmp_path / "other_rm"), build_tiny_model(str(tmp_path / "other"),
                                                                                str(tmp_path / "tok")))
    # one process each, forked from this one (forked.py: the imports are paid once)
    res = run_module(MODULE, args("--reward_pretrain", other_rm), timeout=300)
    assert_one_error(res, f"--reward_pretrain {other_rm}: its tokenizer differs from --pretrain's",
                     "vocabulary sizes 512 and 300", "--allow_tokenizer_mismatch")
    # with the flag, that reward model scores the decoded text (two steps, one process)
    res = run_module(MODULE, args("--reward_pretrain", other_rm, "--allow_tokenizer_mismatch", "--max_samples",
                                  "16", "--num_episodes", "1", "--save_steps", "-1"), timeout=300)
    assert res.returncode == 0, res.output[-3000:]
    assert len(rewards(res.output)) == 2
    res = run_module(MODULE, args("--prompt_max_len", "3"), timeout=300)
    assert_one_error(res, f"--prompt_data {prompts}: all 32 prompts are empty or longer than --prompt_max_len 3")
    res = run_module(MODULE, args("--micro_rollout_batch_size", "5"), timeout=300)
    assert_one_error(res, "--rollout_batch_size 8 x --n_samples_per_prompt 4 = 32 samples must be a multiple of "
                          "--micro_rollout_batch_size 5 x world size 1 = 5")
