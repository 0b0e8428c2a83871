"""SFT throughput, peak memory per rank and checkpoint save time on a SmolLM2-135M-shaped model.

    python bench/bench_sft.py [--ranks 2] [--zero_stage 2] [--steps 8] [--max_len 256] [--bf16]

Builds the model once (random init, cached under --work), runs the real CLI under deepspeed on the
shipped variable-length data, and prints figures read from the run's own log:
- steady-state tokens/s: the median of the logged tokens_per_s after the first --warmup steps;
- peak memory per rank: the high-water mark of each rank's resident memory (VmHWM, polled);
- checkpoint save time: the manager's own timing of one committed save (write + checksums + commit).
A benchmark, not a test: it prints figures and asserts nothing.
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_pids(module: str) -> list[int]:
    """Processes below the launcher that run the training module."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # the launcher's own processes name the module too; the ranks are the ones DeepSpeed gave --local_rank
        if module in cmd and "--local_rank" in cmd and "deepspeed.launcher" not in cmd:
            pids.append(int(d.name))
    return pids


def vm_hwm_gb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6  # kB -> GB
    except OSError:
        return None
    return None


def run_cli(module: str, cli: list[str], ranks: int) -> dict:
    """Launch ``module`` under deepspeed and watch it: log text, peak RSS per rank, launch to first step,
    and the wall-clock arrival of each logged step (seconds per step, whatever the tool logs)."""
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "--module", module, *cli]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // ranks))),
               PYTHONUNBUFFERED="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    peaks: dict[int, float] = {}

    def poll() -> None:
        while proc.poll() is None:
            for pid in rank_pids(module):
                hwm = vm_hwm_gb(pid)
                if hwm is not None:
                    peaks[pid] = max(peaks.get(pid, 0.0), hwm)
            time.sleep(0.5)

    threading.Thread(target=poll, daemon=True).start()
    log_lines, step_times = [], {}
    assert proc.stdout is not None
    for line in proc.stdout:
        log_lines.append(line)
        m = re.match(r"step (\d+)/\d+ .*lr ", line)  # training step lines (eval lines carry no lr)
        if m:
            step_times.setdefault(int(m.group(1)), time.perf_counter() - started)
    proc.wait()
    text = "".join(log_lines)
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed ({proc.returncode}):\n{text[-3000:]}")
    return {"text": text, "peaks": peaks, "step_times": step_times, "wall_s": time.perf_counter() - started}


def seconds_per_step(step_times: dict[int, float], warmup: int) -> float | None:
    """Median gap between consecutive logged steps after ``warmup`` steps."""
    steps = sorted(s for s in step_times if s > warmup)
    gaps = [step_times[b] - step_times[a] for a, b in zip(steps, steps[1:]) if b == a + 1]
    return statistics.median(gaps) if gaps else None


def ensure_model(work: Path) -> Path:
    """The SmolLM2-135M-shaped model (random init), built once under ``work``."""
    sys.path.insert(0, str(REPO))
    from openrl_ckpt.utils.tiny import build_smollm2_shaped, build_tiny_tokenizer, example_texts

    model = work / "smollm2"
    if not (model / "config.json").exists():
        build_tiny_tokenizer(str(work / "tok"), example_texts(), vocab_size=512)
        build_smollm2_shaped(str(model), str(work / "tok"))
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--max_len", type=int, default=256)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--packing_samples", action="store_true")
    p.add_argument("--work", default="/tmp/openrl_bench")
    args = p.parse_args()

    work = Path(args.work)
    model = ensure_model(work)
    run_dir = work / f"run-{int(time.time())}"
    batch = args.micro * args.ranks * args.accum
    save_at = args.steps - 1
    cli = ["--pretrain", str(model), "--dataset", str(REPO / "examples/data/sft.jsonl"),
           "--input_key", "question", "--output_key", "response", "--input_template", "User: {}\nAssistant: ",
           "--max_len", str(args.max_len), "--micro_train_batch_size", str(args.micro),
           "--train_batch_size", str(batch), "--max_samples", str(batch * args.steps), "--max_epochs", "1",
           "--learning_rate", "1e-4", "--zero_stage", str(args.zero_stage), "--save_steps", str(save_at),
           "--ckpt_path", str(run_dir / "ckpt"), "--save_path", str(run_dir / "out"), "--logging_steps", "1"]
    if args.bf16:
        cli.append("--bf16")
    if args.packing_samples:
        cli.append("--packing_samples")
    run = run_cli("openrl_ckpt.cli.train_sft", cli, args.ranks)
    text, peaks, total = run["text"], run["peaks"], run["wall_s"]
    first_step_at = run["step_times"].get(1)

    tps = [(int(m.group(1)), float(m.group(2))) for m in
           re.finditer(r"step (\d+)/\d+ .*?tokens_per_s ([0-9.e+]+)", text)]
    steady = [v for step, v in tps if step > args.warmup]
    saves = [(float(m.group(1)), float(m.group(2))) for m in
             re.finditer(r"saved checkpoint \S+ \(([0-9.]+) GB, ([0-9.]+)s\)", text)]
    result = {
        "model": "SmolLM2-135M-shaped (random init)", "ranks": args.ranks, "zero_stage": args.zero_stage,
        "dtype": "bf16" if args.bf16 else "fp32", "micro_batch": args.micro, "global_batch": batch,
        "max_len": args.max_len, "packing": args.packing_samples, "steps": args.steps,
        "tokens_per_s_median": statistics.median(steady) if steady else None,
        "tokens_per_s_all": [round(v) for _, v in tps],
        "peak_rss_gb_per_rank": sorted(round(v, 2) for v in peaks.values()),
        "checkpoint_gb": saves[0][0] if saves else None,
        "checkpoint_save_s": saves[0][1] if saves else None,
        "launch_to_first_step_s": round(first_step_at, 1) if first_step_at else None,
        "wall_s": round(total, 1),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
