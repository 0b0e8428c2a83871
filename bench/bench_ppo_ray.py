"""Ray PPO figures: vLLM against Hugging Face rollouts, weight sync, checkpoint save and resume time.

    python bench/bench_ppo_ray.py [--model smollm2|tiny] [--steps 3] [--rollout_batch_size 4]
        [--n_samples_per_prompt 2] [--generate_max_len 32] [--work /tmp/openrl_bench_ppo_ray] [--keep]

Builds an actor (SmolLM2-135M-shaped, or a tiny Llama with head size 32, which vLLM on CPU accepts), a
reward model and a critic on its backbone (random weights), writes a few varied prompts from
examples/data/sft.jsonl, and launches the real CLI (``python -m openrl_ckpt.cli.train_ppo_ray``) three
times, one rank per group, with the same prompts, seed, sampling and answer length:
- A: ``--vllm_num_engines 1``, ``--steps`` steps, a checkpoint after every step;
- B: A's command again with ``--load_checkpoint`` and ``--num_episodes 2`` (``--steps`` more steps);
- C: ``--vllm_num_engines 0`` (Hugging Face generate on the actor group), ``--steps`` steps, no checkpoints.
Every figure is read from the launches' own output:
- rollout tokens/s and generate_s: medians of the step lines' ``rollout_tokens_per_s`` / ``generate_s``
  after step 1 (warm-up), A against C;
- weight sync: the step lines' ``weight_sync_s`` (one actor -> engines update per step), A and B after
  their first step, and the checked sync at start-up;
- checkpoint save: the ``saved checkpoint ... (X GB, Ys)`` lines of A and B;
- resume: wall time from B's launch to its ``resumed from`` line and to its first step line (A's
  launch to its first step line beside it, for a fresh start).
Models, prompts, checkpoints, exports and the launches' logs live under --work, removed at the end unless
--keep; Ray's and vLLM's temp files under a short temp folder of their own, always removed.
On a GPU box with fewer than 5 GPUs the launches share them (--colocate_all_models); --extra passes
more train_ppo_ray flags to every launch (e.g. '--bf16').
A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = "openrl_ckpt.cli.train_ppo_ray"
STEP = re.compile(r"step (\d+)/(\d+) (.*\bgenerate_s .*)$")
SAVED = re.compile(r"saved checkpoint (\S+) \(([0-9.]+) GB, ([0-9.]+)s")
SYNC_CHECK = re.compile(r"vLLM engines hold the actor's weights \(digest \w+, \d+ engine\(s\), ([0-9.]+)s\)")


def build_models(work: Path, kind: str) -> dict[str, Path]:
    """Actor, reward model and critic (random weights), built once under ``work``."""
    sys.path.insert(0, str(REPO))
    from openrl_ckpt.utils.tiny import (
        build_reward_model,
        build_smollm2_shaped,
        build_tiny_model,
        build_tiny_tokenizer,
        example_texts,
    )

    root = work / f"models-{kind}"
    paths = {"actor": root / "actor", "rm": root / "rm", "critic": root / "critic"}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    if kind == "smollm2":
        build_smollm2_shaped(str(paths["actor"]))
    else:  # vLLM on CPU needs a head size of 32 or more: 64 hidden / 2 heads
        build_tiny_tokenizer(str(root / "tok"), example_texts())
        build_tiny_model(str(paths["actor"]), str(root / "tok"), num_heads=2, num_kv_heads=2)
    build_reward_model(str(paths["rm"]), str(paths["actor"]), seed=1)
    build_reward_model(str(paths["critic"]), str(paths["actor"]), seed=2)
    return paths


def write_prompts(path: Path, tokenizer_dir: Path, count: int, max_tokens: int) -> Path:
    """``count`` distinct questions of examples/data/sft.jsonl that fit ``max_tokens``, spread over the file
    (capitals, arithmetic, sorting, ...), as ``{"prompt": ...}`` rows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    seen, fits = set(), []
    for line in (REPO / "examples/data/sft.jsonl").read_text().splitlines():
        q = json.loads(line)["question"] if line.strip() else ""
        if q and q not in seen and len(tok(q, add_special_tokens=False)["input_ids"]) <= max_tokens:
            seen.add(q)
            fits.append(q)
    if not fits:
        sys.exit(f"no question of examples/data/sft.jsonl fits --prompt_max_len {max_tokens}")
    stride = max(1, len(fits) // count)
    rows = [fits[(i * stride) % len(fits)] for i in range(count)]
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in rows))
    return path


