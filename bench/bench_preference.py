"""Preference-training throughput: DPO pairs/s (reference on the device and with --ref_offload) and RM pairs/s.

    python bench/bench_preference.py [--ranks 2] [--zero_stage 2] [--steps 6] [--max_len 256]
                                     [--cases dpo,dpo_ref_offload,rm]

Runs the real CLIs under deepspeed on the shipped preference pairs with the SmolLM2-135M-shaped
model (random init, built once under --work). Pairs/s is the global batch over the median wall-clock
gap between consecutive step lines after --warmup steps; peak memory is each rank's VmHWM.
A benchmark, not a test: it prints JSON and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_sft import REPO, ensure_model, run_cli, seconds_per_step

CASES = {
    "dpo": ("openrl_ckpt.cli.train_dpo", []),
    "dpo_ref_offload": ("openrl_ckpt.cli.train_dpo", ["--ref_offload"]),
    "rm": ("openrl_ckpt.cli.train_rm", []),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--max_len", type=int, default=256)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--work", default="/tmp/openrl_bench")
    args = p.parse_args()

    work = Path(args.work)
    model = ensure_model(work)
    batch = args.micro * args.ranks * args.accum
    results = []
    for case in args.cases.split(","):
        module, extra = CASES[case]
        run_dir = work / f"{case}-{int(time.time())}"
        cli = ["--pretrain", str(model), "--dataset", str(REPO / "examples/data/preference.jsonl"),
               "--prompt_key", "prompt", "--max_len", str(args.max_len), "--micro_train_batch_size", str(args.micro),
               "--train_batch_size", str(batch), "--max_samples", str(batch * args.steps), "--max_epochs", "1",
               "--learning_rate", "1e-5", "--zero_stage", str(args.zero_stage), "--save_path", str(run_dir / "out"),
               "--ckpt_path", str(run_dir / "ckpt"), "--logging_steps", "1", *extra]
        if args.bf16:
            cli.append("--bf16")
        run = run_cli(module, cli, args.ranks)
        sps = seconds_per_step(run["step_times"], args.warmup)
        results.append({
            "case": case, "model": "SmolLM2-135M-shaped (random init)", "ranks": args.ranks,
            "zero_stage": args.zero_stage, "dtype": "bf16" if args.bf16 else "fp32", "micro_batch": args.micro,
            "global_batch_pairs": batch, "max_len": args.max_len, "steps": args.steps,
            "seconds_per_step_median": round(sps, 2) if sps else None,
            "pairs_per_s": round(batch / sps, 3) if sps else None,
            "peak_rss_gb_per_rank": sorted(round(v, 2) for v in run["peaks"].values()),
            "launch_to_first_step_s": round(run["step_times"][1], 1) if 1 in run["step_times"] else None,
            "wall_s": round(run["wall_s"], 1),
        })
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"median_pairs_per_s": {r["case"]: r["pairs_per_s"] for r in results}}, indent=1))


if __name__ == "__main__":
    main()
