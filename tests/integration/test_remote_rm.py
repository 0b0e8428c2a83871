"""serve_rm as a real HTTP server on 127.0.0.1 and the clients that reach it with --remote_rm_url:
batch_inference --eval_task rm gets the rewards the model gives (normalised as train_rm stored them);
train_ppo (reinforce_baseline, --use_kl_loss, --label_key) whose server dies mid-run retries, stops
with one error line and its last checkpoint intact, and the same command, once a server is back,
ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from forked import run_module
from launch import DATA, REPO, assert_bitwise_equal, committed, env, free_port, launch_cmd, run, weights
from test_sft_errors import assert_one_error

pytestmark = pytest.mark.slow

MEAN, STD = 0.5, 2.0


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model_dir) -> str:
    from openrl_ckpt.utils.tiny import build_reward_model

    return build_reward_model(str(tmp_path_factory.mktemp("rm") / "rm"), tiny_model_dir, seed=3, mean=MEAN, std=STD)


@contextmanager
def serve_rm(model: str, port: int, **fault: str) -> Iterator[subprocess.Popen]:
    """``python -m openrl_ckpt.cli.serve_rm`` until it answers; SIGTERM (or what is left of it) at the end.
    One text per forward pass: a reward then never depends on which requests shared its pass, so reruns
    are comparable to the bit."""
    cmd = launch_cmd("openrl_ckpt.cli.serve_rm", ["--reward_pretrain", model, "--host", "127.0.0.1", "--port",
                                                   str(port), "--normalize_reward", "--batch_size", "1"], ranks=0)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=env(**fault), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            try:
                with socket_ready(port):
                    break
            except OSError:
                time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@contextmanager
def socket_ready(port: int) -> Iterator[None]:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=1):
        yield


def raw_rewards(model: str, texts: list[str]) -> list[float]:
    """The head's own outputs (the stored normalisation off), each text alone."""
    from openrl_ckpt.models.actor import ModelConfig, load_tokenizer
    from openrl_ckpt.models.reward import load_reward_model, reward_token_ids

    rm = load_reward_model(ModelConfig(pretrain=model), require_head=True).eval()
    rm.config.normalize_reward = False
    with torch.no_grad():
        return [rm(input_ids=torch.tensor([ids])).item() for ids in reward_token_ids(load_tokenizer(model), texts,
                                                                                      2048)]


@pytest.fixture(scope="module")
def rm_port() -> int:
    """The one port of this module's reward servers: the dying one, then the healthy one."""
    return free_port()


@pytest.fixture(scope="module")
def healthy_server(reward_model, rm_port) -> Iterator[str]:
    """One healthy serve_rm for the module (its URL). The PPO test runs first and asks for it only once its
    dying server is gone, so both serve the same --remote_rm_url; the scoring test reuses it."""
    with serve_rm(reward_model, rm_port):
        yield f"http://127.0.0.1:{rm_port}/get_reward"


def ppo_cmd(actor: str, url: str, prompts: Path, ckpt: Path, out: Path) -> list[str]:
    # 16 prompts, 4 per step x 2 samples: 4 steps, a checkpoint after each; one reward request per rank per step
    return launch_cmd("openrl_ckpt.cli.train_ppo", [
        "--pretrain", actor, "--remote_rm_url", url, "--remote_rm_retries", "2", "--remote_rm_timeout", "20",
        "--prompt_data", str(prompts), "--input_key", "prompt", "--label_key", "answer",
        "--advantage_estimator", "reinforce_baseline", "--use_kl_loss", "--kl_estimator", "k3",
        "--rollout_batch_size", "4", "--n_samples_per_prompt", "2", "--micro_rollout_batch_size", "4",
        "--train_batch_size", "8", "--micro_train_batch_size", "4", "--generate_max_len", "3",
        "--actor_learning_rate", "1e-2", "--lr_scheduler", "constant", "--lr_warmup_ratio", "0",
        "--zero_stage", "2", "--save_steps", "1", "--ckpt_path", str(ckpt), "--load_checkpoint",
        "--save_path", str(out), "--seed", "11"])


def test_ppo_with_a_reward_server_that_dies_resumes_bitwise(tmp_path, tiny_dropout_model_dir, reward_model, rm_port,
                                                            request):
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(line) for line in (DATA / "prompts.jsonl").read_text().splitlines()[:16]]
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": str(i)}) + "\n"
                               for i, r in enumerate(rows)))
    port = rm_port
    url = f"http://127.0.0.1:{port}/get_reward"
    # the server dies at its 5th request: the first of step 3 (2 ranks x 2 steps before it)
    with serve_rm(reward_model, port, OPENRL_FAULT="reward_request@5:kill"):
        broken = run(ppo_cmd(tiny_dropout_model_dir, url, prompts, tmp_path / "ckpt", tmp_path / "out"))
    assert_one_error(broken, "--remote_rm_url", "no reward after 3 tries", "last checkpoint is intact")
    assert committed(tmp_path / "ckpt") == ["global_step1", "global_step2"]
    from openrl_ckpt.checkpoint.inspect import verify

    assert verify(tmp_path / "ckpt" / "global_step2") == []
    # the server is back on the same port: the module's healthy one, started now (the dying one held the port)
    assert request.getfixturevalue("healthy_server") == url
    resumed = run(ppo_cmd(tiny_dropout_model_dir, url, prompts, tmp_path / "ckpt", tmp_path / "out"))
    reference = run(ppo_cmd(tiny_dropout_model_dir, url, prompts, tmp_path / "ref_ckpt", tmp_path / "ref_out"))
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert reference.returncode == 0, reference.output[-3000:]
    assert "resumed" in resumed.output.lower() and "global_step2" in resumed.output, resumed.output[-3000:]
    assert committed(tmp_path / "ckpt")[-1] == "global_step4"
    assert_bitwise_equal(weights(tmp_path / "out"), weights(tmp_path / "ref_out"))


def test_serve_rm_scores_and_batch_inference_reads_it(tmp_path, reward_model, healthy_server):
    rows = [json.loads(line) for line in (DATA / "preference.jsonl").read_text().splitlines()[:6]]
    data = tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps({"input": r["prompt"], "output": r["chosen"]}) + "\n" for r in rows))
    url = healthy_server
    texts = [r["prompt"] + r["chosen"] for r in rows]
    request = urllib.request.Request(url, data=json.dumps({"query": texts}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        served = json.loads(response.read())["rewards"]
    res = run_module("openrl_ckpt.cli.batch_inference", [  # one process, forked from this one (forked.py)
        "--eval_task", "rm", "--remote_rm_url", url, "--dataset", str(data), "--input_key", "input",
        "--output_key", "output", "--output_path", str(tmp_path / "scored.jsonl"), "--micro_batch_size", "4"])
    assert res.returncode == 0, res.output[-3000:]
    assert served == pytest.approx([(r - MEAN) / STD for r in raw_rewards(reward_model, texts)], abs=1e-5)
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [s["reward"] for s in scored] == pytest.approx(served, abs=1e-6)
    assert [s["input"] for s in scored] == [r["prompt"] for r in rows]
