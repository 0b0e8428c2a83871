"""Checkpoint save: how long training is blocked per save, with and without --async_save.

    python bench/bench_async_save.py [--ranks 2] [--zero_stage 2] [--steps 9] [--save_steps 3]

Runs the real SFT CLI twice under deepspeed on a SmolLM2-135M-shaped model (random init, built once
under --work), once with synchronous saves and once with --async_save, and prints figures read from
the runs' own logs, as JSON:
- synchronous: each save's whole duration (write, checksums, fsync, manifest, commit, rotation);
- async: each save's blocking part (state copied to host memory), plus any wait for the previous
  background save, and the background duration from staging to commit;
- the ratio of the median blocking times (the target is at most 0.30), and the median tokens/s
  of each run (the background writer shares the CPU with training).
A benchmark, not a test: it asserts nothing. The final save (end of training) is left out of the
medians: the run waits for it anyway before exporting.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, model: Path, run_dir: Path, async_save: bool) -> str:
    batch = args.micro * args.ranks * args.accum
    cli = ["--pretrain", str(model), "--dataset", str(REPO / "examples/data/sft.jsonl"),
           "--input_key", "question", "--output_key", "response", "--input_template", "User: {}\nAssistant: ",
           "--max_len", str(args.max_len), "--micro_train_batch_size", str(args.micro),
           "--train_batch_size", str(batch), "--max_samples", str(batch * args.steps), "--max_epochs", "1",
           "--learning_rate", "1e-4", "--zero_stage", str(args.zero_stage), "--save_steps", str(args.save_steps),
           "--max_ckpt_num", "1", "--ckpt_path", str(run_dir / "ckpt"), "--save_path", str(run_dir / "out"),
           "--logging_steps", "1"]
    if async_save:
        cli.append("--async_save")
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(args.ranks), "--master_port",
           str(free_port()), "--module", "openrl_ckpt.cli.train_sft", *cli]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.ranks))),
               PYTHONUNBUFFERED="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return proc.stdout


def figures(text: str, final_step: int) -> dict[str, object]:
    saved = [(int(m.group(1)), float(m.group(2)), float(m.group(3)), bool(m.group(4))) for m in re.finditer(
        r"saved checkpoint \S+?global_step(\d+) \(([0-9.]+) GB, ([0-9.]+)s(, written in the background)?\)", text)]
    # In log order: a wait for the previous background save comes right before the next save is staged,
    # and counts towards that save's blocking time.
    events = sorted([(m.start(), int(m.group(1)), float(m.group(2))) for m in re.finditer(
        r"checkpoint step (\d+) staged in host memory \(training blocked ([0-9.]+)s\)", text)]
        + [(m.start(), None, float(m.group(1))) for m in re.finditer(
            r"waited ([0-9.]+)s for the background save", text)])
    blocked: dict[int, float] = {}
    waited = 0.0
    for _, step, seconds in events:
        if step is None:
            waited += seconds
        else:
            blocked[step], waited = seconds + waited, 0.0
    tps = [float(m.group(1)) for m in re.finditer(r"step \d+/\d+ .*?tokens_per_s ([0-9.e+]+)", text)]
    per_save = []
    for step, gb, seconds, background in saved:
        if step == final_step:
            continue
        if background:
            per_save.append({"step": step, "gb": gb, "blocked_s": round(blocked[step], 3), "background_s": seconds})
        else:
            per_save.append({"step": step, "gb": gb, "blocked_s": seconds})
    return {"saves": per_save,
            "blocked_s_median": statistics.median(s["blocked_s"] for s in per_save) if per_save else None,
            "tokens_per_s_median": statistics.median(tps[1:]) if len(tps) > 1 else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--save_steps", type=int, default=3)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--max_len", type=int, default=256)
    p.add_argument("--work", default="/tmp/openrl_bench")
    args = p.parse_args()

    sys.path.insert(0, str(REPO))
    from openrl_ckpt.utils.tiny import build_smollm2_shaped, build_tiny_tokenizer, example_texts

    work = Path(args.work)
    model = work / "smollm2"
    if not (model / "config.json").exists():
        build_tiny_tokenizer(str(work / "tok"), example_texts(), vocab_size=512)
        build_smollm2_shaped(str(model), str(work / "tok"))
    stamp = int(time.time())
    result: dict[str, object] = {"model": "SmolLM2-135M-shaped (random init), fp32", "ranks": args.ranks,
                                 "zero_stage": args.zero_stage, "steps": args.steps, "save_steps": args.save_steps}
    for name, async_save in (("sync", False), ("async", True)):
        result[name] = figures(run(args, model, work / f"async-bench-{stamp}-{name}", async_save), args.steps)
    sync_b, async_b = result["sync"]["blocked_s_median"], result["async"]["blocked_s_median"]  # type: ignore[index]
    result["blocked_ratio_async_over_sync"] = round(async_b / sync_b, 3) if sync_b and async_b is not None else None
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
