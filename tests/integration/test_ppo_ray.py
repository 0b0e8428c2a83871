"""train_ppo_ray on one local Ray cluster (started once for this module, as a user starts a head) with
a vLLM engine on CPU: the docs' ``ray job submit`` run learns and is the reference; the same command run
with ``python -m``, through a kill -9 of an actor rank (``--max_restarts`` recreates the groups), a kill
-9 of the driver in the middle of a save, a SIGTERM (preemption) and a final rerun, ends with actor and
critic equal to the bit to the reference; bad input is one line, before any checkpoint is touched."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from forked import run_module
from launch import REPO, Result, env, free_port, launch_cmd, run

pytestmark = pytest.mark.slow
pytest.importorskip("ray")
pytest.importorskip("vllm", reason="the Ray PPO tests roll out with vLLM's CPU build (scripts/setup.sh installs it)")

MODULE = "openrl_ckpt.cli.train_ppo_ray"
RAY = str(Path(sys.executable).with_name("ray"))
PROMPT = "Sort these numbers in ascending order: 70, 93, 41"
CLUSTER_CPUS = 6  # logical: 5 bundles (actor 2, reference 1, critic + reward 1, one engine); 2 real cores


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head as ``ray start --head`` makes one (dashboard included, for ``ray job submit``), in a
    temp folder of its own; stopped (its whole process group) at the end."""
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit
    port, dashboard = free_port(), free_port()
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--num-cpus={CLUSTER_CPUS}", "--num-gpus=0",
                             f"--port={port}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                             "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env(RAY_AUTH_MODE="disabled"), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=REPO)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while subprocess.run([RAY, "status", f"--address={address}"], capture_output=True,
                         env=env(RAY_AUTH_MODE="disabled")).returncode != 0:
        assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
        time.sleep(1)
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}"}
    head.send_signal(signal.SIGTERM)  # --block: the head stops the cluster's processes it started
    try:
        head.wait(timeout=60)
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, str]:
    """An actor whose heads are 32 wide (vLLM's CPU attention needs that) with attention dropout (training
    draws from the RNG), a reward model and a critic on its backbone, and 32 prompts."""
    from safetensors.torch import load_file, save_file

    from openrl_ckpt.utils.tiny import build_reward_model, build_tiny_model

    root = tmp_path_factory.mktemp("ray_models")
    actor = build_tiny_model(str(root / "actor"), tiny_tokenizer_dir, num_heads=2, num_kv_heads=2,
                             attention_dropout=0.1)
    models = {"actor": actor}
    for name, scale in (("rm", 25.0), ("critic", 1.0)):
        build_reward_model(str(root / name), actor, seed=3)
        w = load_file(str(root / name / "model.safetensors"))
        w["score.weight"] = w["score.weight"] * scale  # rewards spread over several units
        save_file(w, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        models[name] = str(root / name)
    prompts = root / "prompts.jsonl"
    prompts.write_text(f'{{"prompt": "{PROMPT}"}}\n' * 32)
    models["prompts"] = str(prompts)
    return models


def ray_args(models: dict[str, str], ckpt: Path, out: Path, *extra: str) -> list[str]:
    # 32 prompts, 8 per step x 4 samples: 4 steps, a save every 2; actor 2 ranks (ZeRO-2), reference 1,
    # critic and reward colocated on 1 bundle, one vLLM engine (its weights synced over gloo every step)
    return ["--pretrain", models["actor"], "--reward_pretrain", models["rm"], "--critic_pretrain", models["critic"],
            "--prompt_data", models["prompts"], "--input_key", "prompt", "--rollout_batch_size", "8",
            "--n_samples_per_prompt", "4", "--micro_rollout_batch_size", "8", "--train_batch_size", "16",
            "--micro_train_batch_size", "4", "--generate_max_len", "2", "--max_epochs", "2", "--num_episodes", "1",
            "--actor_learning_rate", "1e-2", "--critic_learning_rate", "1e-2", "--lr_scheduler", "constant",
            "--lr_warmup_ratio", "0", "--init_kl_coef", "0.01", "--zero_stage", "2", "--save_steps", "2",
            "--actor_num_nodes", "1", "--actor_num_gpus_per_node", "2", "--ref_num_nodes", "1",
            "--ref_num_gpus_per_node", "1", "--critic_num_nodes", "1", "--critic_num_gpus_per_node", "1",
            "--reward_num_nodes", "1", "--reward_num_gpus_per_node", "1", "--colocate_critic_reward",
            "--ref_reward_offload", "--vllm_num_engines", "1", "--vllm_tensor_parallel_size", "1",
            "--vllm_sync_backend", "gloo", "--enforce_eager", "--enable_prefix_caching",
            "--ckpt_path", str(ckpt), "--load_checkpoint", "--max_ckpt_num", "3", "--save_path", str(out),
            "--save_value_network", "--seed", "7", *extra]


def ray_env(cluster: dict[str, str], tmp: Path, **extra: str) -> dict[str, str]:
    vllm_tmp = tmp / "vllm"
    vllm_tmp.mkdir(exist_ok=True)
    return {"RAY_ADDRESS": cluster["address"], "RAY_AUTH_MODE": "disabled", "VLLM_CACHE_ROOT": str(vllm_tmp),
            "VLLM_RPC_BASE_PATH": str(vllm_tmp), **extra}


def engine_weights(ckpt: Path, step: int, engine: str) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / f"global_step{step}" / engine / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)["module"]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def steps(output: str) -> list[tuple[int, float]]:
    return [(int(s), float(r)) for s, r in re.findall(r"^step (\d+)/\d+ reward ([0-9.e+-]+)", output, re.M)]


