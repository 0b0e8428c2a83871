"""openrl_ckpt against OpenRLHF 0.11.2 and TRL 1.16.0, side by side on this machine.

    python bench/compare_peers.py [--cases sft,dpo,trl_sft,trl_dpo,lora] [--pairs 3] [--steps 6]

Installs the peers with ../shared/peers/ when their venvs are missing, builds the SmolLM2-135M-shaped
model once (random init), and for each case runs ours and the peer alternately (A B A B ...) on the
same model, data, max_len, micro and global batch, ZeRO stage, dtype, attention implementation and
world size. The SFT cases also run ours with --packing_samples in the same rotation (A B C A B C).

Every figure comes from the wall-clock arrival of each tool's own step log (our ``step N/M`` lines,
OpenRLHF's tqdm postfix after every micro batch, TRL's loop through a TrainerCallback):
- step time: median gap between consecutive optimizer steps after --warmup, the save gap excluded;
- tokens/s: global batch x mean real tokens per sample (the data is the same for every tool and is
  filtered to fit max_len, so no tool truncates) / step time;
- start-up: launch to the end of step 1, less one step time;
- save: the checkpoint's write window on the file system, from its folder's first appearance to
  ``latest`` naming it (both tools write ``latest`` last; ours after its checksums); under
  --async_save, the time training was blocked, from our own log;
- resume: a second launch from the run's mid-run checkpoint, launch to the end of its first step;
- checkpoint size: bytes on disk of the mid-run checkpoint folder;
- peak memory: the highest VmHWM among the training processes (per rank).
Before every launch the page cache is dropped (as root), so no tool inherits a warm or dirty cache
from the one before. Medians over the pairs and the ratio ours/peer go to bench/RESULTS.md with
date, commit and machine.
A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bench_sft import REPO, ensure_model, free_port, vm_hwm_gb

PEERS = REPO.parent / "shared" / "peers"
SFT_TEMPLATE = "User: {}\nAssistant: "
OURS, OPENRLHF, TRL = "openrl_ckpt", "OpenRLHF", "TRL"
OURS_PACKED, OURS_ASYNC = "openrl_ckpt --packing_samples", "openrl_ckpt --async_save"
OURS_BF16_ACCUM = "openrl_ckpt --grad_accum_dtype bf16"
FINDINGS = "## Findings"  # RESULTS.md from this heading on is written by hand and kept by reruns
RESUMED = {OURS: r"resumed from \S+global_step", OPENRLHF: r"Loaded the checkpoint"}


# ------------------------------------------------------------------------------------------- data


def bench_data(work: Path, tokenizer_dir: Path, max_len: int) -> dict[str, tuple[Path, float]]:
    """Shipped rows that fit max_len for every tool (so nobody truncates), in each tool's format, and
    the mean real tokens per sample: ``{name: (path, mean_tokens)}``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = 1  # every tool appends one EOS

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"]) + eos

    out: dict[str, tuple[Path, float]] = {}
    sft = [json.loads(line) for line in (REPO / "examples/data/sft.jsonl").read_text().splitlines() if line.strip()]
    sft = [r for r in sft if n(SFT_TEMPLATE.format(r["question"]) + r["response"]) <= max_len]
    lengths = [n(SFT_TEMPLATE.format(r["question"]) + r["response"]) for r in sft]
    out["sft"] = (write_jsonl(work / "sft.jsonl", sft), statistics.mean(lengths))
    out["sft_trl"] = (write_jsonl(work / "sft_trl.jsonl", [
        {"prompt": SFT_TEMPLATE.format(r["question"]), "completion": r["response"]} for r in sft]), out["sft"][1])

    pairs = [json.loads(line) for line in (REPO / "examples/data/preference.jsonl").read_text().splitlines()
             if line.strip()]
    pairs = [r for r in pairs if max(n(r["prompt"] + r["chosen"]), n(r["prompt"] + r["rejected"])) <= max_len
             and r["chosen"] != r["rejected"]]
    pair_tokens = [n(r["prompt"] + r["chosen"]) + n(r["prompt"] + r["rejected"]) for r in pairs]
    out["dpo"] = (write_jsonl(work / "dpo.jsonl", pairs), statistics.mean(pair_tokens))
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------- launching


