"""Resume cost against the number of consumed samples, on a large synthetic dataset.

    python bench/bench_resume.py [--rows 200000] [--ranks 2]

Trains the tiny model on ``--rows`` short synthetic rows until a checkpoint holds 10 consumed samples
(global batch 10, step 1) and, in a second run, 100,000 (global batch 1,000, step 100), then resumes
each with --load_checkpoint and reports, from the resumed run's own log:
- launch to the ``resumed from`` line (start-up, tokenization, engine and checkpoint load);
- launch to the end of the first step after the resume;
- the sampler alone: set_consumed plus the first global batch of indices at each position (in-process).
The two runs differ only in global batch (10 vs 1,000 rows of a few tokens: both steps take
milliseconds), so a resume cost that grew with the consumed count would show as a gap between them.
A benchmark, not a test: it prints JSON and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

from bench_sft import REPO
from compare_peers import OURS, StepReader, keep_only, launch, ours_job, settle

sys.path.insert(0, str(REPO))


def synthetic_rows(path: Path, rows: int) -> Path:
    if not path.exists() or sum(1 for _ in path.open()) != rows:
        with path.open("w") as f:
            for i in range(rows):
                f.write(json.dumps({"question": f"What is {i} plus one?", "response": f"{i + 1}."}) + "\n")
    return path


def sampler_cost(rows: int, batch: int, consumed: int, ranks: int) -> float:
    """Seconds to point a fresh sampler at ``consumed`` and draw the first global batch of indices."""
    from openrl_ckpt.data.sampler import ResumableDistributedSampler

    start = time.perf_counter()
    sampler = ResumableDistributedSampler(rows, global_batch_size=batch, world_size=ranks, rank=0, seed=42)
    sampler.set_consumed(consumed)
    it = iter(sampler)
    for _ in range(batch // ranks):
        next(it)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--work", default="/tmp/openrl_bench_resume")
    args = p.parse_args()

    from openrl_ckpt.utils.tiny import build_tiny_model, build_tiny_tokenizer, example_texts

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny"
    if not (model / "config.json").exists():
        build_tiny_tokenizer(str(model), example_texts())
        build_tiny_model(str(model), str(model))
    data = synthetic_rows(work / "synthetic.jsonl", args.rows)

    results = []
    for consumed, batch in ((10, 10), (100_000, 1_000)):
        step = consumed // batch
        run_dir = work / f"consumed-{consumed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cli = ["--pretrain", str(model), "--dataset", str(data), "--input_key", "question", "--output_key",
               "response", "--max_len", "16", "--micro_train_batch_size", str(batch // args.ranks),
               "--train_batch_size", str(batch), "--max_epochs", "1", "--save_steps", str(step),
               "--learning_rate", "1e-4"]
        launch(ours_job("openrl_ckpt.cli.train_sft", cli, args.ranks, run_dir), stop_after_step=step + 1)
        keep_only(run_dir / "ckpt", step)
        job = ours_job("openrl_ckpt.cli.train_sft", cli, args.ranks, run_dir, resume=True)
        settle()  # here, so launch()'s own settle is near-instant and both clocks start together
        started = time.perf_counter()
        resumed_at: list[float] = []

        class Reader(StepReader):  # also timestamps the "resumed from" line
            def step(self, line: str, resumed_at: list[float] = resumed_at, started: float = started) -> int | None:
                if not resumed_at and "resumed from" in line:
                    resumed_at.append(time.perf_counter() - started)
                return super().step(line)

        job.step_reader = Reader(OURS)
        run = launch(job, stop_after_step=0)
        m = re.search(r"resumed from \S+: step (\d+)/\d+, epoch \d+, (\d+) samples consumed", run.output)
        results.append({
            "consumed_samples": int(m.group(2)) if m else None, "global_batch": batch, "rows": args.rows,
            "launch_to_resumed_s": round(resumed_at[0], 2) if resumed_at else None,
            "launch_to_first_step_s": round(min(run.step_end.values()), 2) if run.step_end else None,
            "sampler_s": round(sampler_cost(args.rows, batch, consumed, args.ranks), 4),
        })
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
