"""Batch inference throughput on a SmolLM2-135M-shaped model: generated tokens/s of --eval_task generate
for several micro batch sizes, and rows scored/s of --eval_task rm.

    python bench/bench_inference.py [--ranks 2] [--prompts 32] [--best_of_n 4] [--max_new_tokens 64] \
        [--micro 1 4 16] [--rm_micro 4 16] [--zero_stage 0] [--bf16]

Builds the policy (random init) and a reward model on its backbone once (cached under --work), runs
the real CLI under deepspeed and prints figures read from the run's own log:
- generate: generated tokens / seconds from the first batch to the merged file (model loading and
  start-up excluded). A random-init model almost never samples EOS, so every answer runs the full
  --max_new_tokens: the figure is decode throughput at a fixed answer length;
- rm: rows / seconds of scoring (loading excluded), on the answers of the last generate run.
The load average before and after each run is printed with it: on a shared machine the figures are
only as good as the machine was quiet. A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import REPO, ensure_model, run_cli  # noqa: E402

MODULE = "openrl_ckpt.cli.batch_inference"


def ensure_reward_model(work: Path, policy: Path) -> Path:
    """A reward model (random head) on the SmolLM2-shaped backbone, built once."""
    sys.path.insert(0, str(REPO))
    from openrl_ckpt.utils.tiny import build_reward_model

    rm = work / "smollm2_rm"
    if not (rm / "config.json").exists():
        build_reward_model(str(rm), str(policy))
    return rm


def load() -> float:
    return round(os.getloadavg()[0], 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--best_of_n", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--micro", type=int, nargs="+", default=[1, 4, 16], help="generate micro batch sizes")
    p.add_argument("--rm_micro", type=int, nargs="+", default=[4, 16], help="rm micro batch sizes")
    p.add_argument("--zero_stage", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--work", default="/tmp/openrl_bench")
    args = p.parse_args()

    work = Path(args.work)
    policy = ensure_model(work)
    rm = ensure_reward_model(work, policy)
    run_dir = work / f"inference-{int(time.time())}"
    extra = ["--zero_stage", str(args.zero_stage), "--seed", "1"] + (["--bf16"] if args.bf16 else [])
    result: dict = {"model": "SmolLM2-135M-shaped (random init)", "ranks": args.ranks, "zero_stage": args.zero_stage,
                    "dtype": "bf16" if args.bf16 else "fp32", "prompts": args.prompts, "best_of_n": args.best_of_n,
                    "max_new_tokens": args.max_new_tokens, "cpu_count": os.cpu_count(), "generate": [], "rm": []}
    answers = None
    for micro in args.micro:
        answers = run_dir / f"generate-micro{micro}.jsonl"
        before = load()
        run = run_cli(MODULE, ["--eval_task", "generate", "--pretrain", str(policy), "--dataset",
                               str(REPO / "examples/data/prompts.jsonl"), "--input_key", "prompt", "--input_template",
                               "User: {}\nAssistant: ", "--max_samples", str(args.prompts), "--best_of_n",
                               str(args.best_of_n), "--max_new_tokens", str(args.max_new_tokens), "--micro_batch_size",
                               str(micro), "--output_path", str(answers), *extra], args.ranks)
        m = re.search(r"wrote (\d+) answers .*: (\d+) generated tokens in ([0-9.]+)s, ([0-9.]+) tokens/s", run["text"])
        result["generate"].append({"micro_batch": micro, "answers": int(m.group(1)), "tokens": int(m.group(2)),
                                   "seconds": float(m.group(3)), "tokens_per_s": float(m.group(4)),
                                   "wall_s": round(run["wall_s"], 1), "load_before_after": [before, load()]})
    for micro in args.rm_micro:
        before = load()
        run = run_cli(MODULE, ["--eval_task", "rm", "--pretrain", str(rm), "--dataset", str(answers),
                               "--micro_batch_size", str(micro),
                               "--output_path", str(run_dir / f"rm-micro{micro}.jsonl"),
                               *extra], args.ranks)
        m = re.search(r"rewards of (\d+) rows: .*\(([0-9.]+) rows/s\)", run["text"])
        result["rm"].append({"micro_batch": micro, "rows": int(m.group(1)), "rows_per_s": float(m.group(2)),
                             "wall_s": round(run["wall_s"], 1), "load_before_after": [before, load()]})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
