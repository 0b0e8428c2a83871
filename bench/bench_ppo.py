"""PPO throughput on the SmolLM2-135M-shaped actor and critic (random weights, the tiny tokenizer),
2 ranks: rollout tokens per second, update step time and peak memory, from train_ppo's own step lines.

    python bench/bench_ppo.py [--ranks 2] [--steps 3] [--rollout_batch_size 8] [--generate_max_len 64] [--zero_stage 2]

On CPU set DS_ACCELERATOR=cpu (the default here when no GPU is visible). Prints one line per step
and the medians over the steps after the first (which includes warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rollout_batch_size", type=int, default=8)
    p.add_argument("--n_samples_per_prompt", type=int, default=1)
    p.add_argument("--generate_max_len", type=int, default=64)
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--extra", default="", help="more train_ppo flags, e.g. '--bf16 --gradient_checkpointing'")
    a = p.parse_args()

    import torch

    from openrl_ckpt.utils.tiny import build_reward_model, build_smollm2_shaped

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(REPO),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        actor = build_smollm2_shaped(f"{tmp}/actor")
        rm = build_reward_model(f"{tmp}/rm", actor, seed=1)
        prompts = Path(tmp) / "prompts.jsonl"
        rows = (REPO / "examples" / "data" / "prompts.jsonl").read_text().splitlines()
        prompts.write_text("\n".join(rows[:a.rollout_batch_size * a.steps]) + "\n")
        samples = a.rollout_batch_size * a.n_samples_per_prompt
        micro = samples // a.ranks
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(a.ranks), "--module",
               "openrl_ckpt.cli.train_ppo", "--pretrain", actor, "--reward_pretrain", rm, "--prompt_data", str(prompts),
               "--input_key", "prompt", "--rollout_batch_size", str(a.rollout_batch_size),
               "--n_samples_per_prompt", str(a.n_samples_per_prompt), "--micro_rollout_batch_size", str(micro),
               "--train_batch_size", str(samples), "--micro_train_batch_size", str(max(micro // 2, 1)),
               "--generate_max_len", str(a.generate_max_len), "--zero_stage", str(a.zero_stage),
               "--save_path", f"{tmp}/out", "--seed", "1", *a.extra.split()]
        out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if out.returncode:
            print(out.stdout[-3000:], out.stderr[-3000:])
            raise SystemExit(out.returncode)
    lines = re.findall(r"^step (\d+)/\d+ (.*)$", out.stdout + out.stderr, re.M)
    steps = []
    for step, text in lines:
        kv = dict(zip(text.split()[::2], map(float, text.split()[1::2])))
        tokens = kv["response_length"] * samples
        steps.append({"step": int(step), "rollout_tokens_per_s": tokens / kv["rollout_s"], "rollout_s": kv["rollout_s"],
                      "update_s": kv["step_s"] - kv["rollout_s"], "step_s": kv["step_s"],
                      "peak_mem_gb": kv["peak_mem_gb"], "response_length": kv["response_length"]})
        print(json.dumps(steps[-1]))
    later = steps[1:] or steps
    print(json.dumps({"ranks": a.ranks, "zero_stage": a.zero_stage, "samples_per_step": samples,
                      "generate_max_len": a.generate_max_len, "extra": a.extra,
                      **{f"median_{k}": statistics.median(s[k] for s in later)
                         for k in ("rollout_tokens_per_s", "rollout_s", "update_s", "step_s", "peak_mem_gb")}}))


if __name__ == "__main__":
    main()