@dataclass
class Job:
    """One launch: the command, how to read its step log, and where it checkpoints."""
    tool: str
    cmd: list[str]
    env: dict[str, str]
    step_reader: StepReader
    ckpt: Path | None  # the folder holding global_step*/ (or checkpoint-*/ for TRL)


@dataclass
class Run:
    tool: str
    step_end: dict[int, float]  # optimizer step -> seconds since launch
    peak_gb: float
    ckpt_bytes: int | None
    output: str
    save_window: tuple[float, float] | None = None  # first file of the watched save .. its commit


def watch_save(ckpt: Path, step: int, started: float, done: threading.Event) -> list[float]:
    """[first sight of the step's folder (ours: the .tmp- one), ``latest`` naming it]; both tools
    write ``latest`` last, after every file of the checkpoint (ours: after checksums and the rename)."""
    names = [ckpt / f"global_step{step}", ckpt / f".tmp-global_step{step}"]
    times: list[float] = []
    while not done.is_set() and len(times) < 2:
        now = time.perf_counter() - started
        if not times and any(p.exists() for p in names):
            times.append(now)
        if times:
            try:
                if (ckpt / "latest").read_text().strip() == f"global_step{step}":
                    times.append(now)
            except OSError:
                pass
        time.sleep(0.02)
    return times