def child_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_AUTH_MODE="disabled",
               # Ray's session files, vLLM's sockets and caches: under the temp folder, removed at the end
               TMPDIR=str(tmp), RAY_TMPDIR=str(tmp), VLLM_CACHE_ROOT=str(tmp / "vllm"), VLLM_RPC_BASE_PATH=str(tmp))
    env.pop("RAY_ADDRESS", None)  # each launch starts (and stops) a local Ray of its own
    if not gpu_count():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def launch(name: str, cli: list[str], env: dict[str, str], log_path: Path) -> dict:
    """Run the CLI once; every output line timestamped from the launch. Returns the parsed figures."""
    cmd = [sys.executable, "-m", MODULE, *cli]
    print(f"[{name}] {shlex.join(cmd)}", flush=True)
    started = time.perf_counter()
    # a session of its own, so an interrupted benchmark can stop this launch and the local Ray it started
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    steps: dict[int, dict[str, float]] = {}
    step_at: dict[int, float] = {}
    resumed_at = None
    saves: list[tuple[float, float]] = []
    sync_checks: list[float] = []
    try:
        assert proc.stdout is not None
        with log_path.open("w") as log:
            for line in proc.stdout:
                now = time.perf_counter() - started
                log.write(f"{now:9.2f} {line}")
                line = line.rstrip("\n").split("\r")[-1]
                m = STEP.search(line)
                if m:
                    step = int(m.group(1))
                    step_at.setdefault(step, now)
                    words = m.group(3).split()
                    kv = {}
                    for k, v in zip(words[::2], words[1::2]):
                        try:
                            kv[k] = float(v)
                        except ValueError:
                            pass
                    steps[step] = kv
                    print(f"[{name}] {now:7.1f}s step {step}/{m.group(2)}: generate_s {kv.get('generate_s')} "
                          f"rollout_tokens_per_s {kv.get('rollout_tokens_per_s')} "
                          f"weight_sync_s {kv.get('weight_sync_s')} step_s {kv.get('step_s')}", flush=True)
                elif resumed_at is None and "resumed from " in line and "samples consumed" in line:
                    resumed_at = now
                if (s := SAVED.search(line)) and not line.lstrip().startswith("("):  # the driver's, not a worker's
                    saves.append((float(s.group(2)), float(s.group(3))))
                if c := SYNC_CHECK.search(line):
                    sync_checks.append(float(c.group(1)))
        proc.wait()
    except BaseException:
        stop(proc)
        raise
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"[{name}] failed (exit {proc.returncode}) after {wall:.0f}s:\n{tail}")
    print(f"[{name}] done in {wall:.1f}s", flush=True)
    return {"cmd": cmd, "wall_s": wall, "steps": steps, "step_at": step_at, "resumed_at": resumed_at,
            "saves": saves, "sync_checks": sync_checks}


def stop(proc: subprocess.Popen) -> None:
    """Stop a launch this benchmark started: an interrupt first (the driver shuts its Ray down), then a kill
    of its session."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def steady(run: dict, key: str, skip: int) -> list[float]:
    """``key`` of the run's step lines after its first ``skip`` steps."""
    first = min(run["steps"], default=0)
    return [kv[key] for s, kv in sorted(run["steps"].items()) if s >= first + skip and key in kv]


def fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--steps", type=int, default=3, help="steps of each launch (the resumed one: as many more)")
    p.add_argument("--rollout_batch_size", type=int, default=4)
    p.add_argument("--n_samples_per_prompt", type=int, default=2)
    p.add_argument("--generate_max_len", type=int, default=32)
    p.add_argument("--prompt_max_len", type=int, default=64)
    p.add_argument("--micro_train_batch_size", type=int, default=2)
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--colocate", choices=["auto", "on", "off"], default="auto",
                   help="--colocate_all_models; auto: on a GPU box with fewer than 5 GPUs")
    p.add_argument("--extra", default="", help="more train_ppo_ray flags for every launch, e.g. '--bf16'")
    p.add_argument("--work", default="/tmp/openrl_bench_ppo_ray")
    p.add_argument("--keep", action="store_true", help="keep --work (models, checkpoints, logs)")
    args = p.parse_args()

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # short, so Ray's unix socket paths stay under the length limit whatever --work is
    tmp = Path(tempfile.mkdtemp(prefix="bppo-"))
    try:
        run_all(args, work, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            print(f"removed {work}")


def run_all(args: argparse.Namespace, work: Path, tmp: Path) -> None:
    t0 = time.perf_counter()
    models = build_models(work, args.model)
    samples = args.rollout_batch_size * args.n_samples_per_prompt
    prompts = write_prompts(work / "prompts.jsonl", models["actor"], args.rollout_batch_size * args.steps,
                            args.prompt_max_len - 2)
    print(f"models and prompts ready in {time.perf_counter() - t0:.1f}s ({args.model}, {work})", flush=True)

    gpus = gpu_count()
    colocate = args.colocate == "on" or (args.colocate == "auto" and 0 < gpus < 5)
    runs_dir = work / f"runs-{int(time.time())}"
    runs_dir.mkdir()
    env = child_env(tmp)
    common = ["--pretrain", str(models["actor"]), "--reward_pretrain", str(models["rm"]),
              "--critic_pretrain", str(models["critic"]), "--prompt_data", str(prompts), "--input_key", "prompt",
              "--prompt_max_len", str(args.prompt_max_len), "--generate_max_len", str(args.generate_max_len),
              "--rollout_batch_size", str(args.rollout_batch_size),
              "--n_samples_per_prompt", str(args.n_samples_per_prompt), "--micro_rollout_batch_size", str(samples),
              "--train_batch_size", str(samples), "--micro_train_batch_size", str(args.micro_train_batch_size),
              "--max_epochs", "1", "--actor_learning_rate", "1e-6", "--critic_learning_rate", "1e-6",
              "--lr_scheduler", "constant", "--lr_warmup_ratio", "0", "--init_kl_coef", "0.01",
              "--zero_stage", str(args.zero_stage), "--seed", "7", "--logging_steps", "1",
              "--actor_num_gpus_per_node", "1", "--critic_num_gpus_per_node", "1",
              "--ref_num_gpus_per_node", "1", "--reward_num_gpus_per_node", "1"]
    if colocate:
        common += ["--colocate_all_models", "--vllm_gpu_memory_utilization", "0.3"]
    common += shlex.split(args.extra)

    def paths(name: str) -> list[str]:
        # the folder above --save_path must exist: the export does not create it (a run without checkpoints
        # fails at its very end otherwise)
        (runs_dir / name).mkdir(parents=True, exist_ok=True)
        return ["--ckpt_path", str(runs_dir / name / "ckpt"), "--save_path", str(runs_dir / name / "model")]

    vllm_cli = [*common, "--vllm_num_engines", "1", "--save_steps", "1", "--max_ckpt_num", "2", *paths("vllm")]
    runs = {
        "A": launch("A vllm+save", [*vllm_cli, "--num_episodes", "1"], env, runs_dir / "A.log"),
        "B": launch("B resume", [*vllm_cli, "--num_episodes", "2", "--load_checkpoint"], env, runs_dir / "B.log"),
        "C": launch("C hf", [*common, "--vllm_num_engines", "0", *paths("hf"), "--num_episodes", "1"], env,
                    runs_dir / "C.log"),
    }
    a, b, c = runs["A"], runs["B"], runs["C"]


    vllm_tps, hf_tps = med(steady(a, "rollout_tokens_per_s", 1)), med(steady(c, "rollout_tokens_per_s", 1))
    syncs = steady(a, "weight_sync_s", 1) + steady(b, "weight_sync_s", 1)
    saves = a["saves"] + b["saves"]
    b_first = b["step_at"][min(b["step_at"])] if b["step_at"] else None
    a_first = a["step_at"].get(1)
    rows = [
        ("rollout tokens/s, vLLM (1 engine)", fmt(vllm_tps, digits=1),
         f"median of A steps 2..; generate_s {fmt(med(steady(a, 'generate_s', 1)), 's', 3)}"),
        ("rollout tokens/s, HF generate", fmt(hf_tps, digits=1),
         f"median of C steps 2..; generate_s {fmt(med(steady(c, 'generate_s', 1)), 's', 3)}"),
        ("vLLM / HF", fmt(vllm_tps / hf_tps if vllm_tps and hf_tps else None, "x"),
         f"mean answer length: A {fmt(med(steady(a, 'response_length', 1)), digits=1)}, "
         f"C {fmt(med(steady(c, 'response_length', 1)), digits=1)} tokens (of {args.generate_max_len}), "
         f"{samples} answers per step"),
        ("weight sync per update", fmt(med(syncs), "s", 3),
         f"median of {len(syncs)} (A, B after step 1): {[round(s, 3) for s in syncs]}; "
         f"checked sync at start {[round(s, 3) for s in a['sync_checks'] + b['sync_checks']]}"),
        ("checkpoint save", fmt(med([s for _, s in saves]), "s"),
         f"median of {len(saves)} saves (A, B), {fmt(med([g for g, _ in saves]), ' GB', 3)} each: "
         f"{[s for _, s in saves]}"),
        ("resume: launch -> 'resumed from'", fmt(b["resumed_at"], "s", 1), "B"),
        ("resume: launch -> first step line", fmt(b_first, "s", 1),
         f"B step {min(b['step_at'], default=0)}; fresh start, A launch -> step 1: {fmt(a_first, 's', 1)}"),
        ("launch wall time A / B / C", " / ".join(fmt(r["wall_s"], "s", 1) for r in (a, b, c)),
         f"A {len(a['steps'])} steps, B {len(b['steps'])}, C {len(c['steps'])}"),
    ]
    device = f"{gpus} GPU(s)" if gpus else f"CPU ({os.cpu_count()} cores)"
    print(f"\nRay PPO, {args.model} model (random weights), {device}, 1 rank per group"
          f"{', colocated' if colocate else ''}: {args.rollout_batch_size} prompts x {args.n_samples_per_prompt} "
          f"samples, {args.generate_max_len} new tokens, ZeRO {args.zero_stage}, {args.steps} steps per launch")
    width = max(len(r[0]) for r in rows)
    for label, value, note in rows:
        print(f"  {label:<{width}}  {value:>10}  {note}")
    print("\ncommands:")
    for key, run in runs.items():
        print(f"  {key} ({fmt(run['wall_s'], 's', 1)}): {shlex.join(run['cmd'])}")
    print(f"total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