def job_actors_alive(cluster: dict[str, str]) -> list[str]:
    """The cluster's live actors and placement groups (none may outlive a finished or failed job)."""
    from ray.util.state import list_actors, list_placement_groups

    deadline = time.monotonic() + 60  # Ray notices a dead driver's job within seconds, not at once
    while True:
        actors = [a.class_name for a in list_actors(address=cluster["dashboard"]) if a.state == "ALIVE"]
        groups = [g.name for g in list_placement_groups(address=cluster["dashboard"]) if g.state != "REMOVED"]
        if not actors + groups or time.monotonic() > deadline:
            return actors + groups
        time.sleep(2)


def test_ray_ppo_job_learns_and_survives_kills_preemption_bitwise(tmp_path, ray_cluster, ray_models):
    ref_ckpt, ref_out = tmp_path / "ref_ckpt", tmp_path / "ref_out"
    # 1. the reference, submitted as the docs submit it
    submit = [RAY, "job", "submit", f"--address={ray_cluster['dashboard']}",
              "--runtime-env-json", json.dumps({"working_dir": str(REPO), "excludes": [".venv", ".git"]}),
              "--", "python3", "-m", MODULE, *ray_args(ray_models, ref_ckpt, ref_out)]
    ref = run(submit, timeout=900, **ray_env(ray_cluster, tmp_path))
    assert ref.returncode == 0, ref.output[-6000:]
    rewards = steps(ref.output)
    assert [s for s, _ in rewards] == [1, 2, 3, 4], ref.output[-4000:]
    assert rewards[-1][1] > rewards[0][1], rewards  # the policy's answers score higher
    assert "vLLM engines hold the actor's weights" in ref.output
    ckpt_files = sorted(p.relative_to(ref_ckpt / "global_step4").as_posix()
                        for p in (ref_ckpt / "global_step4").rglob("*") if p.is_file())
    for expected in ("actor/rng_rank0.json", "actor/rng_rank1.json", "critic/rng_rank0.json", "manifest.json",
                     "train_state.json", "hf/actor/config.json"):
        assert expected in ckpt_files, ckpt_files
    assert (ref_ckpt / "latest").read_text().strip() == "global_step4"  # one latest for actor and critic
    state = json.loads((ref_ckpt / "global_step4" / "train_state.json").read_text())
    assert state["algorithm"] == "ppo_ray" and state["consumed_samples"] == 32 and "kl_ctl" in state["extra"]["ppo_ray"]
    assert (ref_out / "model.safetensors").exists() and (tmp_path / "ref_out_critic" / "model.safetensors").exists()
    assert job_actors_alive(ray_cluster) == []

    # 2. the same command (python -m, joining the cluster): an actor rank is killed at step 3 (the groups are
    # recreated and resume from step 2), then the driver is killed while the save of step 4 is being written
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    args = ray_args(ray_models, ckpt, out)
    once = tmp_path / "once"
    faults = f"actor_train@3:kill:once={once}-worker,before_commit@4:kill:once={once}-driver"
    started = time.monotonic()
    killed = run(launch_cmd(MODULE, [*args, "--max_restarts", "1"], ranks=0), timeout=900,
                 **ray_env(ray_cluster, tmp_path, OPENRL_FAULT=faults))
    assert killed.returncode == -signal.SIGKILL or killed.returncode == 137, killed.output[-5000:]
    lost = [line for line in killed.output.splitlines() if "actor rank" in line and "died" in line]
    assert lost and "recreating the groups" in lost[0], killed.output[-5000:]
    assert "resumed from" in killed.output and "global_step2" in killed.output
    assert (ckpt / "latest").read_text().strip() == "global_step2"  # step 4 was never committed
    assert not (ckpt / "global_step4").exists()
    assert time.monotonic() - started < 600
    assert job_actors_alive(ray_cluster) == []  # the dead driver's actors and placement groups are gone

    # 3. rerun, stopped by SIGTERM at step 3 (preemption): it commits that step and exits 0
    preempted = run(launch_cmd(MODULE, args, ranks=0), timeout=900,
                    **ray_env(ray_cluster, tmp_path, OPENRL_FAULT=f"step@3:signal=SIGTERM:once={once}-term"))
    assert preempted.returncode == 0, preempted.output[-5000:]
    assert "preempted by SIGTERM" in preempted.output and (ckpt / "latest").read_text().strip() == "global_step3"

    # 4. rerun to the end: actor and critic equal to the bit to the reference's
    final = run(launch_cmd(MODULE, args, ranks=0), timeout=900, **ray_env(ray_cluster, tmp_path))
    assert final.returncode == 0, final.output[-5000:]
    assert "resumed from" in final.output and [s for s, _ in steps(final.output)] == [4]
    for engine in ("actor", "critic"):
        assert_same(engine_weights(ckpt, 4, engine), engine_weights(ref_ckpt, 4, engine))
    from launch import weights

    assert_same(weights(out), weights(ref_out))