class StepReader:
    """Turns a tool's output lines into optimizer-step completions."""

    def __init__(self, kind: str, micro_per_step: int = 1) -> None:
        self.kind, self.micro_per_step = kind, micro_per_step
        self.micro, self.postfix = 0, ""

    def step(self, line: str) -> int | None:
        if self.kind == OURS:
            m = re.match(r"step (\d+)/\d+ .*\blr ", line)  # training lines; eval lines carry no lr
            return int(m.group(1)) if m else None
        if self.kind == TRL:
            m = re.match(r"bench_step (\d+)", line)
            return int(m.group(1)) if m else None
        # OpenRLHF: its tqdm bar gets a new postfix (loss, lr, grad_norm) after every micro batch
        m = re.search(r"Train step of epoch \d+: .*\| *\d+/\d+ \[(.*)\]", line)
        if not m:
            return None
        postfix = ", ".join(f for f in m.group(1).split(", ") if "=" in f)
        if not postfix or postfix == self.postfix:
            return None
        self.postfix = postfix
        self.micro += 1
        return self.micro // self.micro_per_step if self.micro % self.micro_per_step == 0 else None


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def is_trainer_process(pid: int) -> bool:
    """A process that trains: not the deepspeed runner/launcher nor a shell wrapper."""
    try:
        cmd = (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")).decode()
    except OSError:
        return False
    return "python" in cmd and "deepspeed.launcher" not in cmd and "/bin/deepspeed " not in cmd


def settle() -> None:
    """The same machine state before every launch: dirty pages written, page cache dropped, memory
    compacted (as root; skipped elsewhere). Without it, whichever tool follows a run that just read
    or wrote a 2 GB checkpoint starts slower, and the alternation order would pick the winner."""
    os.sync()
    for knob, value in (("/proc/sys/vm/drop_caches", "3"), ("/proc/sys/vm/compact_memory", "1")):
        try:
            Path(knob).write_text(value)
        except OSError:
            pass


def launch(job: Job, stop_after_step: int | None = None, watch_step: int | None = None,
           timeout: float = 1800) -> Run:
    """Run ``job``; with ``stop_after_step`` kill the whole run once that step (0: any first step)
    has ended. What comes after is not measured: final saves and exports. ``watch_step``: time the
    write of that step's checkpoint from the file system."""
    settle()
    started = time.perf_counter()
    done, window = threading.Event(), []
    if watch_step is not None and job.ckpt is not None:
        threading.Thread(target=lambda: window.extend(watch_save(job.ckpt, watch_step, started, done)),
                         daemon=True).start()
    proc = subprocess.Popen(job.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=job.env, start_new_session=True)
    peaks: dict[int, float] = {}

    def poll() -> None:
        while proc.poll() is None:
            for pid in descendants(proc.pid):
                if is_trainer_process(pid) and (hwm := vm_hwm_gb(pid)) is not None:
                    peaks[pid] = max(peaks.get(pid, 0.0), hwm)
            time.sleep(0.5)

    threading.Thread(target=poll, daemon=True).start()
    step_end: dict[int, float] = {}
    lines: list[str] = []
    assert proc.stdout is not None
    killed = False
    for line in proc.stdout:  # text mode: tqdm's \r redraws arrive as separate lines
        lines.append(line)
        step = job.step_reader.step(line.strip())
        if step is not None:
            step_end.setdefault(step, time.perf_counter() - started)
            if stop_after_step is not None and (step >= stop_after_step or stop_after_step == 0):
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
        if time.perf_counter() - started > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            sys.exit(f"{job.tool} ran past {timeout}s: {' '.join(job.cmd)}")
    proc.wait()
    done.set()
    text = "".join(lines)
    if proc.returncode != 0 and not killed:
        sys.exit(f"{job.tool} failed ({proc.returncode}): {' '.join(job.cmd)}\n{text[-4000:]}")
    return Run(job.tool, step_end, max(peaks.values(), default=0.0), None, text,
               (window[0], window[1]) if len(window) == 2 else None)


def checkpoint_folder(ckpt: Path, step: int) -> Path | None:
    """The committed checkpoint of ``step`` (None while an async save was still writing it at the kill)."""
    for name in (f"global_step{step}", f"checkpoint-{step}"):
        if (ckpt / name).is_dir():
            return ckpt / name
    return None


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def keep_only(ckpt: Path, step: int) -> None:
    """Make ``step`` the newest checkpoint (both tools resume from the newest one)."""
    for p in ckpt.iterdir():
        m = re.fullmatch(r"global_step(\d+)", p.name)
        if m and int(m.group(1)) > step:
            shutil.rmtree(p)
        elif p.name.startswith(".") or p.name.startswith("tmp"):  # unfinished writes of the killed final save
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    (ckpt / "latest").write_text(f"global_step{step}")


# ------------------------------------------------------------------------------------------ figures


def save_seconds(run: Run, step: int) -> float | None:
    """What training waits for at a save: under --async_save our own log of the blocked time (the
    write goes on in the background); otherwise the write window seen on the file system."""
    m = re.search(rf"checkpoint step {step} staged in host memory \(training blocked ([0-9.]+)s\)", run.output)
    if m:
        return float(m.group(1))
    return run.save_window[1] - run.save_window[0] if run.save_window else None


def figures(run: Run, tokens_per_step: float, warmup: int, save_step: int | None) -> dict[str, float | None]:
    ends = run.step_end
    gaps = {k: ends[k] - ends[k - 1] for k in ends if k - 1 in ends and k > warmup}
    steady = [g for k, g in gaps.items() if k != (save_step or -1) + 1]
    step_s = statistics.median(steady) if steady else None
    fig: dict[str, float | None] = {
        "step_s": step_s,
        "tokens_per_s": tokens_per_step / step_s if step_s else None,
        "startup_s": ends[1] - step_s if step_s and 1 in ends else None,
        "save_s": save_seconds(run, save_step),
        "peak_gb": run.peak_gb or None,
        "ckpt_gb": run.ckpt_bytes / 1e9 if run.ckpt_bytes else None,
    }
    return fig


# ---------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    title: str
    jobs: dict[str, Callable[..., Job]]  # tool -> (run_dir, resume=False) -> Job
    tokens_per_step: float
    save_step: int
    resume: tuple[str, ...]  # the tools whose resume is measured
    notes: list[str] = field(default_factory=list)


def env_for(threads: int, **extra: str) -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
             WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu",
             HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    e.pop("PYTHONPATH", None)
    e.update(extra)
    return e


def ours_job(module: str, cli: list[str], ranks: int, run_dir: Path, resume: bool = False) -> Job:
    ckpt = run_dir / "ckpt"
    args = [*cli, "--ckpt_path", str(ckpt), "--save_path", str(run_dir / "out"), "--logging_steps", "1"]
    if resume:
        args.append("--load_checkpoint")
    py = str(Path(sys.executable))
    if ranks == 1:
        cmd = [py, "-m", module, *args]
    else:
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks), "--master_port",
               str(free_port()), "--module", module, *args]
    return Job(OURS, cmd, env_for(max(1, (os.cpu_count() or 2) // ranks), PYTHONPATH=str(REPO)),
               StepReader(OURS), ckpt)


def openrlhf_job(module: str, cli: list[str], ranks: int, accum: int, run_dir: Path, venv: Path,
                 resume: bool = False) -> Job:
    ckpt = run_dir / "ckpt"
    args = [*cli, "--ckpt.path", str(ckpt), "--ckpt.output_dir", str(run_dir / "out"), "--logger.logging_steps", "1"]
    if resume:
        args.append("--ckpt.load_enable")
    cmd = ["bash", str(PEERS / "run_openrlhf.sh"), str(ranks), module, *args]
    return Job(OPENRLHF, cmd, env_for(max(1, (os.cpu_count() or 2) // ranks), OPENRLHF_VENV=str(venv),
                                      PORT=str(free_port())), StepReader(OPENRLHF, accum), ckpt)


def trl_job(algo: str, data: Path, model: Path, a: argparse.Namespace, run_dir: Path, venv: Path) -> Job:
    cmd = [str(venv / "bin/python"), str(REPO / "bench/peers_trl.py"), "--algo", algo, "--model", str(model),
           "--data", str(data), "--max_len", str(a.max_len), "--micro", str(a.single_micro), "--accum",
           str(a.single_batch // a.single_micro), "--steps", str(a.steps), "--save_steps", str(a.save_step),
           "--out", str(run_dir / "ckpt")]
    return Job(TRL, cmd, env_for(os.cpu_count() or 2), StepReader(TRL), run_dir / "ckpt")


def build_cases(a: argparse.Namespace, model: Path, data: dict[str, tuple[Path, float]], venvs: dict[str, Path]) \
        -> list[Case]:
    ranks, micro, accum = 2, a.micro, a.accum
    batch = micro * ranks * accum  # the global batch of the 2-rank cases, the same for every tool
    samples = max(batch, a.single_batch) * a.steps  # the same rows for every case
    lr = ["--learning_rate", "1e-5"]
    sft_path, sft_tokens = data["sft"]
    dpo_path, dpo_tokens = data["dpo"]
    ours_common = ["--pretrain", str(model), "--max_len", str(a.max_len), "--max_samples", str(samples),
                   "--max_epochs", "1", "--save_steps", str(a.save_step), "--seed", "42", *lr]
    ds2 = ["--micro_train_batch_size", str(micro), "--train_batch_size", str(batch), "--zero_stage", "2", "--bf16",
           "--attn_implementation", "eager"]
    # one process (TRL's cases): the global batch is micro x accumulation on one rank
    single = ["--micro_train_batch_size", str(a.single_micro), "--train_batch_size", str(a.single_batch),
              "--zero_stage", "0"]
    ours_sft = [*ours_common, "--dataset", str(sft_path), "--input_key", "question", "--output_key", "response",
                "--input_template", SFT_TEMPLATE]
    ours_dpo = [*ours_common, "--dataset", str(dpo_path), "--prompt_key", "prompt", "--beta", "0.1"]
    peer_common = ["--model.model_name_or_path", str(model), "--data.max_len", str(a.max_len),
                   "--train.micro_batch_size", str(micro), "--train.batch_size", str(batch),
                   "--data.max_samples", str(samples), "--train.max_epochs", "1", "--ckpt.save_steps",
                   str(a.save_step), "--ckpt.max_num", "3", "--adam.lr", "1e-5", "--ds.attn_implementation", "eager",
                   "--ds.param_dtype", "bf16", "--ds.zero_stage", "2"]
    peer_sft = [*peer_common, "--data.dataset", str(sft_path), "--data.input_key", "question", "--data.output_key",
                "response", "--data.input_template", SFT_TEMPLATE]
    peer_dpo = [*peer_common, "--data.dataset", str(dpo_path), "--data.prompt_key", "prompt", "--model.beta", "0.1"]
    lora = ["--lora_rank", "8", "--lora_alpha", "16", "--target_modules", "all-linear"]
    peer_lora = ["--ds.lora.rank", "8", "--ds.lora.alpha", "16"]  # its default targets: all-linear
    orl = venvs["openrlhf"]

    def ours(module: str, cli: list[str], r: int = ranks) -> Callable:
        return lambda d, resume=False: ours_job(module, cli, r, d, resume)

    def peer(module: str, cli: list[str]) -> Callable:
        return lambda d, resume=False: openrlhf_job(module, cli, ranks, accum, d, orl, resume)

    def trl(algo: str, path: Path) -> Callable:
        return lambda d, resume=False: trl_job(algo, path, model, a, d, venvs["trl"])

    sft_2 = f"micro batch {micro}, global batch {batch}"
    sft_1 = f"micro batch {a.single_micro}, global batch {a.single_batch}"
    return [
        Case("sft", f"SFT, ZeRO-2, bf16, eager attention, 2 ranks, {sft_2}, vs OpenRLHF train_sft",
             {OURS: ours("openrl_ckpt.cli.train_sft", [*ours_sft, *ds2]),
              OPENRLHF: peer("openrlhf.cli.train_sft", peer_sft),
              OURS_ASYNC: ours("openrl_ckpt.cli.train_sft", [*ours_sft, *ds2, "--async_save"])},
             batch * sft_tokens, a.save_step, (OURS, OPENRLHF),
             ["save s for --async_save is the time training is blocked (the write goes on in the background)."]),
        Case("sft_accum", "SFT as above, with our gradients accumulated in bf16 as OpenRLHF's are "
                          "(its --ds.grad_accum_dtype defaults to the model's dtype; ours to fp32)",
             {OPENRLHF: peer("openrlhf.cli.train_sft", peer_sft),
              OURS_BF16_ACCUM: ours("openrl_ckpt.cli.train_sft", [*ours_sft, *ds2, "--grad_accum_dtype", "bf16"])},
             batch * sft_tokens, a.save_step, ()),
        Case("dpo", f"DPO with a reference model, ZeRO-2, bf16, eager attention, 2 ranks, {sft_2} pairs, "
                    "vs OpenRLHF train_dpo",
             {OURS: ours("openrl_ckpt.cli.train_dpo", [*ours_dpo, *ds2]),
              OPENRLHF: peer("openrlhf.cli.train_dpo", peer_dpo)},
             batch * dpo_tokens, a.save_step, ()),
        Case("lora", f"LoRA SFT (rank 8, all linear layers), ZeRO-2, bf16, 2 ranks, {sft_2}, vs OpenRLHF "
                     "--ds.lora.rank",
             {OURS: ours("openrl_ckpt.cli.train_sft", [*ours_sft, *ds2, *lora]),
              OPENRLHF: peer("openrlhf.cli.train_sft", [*peer_sft, *peer_lora])},
             batch * sft_tokens, a.save_step, (OURS, OPENRLHF)),
        Case("trl_sft", f"SFT, one process, fp32, sdpa attention, {sft_1}, vs TRL SFTTrainer "
                        "(+ our --packing_samples)",
             {OURS: ours("openrl_ckpt.cli.train_sft", [*ours_sft, *single], 1),
              TRL: trl("sft", data["sft_trl"][0]),
              OURS_PACKED: ours("openrl_ckpt.cli.train_sft", [*ours_sft, *single, "--packing_samples"], 1)},
             a.single_batch * sft_tokens, a.save_step, (),
             ["TRL's padding_free needs flash-attn (CUDA only), so TRL runs padded; so does OpenRLHF's "
              "--ds.packing_samples, which is why packing is compared here and not in the 2-rank cases."]),
        Case("trl_dpo", f"DPO with a reference model, one process, fp32, sdpa attention, {sft_1} pairs, "
                        "vs TRL DPOTrainer",
             {OURS: ours("openrl_ckpt.cli.train_dpo", [*ours_dpo, *single], 1),
              TRL: trl("dpo", dpo_path)},
             a.single_batch * dpo_tokens, a.save_step, ()),
    ]


# ------------------------------------------------------------------------------------------- driver


def run_case(case: Case, a: argparse.Namespace, work: Path, primed: set[str]) -> dict[str, list[dict]]:
    """A B (C) A B (C) ...: every pair runs each tool once, in the same order."""
    jobs = {t: make for t, make in case.jobs.items() if not a.tools or t in a.tools.split(",")}
    results: dict[str, list[dict]] = {tool: [] for tool in jobs}
    for make in jobs.values() if a.prime else ():  # unmeasured: JIT-built ops, page cache, bytecode
        run_dir = work / "runs" / "prime"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        if (job := make(run_dir)).tool not in primed:
            launch(job, stop_after_step=1)
            primed.add(job.tool)
        shutil.rmtree(run_dir, ignore_errors=True)
    for pair in range(a.pairs):
        for tool, make in jobs.items():
            run_dir = work / "runs" / f"{case.name}-{pair}-{re.sub(r'[^a-z]+', '_', tool.lower())}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            job = make(run_dir)
            run = launch(job, stop_after_step=a.steps, watch_step=case.save_step)
            folder = checkpoint_folder(job.ckpt, case.save_step) if job.ckpt else None
            run.ckpt_bytes = folder_bytes(folder) if folder else None
            fig = figures(run, case.tokens_per_step, a.warmup, case.save_step)
            if tool in case.resume and job.ckpt:
                if folder is None:
                    sys.exit(f"{tool} left no checkpoint of step {case.save_step} in {job.ckpt}")
                keep_only(job.ckpt, case.save_step)
                resumed = launch(make(run_dir, resume=True), stop_after_step=0)
                if not re.search(RESUMED[job.tool], resumed.output):
                    sys.exit(f"{tool} did not resume from {job.ckpt}:\n{resumed.output[-3000:]}")
                fig["resume_s"] = min(resumed.step_end.values())
            results[tool].append(fig)
            print(f"[{case.name} pair {pair + 1}/{a.pairs}] {tool}: "
                  + ", ".join(f"{k} {v:.3g}" for k, v in fig.items() if v is not None), flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of this model are GBs each
    return results


METRICS = [("tokens_per_s", "tokens/s"), ("step_s", "s/step"), ("startup_s", "start-up s"),
           ("save_s", "save s (blocked)"), ("resume_s", "resume: launch to first step s"),
           ("ckpt_gb", "checkpoint GB"), ("peak_gb", "peak RSS GB per rank")]


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def table(case: Case, results: dict[str, list[dict]], measured: str | None) -> list[str]:
    tools = list(results)
    peer = next((t for t in tools if t in (OPENRLHF, TRL)), None)  # ratios: every other column over the peer
    others = [t for t in tools if t != peer] if peer else []
    head = "| metric | " + " | ".join([*tools, *(f"{t} / {peer}" for t in others)]) + " |"
    lines = [f"### {case.title}", "", f"Measured {measured}." if measured else "", "", head,
             "|" + "---|" * (1 + len(tools) + len(others))]
    for key, label in METRICS:
        meds = {t: median([r.get(key) for r in results[t]]) for t in tools}
        if all(v is None for v in meds.values()):
            continue
        cells = [f"{meds[t]:.3g}" if meds[t] is not None else "n/a" for t in tools]
        ratios = [f"{meds[t] / meds[peer]:.2f}" if meds[t] is not None and meds[peer] else "n/a" for t in others]
        lines.append(f"| {label} | " + " | ".join([*cells, *ratios]) + " |")
    lines += [""] + [f"- {n}" for n in case.notes] + ([""] if case.notes else [])
    return lines


def ensure_peers() -> dict[str, Path]:
    venvs = {"openrlhf": Path(os.environ.get("OPENRLHF_VENV", "/tmp/peers/openrlhf")),
             "trl": Path(os.environ.get("TRL_VENV", "/tmp/peers/trl"))}
    for name, venv in venvs.items():
        if not (venv / "bin/python").exists():
            script = PEERS / f"setup_{name}.sh"
            if not script.exists():
                sys.exit(f"{name} is not installed at {venv} and {script} is missing: set OPENRLHF_VENV/TRL_VENV")
            print(f"installing {name} into {venv} ...", flush=True)
            subprocess.run(["bash", str(script), str(venv)], check=True)
    return venvs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="sft,dpo,lora,trl_sft,trl_dpo")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    p.add_argument("--save_step", type=int, default=2, help="the step every tool checkpoints at")
    p.add_argument("--warmup", type=int, default=1)
    # bf16 matmuls have no native kernel on this class of CPU (no AVX512-BF16/AMX): the 2-rank bf16 cases
    # take one short row per rank per step, or a run would take many minutes
    p.add_argument("--micro", type=int, default=1, help="2-rank cases: micro batch per rank")
    p.add_argument("--accum", type=int, default=1, help="2-rank cases: accumulation steps")
    p.add_argument("--single_micro", type=int, default=2, help="one-process cases: micro batch")
    p.add_argument("--single_batch", type=int, default=4, help="one-process cases: global batch")
    p.add_argument("--max_len", type=int, default=64)
    p.add_argument("--prime", action="store_true", help="one unmeasured launch per tool first (JIT builds)")
    p.add_argument("--work", default="/tmp/openrl_compare")
    p.add_argument("--model", default=None, help="a model folder instead of the SmolLM2-135M-shaped one (smoke runs)")
    p.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    p.add_argument("--tools", default="", help="comma-separated: only these tools of each case (a check, not a table)")
    p.add_argument("--report", action="store_true", help="only write --results from the figures under --work")
    a = p.parse_args()

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    venvs = ensure_peers()
    model = Path(a.model) if a.model else ensure_model(work)
    data = bench_data(work, model, a.max_len)
    cases = {c.name: c for c in build_cases(a, model, data, venvs)}
    raw_path = work / "raw.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    primed: set[str] = set()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    for name in [] if a.report else a.cases.split(","):
        results = run_case(cases[name], a, work, primed)
        raw[name] = {"measured": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}"
                                 + (" with uncommitted changes" if dirty else ""), "results": results}
        raw_path.write_text(json.dumps(raw, indent=1))  # a crash later keeps the cases already measured

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gib = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30)
    lines = ["# openrl_ckpt against its peers", "",
             f"{os.cpu_count()} CPU cores ({cpu}), {gib} GiB, no GPU; OpenRLHF 0.11.2 and TRL 1.16.0 in their own "
             "venvs. Reproduce: `python bench/compare_peers.py` (one case: `--cases sft`; every case keeps the date "
             "and commit it was measured at).", "",
             f"SmolLM2-135M-shaped model (random init, tied embeddings), shipped data filtered to max_len "
             f"{a.max_len}, {a.steps} steps per run (warm-up {a.warmup}), a checkpoint at step {a.save_step}, "
             f"{a.pairs} alternating pairs; medians over the pairs.", ""]
    for name in cases:  # every case measured so far, in the order of the issue
        if name in raw:
            entry = raw[name] if "results" in raw[name] else {"results": raw[name]}
            lines += table(cases[name], entry["results"], entry.get("measured"))
    results_path = Path(a.results)
    old = results_path.read_text() if results_path.exists() else ""
    findings = old[old.index(FINDINGS):] if FINDINGS in old else ""  # hand-written: kept across reruns
    results_path.write_text("\n".join(lines) + "\n" + findings)
    print("\n".join(lines))

if __name__ == "__main__":
    main()
