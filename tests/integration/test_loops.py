"""The rejection sampling and iterative DPO loop scripts, 2 iterations each on the tiny models (one
process per stage): killed in the middle of an iteration's training stage, then rerun with the same
command, each loop continues where it stopped: finished stages are skipped, the training stage
resumes from its checkpoint, and the loop ends with the right iteration count, files and a final
model that loads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from launch import DATA, REPO, run, weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loop_assets(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    """8 short prompts (2 iterations of 4) and a reward model with a random head."""
    from openrl_ckpt.utils.tiny import build_reward_model

    out = tmp_path_factory.mktemp("loop_assets")
    rows = [json.loads(line) for line in (DATA / "prompts.jsonl").read_text().splitlines()]
    short = [r for r in rows if len(r["prompt"]) < 100][:8]
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    return {"prompts": str(out / "prompts.jsonl"), "rm": build_reward_model(str(out / "rm"), tiny_model_dir, seed=3)}


def loop_env(work: Path, policy: str, assets: dict[str, str], iters: int) -> dict[str, str]:
    return dict(POLICY_MODEL_PATH=policy, REWARD_MODEL_PATH=assets["rm"], DATASET=assets["prompts"],
                INPUT_KEY="prompt", INPUT_TEMPLATE="User: {}\nAssistant: ", WORK_DIR=str(work),
                TRAINING_ITERS=str(iters), ROLLOUT_BATCH_SIZE="4", BEST_OF_N="3", MAX_NEW_TOKENS="8", MAX_LEN="128",
                GEN_MICRO_BATCH_SIZE="6", RM_MICRO_BATCH_SIZE="6", TRAIN_BATCH_SIZE="2", MICRO_TRAIN_BATCH_SIZE="1",
                LEARNING_RATE="1e-3", SAVE_STEPS="1", LAUNCH=f"{sys.executable} -m", GEN_EXTRA="", RM_EXTRA="",
                TRAIN_EXTRA="--zero_stage 0")


def run_script(name: str, env: dict[str, str], kill_when: str | None = None):
    return run(["bash", str(REPO / "examples" / "scripts" / name)], kill_when=kill_when, **env)


def assert_trained_and_loads(model: Path, before: str) -> None:
    from openrl_ckpt.models.actor import ModelConfig, load_causal_lm

    load_causal_lm(ModelConfig(pretrain=str(model)))
    new, old = weights(model), weights(Path(before))
    assert any(not torch.equal(new[k], old[k]) for k in new)


def test_rejection_sampling_loop_resumes_after_a_kill_and_stops_when_prompts_run_out(tmp_path, tiny_model_dir,
                                                                                      loop_assets):
    work = tmp_path / "rs"
    env = loop_env(work, tiny_model_dir, loop_assets, iters=3)  # the 8 prompts last 2 iterations
    first = run_script("train_rejection_sampling.sh", env, kill_when="iter1/ckpt/global_step1 (")
    assert first.returncode != 0 and (work / "iter.log").read_text().strip() == "1"
    assert (work / "iter1" / "rm.jsonl").exists() and not (work / "iter1" / "model").exists()

    second = run_script("train_rejection_sampling.sh", env)
    assert second.returncode == 0, second.output[-3000:]
    assert "iteration 0" not in second.output  # done before the kill
    assert "iter1/generate.jsonl exists, skipped" in second.output and "iter1/rm.jsonl exists, skipped" in second.output
    assert f"resumed from {work}/iter1/ckpt/global_step1: step 1/2" in second.output
    assert "--iter 2 is past the end of the data" in second.output
    assert "the prompts are used up at iteration 2: stopping after 2 iteration(s)" in second.output
    assert (work / "iter.log").read_text().strip() == "2"
    assert sorted(p.name for p in work.iterdir()) == ["iter.log", "iter0", "iter1"]
    for i in (0, 1):  # best_of_n answers per prompt, the best one of each kept; checkpoints dropped once trained
        generated = (work / f"iter{i}" / "generate.jsonl").read_text().splitlines()
        best = [json.loads(line) for line in (work / f"iter{i}" / "rm.jsonl").read_text().splitlines()]
        assert len(generated) == 12 and len(best) == 4 and all("reward" in b for b in best)
        assert sorted(p.name for p in (work / f"iter{i}").iterdir()) == ["generate.jsonl", "model", "rm.jsonl"]
    assert_trained_and_loads(work / "iter1" / "model", str(work / "iter0" / "model"))


def test_iterative_dpo_loop_resumes_after_a_kill(tmp_path, tiny_model_dir, loop_assets):
    work = tmp_path / "dpo"
    env = loop_env(work, tiny_model_dir, loop_assets, iters=2)
    first = run_script("train_iterative_dpo.sh", env, kill_when="iter0/ckpt/global_step1 (")
    assert first.returncode != 0 and not (work / "iter.log").exists()
    assert not (work / "iter0" / "model").exists()

    second = run_script("train_iterative_dpo.sh", env)
    assert second.returncode == 0, second.output[-3000:]
    assert "iter0/generate.jsonl exists, skipped" in second.output and "iter0/rm.jsonl exists, skipped" in second.output
    assert f"resumed from {work}/iter0/ckpt/global_step1: step 1/2" in second.output
    assert f"final policy: {work}/iter1/model" in second.output
    assert (work / "iter.log").read_text().strip() == "2"
    for i in (0, 1):
        pairs = [json.loads(line) for line in (work / f"iter{i}" / "rm.jsonl").read_text().splitlines()]
        assert len(pairs) == 4 and all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    assert_trained_and_loads(work / "iter1" / "model", str(work / "iter0" / "model"))
    assert_trained_and_loads(work / "iter0" / "model", tiny_model_dir)