def ray_error(args: list[str], tmp: Path, cluster: dict[str, str] | None, **extra: str) -> str:
    """``python -m train_ppo_ray args``, forked from this process (forked.py: the imports are paid once),
    outside any cluster or joining ``cluster``: one error line, no traceback."""
    extra_env = ray_env(cluster, tmp, **extra) if cluster else {"RAY_ADDRESS": "", **extra}
    res: Result = run_module(MODULE, args, timeout=300, **extra_env)
    assert res.returncode != 0, res.output[-3000:]
    errors = [line for line in res.output.splitlines() if line.startswith(("error:", "train_ppo_ray: error:"))]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output[-3000:]
    return errors[0]


def test_ray_ppo_bad_input_is_one_line(tmp_path, ray_cluster, ray_models):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    base = ray_args(ray_models, ckpt, out)

    def with_flags(*flags: str) -> list[str]:
        return [*base, *flags]

    # before any cluster is touched: colocation of unequal groups, a rollout that does not split
    line = ray_error(with_flags("--colocate_actor_ref"), tmp_path, None)
    assert "--colocate_actor_ref" in line and "actor 2" in line and "ref 1" in line
    line = ray_error(with_flags("--rollout_batch_size", "6"), tmp_path, None)
    assert "--rollout_batch_size 6" in line
    # on the cluster: more bundles than it has, an engine wider than its largest node
    line = ray_error(with_flags("--vllm_num_engines", "4"), tmp_path, ray_cluster)
    assert "needs 8 CPU bundles" in line and f"has {CLUSTER_CPUS}" in line
    # a checkpoint from the one-group train_ppo is refused before any group starts, and left as it was
    step_dir = ckpt / "global_step2"
    step_dir.mkdir(parents=True)
    state = json.dumps({"algorithm": "ppo", "global_batch_size": 8, "world_size": 2, "model_fingerprint": "x"})
    (step_dir / "train_state.json").write_text(state)
    (step_dir / "manifest.json").write_text(json.dumps({"format": 1, "step": 2, "files": {}, "meta": {}}))
    (ckpt / "latest").write_text("global_step2\n")
    before = sorted(p.name for p in ckpt.rglob("*"))
    line = ray_error(with_flags(), tmp_path, ray_cluster)
    assert "train_ppo" in line and "global_step2" in line
    assert sorted(p.name for p in ckpt.rglob("*")) == before


def test_vllm_engine_serves_the_weights_it_is_sent(ray_models, tmp_path, monkeypatch):
    """The engine's in-place reload: after the weights of another model arrive, vLLM's greedy answer is that
    model's (Hugging Face generate), not the one it started with; the digest names what arrived."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))
    from transformers import AutoModelForCausalLM

    from openrl_ckpt.inference.generation import SamplingConfig
    from openrl_ckpt.trainers.ppo_ray.rollout_engine import VLLMEngine, weight_digest

    engine = VLLMEngine(0, ray_models["actor"], 0, 1, 128, bf16=False, enable_prefix_caching=True,
                        enforce_eager=True, gpu_memory_utilization=0.9)
    greedy, prompt = SamplingConfig(max_new_tokens=8, temperature=0.0), [[5, 6, 7, 8, 9]]
    before = engine.generate(prompt, [0], greedy)[0]
    model = AutoModelForCausalLM.from_pretrained(ray_models["actor"], dtype=torch.float32)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * 0.5)
    pairs = [(name, p.detach().clone()) for name, p in model.named_parameters()]
    assert engine._reload(pairs) == weight_digest(pairs)
    after = engine.generate(prompt, [0], greedy)[0]
    expected = model.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False)[0, 5:].tolist()
    assert after[:len(expected)] == expected and after != before
