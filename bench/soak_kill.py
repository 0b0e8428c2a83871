"""Soak test of the kill -9 / resume promise: kill a 2-rank run at a random moment, rerun it, compare weights.

    python bench/soak_kill.py --job sft|ppo --zero_stage 2|3 --trials N --seed S [--window run|training]
        [--out file.json] [--keep]

One uninterrupted reference run first, launched as users launch it (``deepspeed --num_gpus 2 --master_port
<free> --module openrl_ckpt.cli.train_sft ...`` or ``train_ppo``, DeepSpeed's CPU accelerator) and timed:
its wall time T from launch to exit. Then N trials, each with its own fresh --ckpt_path and --save_path:
1. the same command, SIGKILLed as a whole process group (launcher and both ranks, as a node failure would)
   at a moment drawn uniformly from [0, T), so start-up, model load, steps, saves and the final export are
   all hit in proportion to the time they take (``--window training``: from the moment rank 0 says where
   training starts, so steps, saves and the final export are hit more often);
2. the same command again, not killed, until it exits 0 with its model written (at most --max_reruns
   tries; exit 0 without the model is a handled stop signal, as after a preemption);
3. the final --save_path weights (and PPO's critic export) compared with the reference's, bit for bit.
A trial's run keeps its --master_port across the kill and the reruns, as a user's rerun would.

Prints a table of the trials (kill moment, what the run was doing then, read from the last log lines it
wrote: start-up, ``step k`` in flight, ``saving step k``, the final model export; the checkpoints committed
at the kill; the reruns' exit codes; where the rerun resumed; bitwise equal or the largest difference),
the share of trials that ended bitwise equal, the kill moments by phase, and every failure with the tail
of its output. ``--out`` also writes all of it as JSON. Work files live in a temporary folder, removed at
the end unless ``--keep``. Exit code 0 when every trial ended bitwise equal with a rerun that exited 0.

The models are the tiny local ones (``openrl_ckpt.utils.tiny``; the SFT/actor model has attention dropout,
so a resume must restore the RNG), the data is the shipped examples/data. One run takes ~35 s (SFT, 20 steps)
or ~55 s (PPO, 4 rollouts) on 2 idle CPU cores and two to three times that when the cores are shared, about
three quarters of it start-up (launcher, imports, process group, engines), so most kills land there; a trial
costs about 1.5 T. ``soak()`` is the same thing as a function (tests/integration/test_soak.py calls it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"
TAIL_CHARS = 3000

# what the CLIs log (rank 0), in the order a run writes it
STEP_LINE = re.compile(r"^step (\d+)/(\d+) ")
SAVED_CHECKPOINT = re.compile(r"saved checkpoint \S*global_step(\d+) ")
DATA_LOADED = re.compile(r"\] (train data|prompts): ")
LOOP_START = re.compile(r"--load_checkpoint: no checkpoint in |resumed from ")
MODEL_EXPORTED = "saved the Hugging Face model to "
RESUMED = re.compile(r"resumed from (\S+): step (\d+)/(\d+), epoch (\d+), (\d+) samples consumed")
STARTED_FRESH = "--load_checkpoint: no checkpoint in "
DAMAGED = "is damaged, skipping it"


# ---------------------------------------------------------------------------------------------- the jobs
@dataclass(frozen=True)
class JobSpec:
    """One job's command line, minus the per-run paths, and what its run should leave behind."""

    module: str
    args: list[str]
    save_steps: int
    exports: list[str] = field(default_factory=lambda: [""])  # suffixes of --save_path that hold weights


@dataclass(frozen=True)
class Assets:
    model: Path  # tiny Llama with attention dropout, tokenizer included
    reward: Path | None = None
    critic: Path | None = None


def build_assets(job: str, folder: Path) -> Assets:
    """The tiny models a job needs, built locally and deterministically (no hub access)."""
    from openrl_ckpt.utils.tiny import build_reward_model, build_tiny_model, build_tiny_tokenizer, example_texts

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = folder / "tokenizer"
    build_tiny_tokenizer(str(tokenizer), example_texts(DATA))
    model = Path(build_tiny_model(str(folder / "model"), str(tokenizer), attention_dropout=0.1))
    if job != "ppo":
        return Assets(model)
    reward = Path(build_reward_model(str(folder / "reward"), str(model), seed=3))
    critic = Path(build_reward_model(str(folder / "critic"), str(model), seed=4))
    return Assets(model, reward, critic)


def job_spec(job: str, zero_stage: int, assets: Assets) -> JobSpec:
    if job == "sft":
        # 160 rows, global batch 16 = micro 2 x 2 ranks x 4 accumulation steps: 10 steps an epoch, 2 epochs;
        # a checkpoint every 3 steps (one of them straddles the epoch boundary) and the final one at step 20
        save_steps = 3
        args = ["--pretrain", str(assets.model), "--dataset", str(DATA / "sft.jsonl"), "--max_samples", "160",
                "--input_key", "question", "--output_key", "response", "--input_template", "User: {}\nAssistant: ",
                "--max_len", "256", "--train_batch_size", "16", "--micro_train_batch_size", "2",
                "--max_epochs", "2", "--learning_rate", "5e-4", "--zero_stage", str(zero_stage),
                "--save_steps", str(save_steps), "--load_checkpoint", "--max_ckpt_num", "2",
                "--max_ckpt_mem", "10", "--logging_steps", "1", "--seed", "3"]
        return JobSpec("openrl_ckpt.cli.train_sft", args, save_steps)
    if job == "ppo":
        assert assets.reward is not None and assets.critic is not None
        # test_ppo.py's bitwise-resume arguments on 16 prompts: 8 prompts x 4 samples a rollout, 2 rollouts an
        # episode, 2 episodes = 4 steps, a checkpoint after each; ptx loss and EMA, whose state is checkpointed
        save_steps = 1
        args = ["--pretrain", str(assets.model), "--reward_pretrain", str(assets.reward),
                "--critic_pretrain", str(assets.critic), "--prompt_data", str(DATA / "prompts.jsonl"),
                "--max_samples", "16", "--input_key", "prompt", "--rollout_batch_size", "8",
                "--n_samples_per_prompt", "4", "--micro_rollout_batch_size", "8", "--train_batch_size", "16",
                "--micro_train_batch_size", "4", "--generate_max_len", "2", "--max_epochs", "2",
                "--num_episodes", "2", "--actor_learning_rate", "1e-2", "--critic_learning_rate", "1e-2",
                "--lr_scheduler", "constant", "--lr_warmup_ratio", "0", "--init_kl_coef", "0.01",
                "--zero_stage", str(zero_stage), "--save_steps", str(save_steps), "--load_checkpoint",
                "--max_ckpt_num", "2", "--save_value_network", "--pretrain_data", str(DATA / "sft.jsonl"),
                "--pretrain_input_key", "question", "--ptx_coef", "0.05", "--enable_ema", "--ema_beta", "0.9",
                "--seed", "7"]
        return JobSpec("openrl_ckpt.cli.train_ppo", args, save_steps, exports=["", "_critic"])
    raise ValueError(f"unknown job {job!r}: sft or ppo")


# ---------------------------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONHASHSEED="0", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.pop("OPENRL_FAULT", None)  # no injected faults: the kill is the only one
    return env


def deepspeed_launcher() -> str:
    beside = Path(sys.executable).with_name("deepspeed")  # the venv's own, whether or not it is activated
    return str(beside) if beside.exists() else (shutil.which("deepspeed") or "deepspeed")


def launch_command(spec: JobSpec, port: int, ckpt: Path, out: Path) -> list[str]:
    return [deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(port), "--module", spec.module,
            *spec.args, "--ckpt_path", str(ckpt), "--save_path", str(out)]


@dataclass
class Launch:
    exit_code: int | None  # None: it timed out and was killed
    wall_s: float
    output: str
    killed_at_s: float | None = None  # None: not killed (it ended on its own first)
    stragglers: int = 0  # processes of its group still alive after the kill
    loop_start_s: float | None = None  # when rank 0 said where training starts (fresh or resumed)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def launch(cmd: list[str], log_file: Path, *, kill_after_s: float | None = None, timeout_s: float = 600) -> Launch:
    """Run ``cmd`` in a session of its own; SIGKILL its whole process group ``kill_after_s`` seconds after the
    launch (if it is still running then), or when it runs past ``timeout_s``."""
    started = time.monotonic()
    with log_file.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                env=run_env(), start_new_session=True)
        chunks: list[str] = []
        loop_start: list[float] = []

        def read() -> None:  # a thread, so the kill lands on time whatever the run prints
            assert proc.stdout is not None
            for line in proc.stdout:
                chunks.append(line)
                log.write(line)
                if not loop_start and LOOP_START.search(line):
                    loop_start.append(time.monotonic() - started)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = timeout_s if kill_after_s is None else min(kill_after_s, timeout_s)
        planned_kill = deadline != timeout_s
        killed_at = None
        try:
            proc.wait(timeout=max(deadline - (time.monotonic() - started), 0))
        except subprocess.TimeoutExpired:
            killed_at = time.monotonic() - started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # the ranks are the launcher's children: wait until every member of the group is gone, so a rerun
        # never shares the checkpoint folder with a dying rank
        settle = time.monotonic() + 10
        while group_alive(proc.pid) and time.monotonic() < settle:
            time.sleep(0.05)
        stragglers = int(group_alive(proc.pid))
        if stragglers:
            os.killpg(proc.pid, signal.SIGKILL)
        reader.join(timeout=10)
    timed_out = killed_at is not None and not planned_kill
    return Launch(exit_code=None if timed_out else proc.returncode, wall_s=time.monotonic() - started,
                  output="".join(chunks), killed_at_s=None if timed_out else killed_at, stragglers=stragglers,
                  loop_start_s=loop_start[0] if loop_start else None)


# ---------------------------------------------------------------------------------------------- reading logs
def kill_phase(output: str, save_steps: int, n_exports: int) -> tuple[str, str, str]:
    """(kind, phase, last line) of a killed run: what it was doing when it died, from what rank 0 had logged.

    Everything in the output was written before the kill (the processes are dead), so the last telling line
    is where the run stood, give or take the work since that line."""
    kind, phase, last = "start-up", "start-up (launch, imports, data)", ""
    exports, total = 0, None
    for raw in output.splitlines():
        line = raw.strip()
        if not line or line.startswith(("Writing model shards", "Loading weights")):
            continue  # progress bars: no news
        last = line
        step = STEP_LINE.match(line)
        saved = SAVED_CHECKPOINT.search(line)
        if DATA_LOADED.search(line):
            kind, phase = "start-up", "start-up (model, engines)"
        elif LOOP_START.search(line):
            kind, phase = "step", "step 1"
        elif step:
            k, total = int(step.group(1)), int(step.group(2))
            # the step's log line comes before its save, so a save step's line opens the save
            if k % save_steps == 0 or k == total:
                kind, phase = "save", f"saving step {k}" + (" (final)" if k == total else "")
            else:
                kind, phase = "step", f"step {k + 1}"
        elif saved:
            k = int(saved.group(1))
            kind, phase = ("export", "saving the model") if k == total else ("step", f"step {k + 1}")
        elif MODEL_EXPORTED in line:
            exports += 1
            kind, phase = ("exit", "exiting") if exports >= n_exports else ("export", "saving the model")
    return kind, phase, last


@dataclass
class ResumeInfo:
    resumed_from: str | None  # the checkpoint folder's name, None when it started fresh or never got that far
    resumed_step: int | None
    started_fresh: bool
    damaged: list[str]


def resume_info(output: str) -> ResumeInfo:
    found = RESUMED.search(output)
    damaged = [line.strip() for line in output.splitlines() if DAMAGED in line]
    if found:
        return ResumeInfo(Path(found.group(1)).name, int(found.group(2)), False, damaged)
    return ResumeInfo(None, None, STARTED_FRESH in output, damaged)


def checkpoint_folders(ckpt: Path) -> tuple[list[int], list[str]]:
    """(committed steps, names of other entries such as staging folders) under --ckpt_path."""
    if not ckpt.is_dir():
        return [], []
    steps, others = [], []
    for entry in ckpt.iterdir():
        if entry.name.startswith("global_step") and entry.name.removeprefix("global_step").isdigit():
            steps.append(int(entry.name.removeprefix("global_step")))
        elif entry.name != "latest":
            others.append(entry.name)
    return sorted(steps), sorted(others)


def tail(text: str) -> str:
    return text[-TAIL_CHARS:]


# ---------------------------------------------------------------------------------------------- comparing
@dataclass
class Comparison:
    equal: bool
    max_abs_diff: float | None  # None when equal
    differing: list[str]  # tensor names (or a missing file / key) that differ
    problem: str | None = None


def compare_exports(reference: Path, trial: Path, suffixes: list[str]) -> Comparison:
    import torch
    from safetensors.torch import load_file

    differing: list[str] = []
    max_diff = 0.0
    for suffix in suffixes:
        ref_dir, trial_dir = Path(f"{reference}{suffix}"), Path(f"{trial}{suffix}")
        files = sorted(p.name for p in ref_dir.glob("*.safetensors"))
        if not files:  # nothing to compare is no evidence of equality
            return Comparison(False, None, [str(ref_dir)], f"{ref_dir}: the reference wrote no safetensors")
        missing = [name for name in files if not (trial_dir / name).exists()]
        if missing:
            return Comparison(False, None, [str(trial_dir / m) for m in missing], f"{trial_dir}: no {missing[0]}")
        for name in files:
            ref_tensors, trial_tensors = load_file(str(ref_dir / name)), load_file(str(trial_dir / name))
            for key in sorted(ref_tensors.keys() | trial_tensors.keys()):
                a, b = ref_tensors.get(key), trial_tensors.get(key)
                if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
                    differing.append(f"{suffix or 'model'}:{key}")
                    max_diff = float("inf")
                elif not torch.equal(a, b):
                    differing.append(f"{suffix or 'model'}:{key}")
                    max_diff = max(max_diff, (a.double() - b.double()).abs().max().item())
    if differing:
        return Comparison(False, max_diff, differing)
    return Comparison(True, None, [])


# ---------------------------------------------------------------------------------------------- the soak
@dataclass
class Rerun:
    exit_code: int | None
    wall_s: float
    resumed_from: str | None
    resumed_step: int | None
    started_fresh: bool
    damaged: list[str]
    output_tail: str | None  # only for a rerun that failed


@dataclass
class Trial:
    index: int
    kill_at_s: float  # the drawn moment
    killed_at_s: float | None  # when the kill landed; None when the run had ended first
    killed_exit_code: int | None
    phase_kind: str  # start-up, step, save, export, exit, or finished (ended before the kill)
    phase: str
    last_line: str
    committed_at_kill: list[int]
    other_at_kill: list[str]  # staging (.tmp-*) or deleted (.del-*) folders the kill left
    stragglers: int
    reruns: list[Rerun]
    rerun_exit_code: int | None  # the last rerun's
    expected_resume_step: int | None  # the newest checkpoint committed at the kill
    bitwise_equal: bool
    max_abs_diff: float | None
    differing: list[str]
    wall_s: float
    failure: str | None = None
    notes: list[str] = field(default_factory=list)
    killed_output_tail: str | None = None  # only for a failed trial


@dataclass
class SoakResult:
    job: str
    zero_stage: int
    seed: int
    reference_wall_s: float
    reference_steps: list[int]  # checkpoints the reference committed, rotation included
    trials: list[Trial]
    window: str = "run"  # what the kill moments were drawn over: the whole run, or its training

    @property
    def equal_share(self) -> float:
        return sum(t.bitwise_equal for t in self.trials) / max(len(self.trials), 1)

    @property
    def failures(self) -> list[Trial]:
        return [t for t in self.trials if t.failure]

    @property
    def ok(self) -> bool:
        return bool(self.trials) and not self.failures

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(equal_share=self.equal_share, ok=self.ok, failures=[t.index for t in self.failures])
        return data


class SoakError(RuntimeError):
    """The reference run itself failed: nothing to compare with."""


def soak(job: str, zero_stage: int, trials: int, seed: int, workdir: Path, *, max_reruns: int = 3,
         echo: bool = False, window: str = "run") -> SoakResult:
    """The reference run, then ``trials`` kill -9 / rerun / compare trials, all under ``workdir``. ``window``:
    the kill moment is uniform over the whole run (``run``: launch to exit) or over its training (``training``:
    from the moment rank 0 says where training starts to the exit: steps, saves and the final export)."""
    workdir = Path(workdir)
    say = print if echo else (lambda *_args, **_kw: None)
    spec = job_spec(job, zero_stage, build_assets(job, workdir / "assets"))

    ref_dir = workdir / "reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    say(f"reference run: {job} ZeRO-{zero_stage} ...", flush=True)
    ref = launch(launch_command(spec, free_port(), ref_dir / "ckpt", ref_dir / "out"), ref_dir / "run.log")
    if ref.exit_code != 0:
        raise SoakError(f"the reference run exited {ref.exit_code}:\n{tail(ref.output)}")
    reference_steps = sorted({int(m) for m in SAVED_CHECKPOINT.findall(ref.output)})
    say(f"reference run: {ref.wall_s:.1f} s, checkpoints at steps {reference_steps}", flush=True)
    # launch to exit; under load a trial's run may take longer, so its last seconds are hit less often
    window_s = ref.wall_s
    window_start_s = 0.0
    if window == "training":
        if ref.loop_start_s is None:
            raise SoakError("the reference run never said where training starts")
        window_start_s = ref.loop_start_s
    draw = random.Random(seed)
    timeout_s = max(300.0, 8 * window_s)

    results = []
    for index in range(1, trials + 1):
        started = time.monotonic()
        trial_dir = workdir / f"trial-{index:03d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        ckpt, out = trial_dir / "ckpt", trial_dir / "out"
        cmd = launch_command(spec, free_port(), ckpt, out)  # one port per trial: the rerun is the same command
        kill_at = draw.uniform(window_start_s, window_s)
        killed = launch(cmd, trial_dir / "killed.log", kill_after_s=kill_at, timeout_s=timeout_s)
        kind, phase, last = kill_phase(killed.output, spec.save_steps, len(spec.exports))
        if killed.killed_at_s is None:
            kind, phase = "finished", f"finished before the kill (exit {killed.exit_code})"
        committed, others = checkpoint_folders(ckpt)
        notes = []
        if killed.stragglers:
            notes.append("processes of the killed run outlived the SIGKILL of its group by 10 s")
        if killed.killed_at_s is None and killed.exit_code != 0:
            notes.append(f"the run to be killed failed on its own first (exit {killed.exit_code})")

        reruns: list[Rerun] = []
        for attempt in range(1, max_reruns + 1):
            rerun = launch(cmd, trial_dir / f"rerun-{attempt}.log", timeout_s=timeout_s)
            info = resume_info(rerun.output)
            reruns.append(Rerun(rerun.exit_code, round(rerun.wall_s, 2), info.resumed_from, info.resumed_step,
                                info.started_fresh, info.damaged,
                                None if rerun.exit_code == 0 else tail(rerun.output)))
            # exit 0 is also a handled stop (a preemption signal before the end): done only with the model written
            written = all(any(Path(f"{out}{suffix}").glob("*.safetensors")) for suffix in spec.exports)
            if rerun.exit_code == 0 and written:
                break

        expected = committed[-1] if committed else None
        first = reruns[0]
        if not (first.resumed_step == expected if expected is not None else first.started_fresh):
            notes.append(f"the first rerun resumed from step {first.resumed_step} (fresh: {first.started_fresh}); "
                         f"the newest checkpoint committed at the kill was step {expected}")
        notes += [f"rerun {n}: {line}" for n, r in enumerate(reruns, 1) for line in r.damaged]

        failure = None
        comparison = Comparison(False, None, [])
        if reruns[-1].exit_code != 0:
            failure = f"no rerun exited 0 in {max_reruns} tries (exit codes {[r.exit_code for r in reruns]})"
        else:
            comparison = compare_exports(ref_dir / "out", out, spec.exports)
            if comparison.problem:
                failure = comparison.problem
            elif not comparison.equal:
                failure = (f"{len(comparison.differing)} tensors differ from the reference, e.g. "
                           f"{comparison.differing[:3]}, max abs difference {comparison.max_abs_diff:.3g}")
        trial = Trial(index=index, kill_at_s=round(kill_at, 2),
                      killed_at_s=None if killed.killed_at_s is None else round(killed.killed_at_s, 2),
                      killed_exit_code=killed.exit_code, phase_kind=kind, phase=phase, last_line=last[:200],
                      committed_at_kill=committed, other_at_kill=others, stragglers=killed.stragglers,
                      reruns=reruns, rerun_exit_code=reruns[-1].exit_code, expected_resume_step=expected,
                      bitwise_equal=comparison.equal, max_abs_diff=comparison.max_abs_diff,
                      differing=comparison.differing[:20], wall_s=round(time.monotonic() - started, 2),
                      failure=failure, notes=notes,
                      killed_output_tail=tail(killed.output) if failure else None)
        results.append(trial)
        say(f"trial {index}/{trials}: killed at {kill_at:.1f} s ({phase}), "
            f"{'bitwise equal' if trial.bitwise_equal else 'NOT equal'}"
            f"{'' if failure is None else ', FAILED: ' + failure} ({trial.wall_s:.0f} s)", flush=True)
    return SoakResult(job, zero_stage, seed, round(ref.wall_s, 2), reference_steps, results, window)


# ---------------------------------------------------------------------------------------------- reporting
def resumed_text(trial: Trial) -> str:
    first = trial.reruns[0]
    if first.resumed_step is not None:
        return f"step {first.resumed_step}"
    return "fresh" if first.started_fresh else "?"


def summary(result: SoakResult) -> str:
    rows = [f"soak_kill: {result.job} ZeRO-{result.zero_stage}, {len(result.trials)} trial(s), seed {result.seed}; "
            f"reference {result.reference_wall_s:.1f} s, checkpoints at steps {result.reference_steps}, kill moments "
            f"over the {'whole run' if result.window == 'run' else 'training'}", ""]
    header = (f"{'trial':>5}  {'kill s':>6}  {'phase':<32} {'committed':<12} {'reruns':<8} {'resumed':<8} "
              f"{'equal':<5} {'max|diff|':>9}  {'trial s':>7}")
    rows += [header, "-" * len(header)]
    for t in result.trials:
        committed = ",".join(map(str, t.committed_at_kill)) or "-"
        if t.other_at_kill:
            committed += " +" + ",".join(name.split("global_step")[-1] for name in t.other_at_kill)
        exits = ",".join("T/O" if r.exit_code is None else str(r.exit_code) for r in t.reruns)
        diff = "-" if t.max_abs_diff is None else f"{t.max_abs_diff:.3g}"
        rows.append(f"{t.index:>5}  {t.kill_at_s:>6.1f}  {t.phase:<32} {committed:<12} {exits:<8} "
                    f"{resumed_text(t):<8} {'yes' if t.bitwise_equal else 'NO':<5} {diff:>9}  {t.wall_s:>7.1f}")
    rows.append("(committed: checkpoint steps on disk at the kill; +N: a staging or deleted folder of step N)")
    equal = sum(t.bitwise_equal for t in result.trials)
    rows += ["", f"bitwise equal: {equal}/{len(result.trials)} ({100 * result.equal_share:.0f}%)"]
    kinds: dict[str, int] = {}
    for t in result.trials:
        kinds[t.phase_kind] = kinds.get(t.phase_kind, 0) + 1
    rows.append("kill moments: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    notes = [(t.index, n) for t in result.trials for n in t.notes]
    if notes:
        rows.append("notes:")
        rows += [f"  trial {i}: {n}" for i, n in notes]
    if not result.failures:
        rows.append("failures: none")
    for t in result.failures:
        rows += ["", f"FAILURE in trial {t.index} (killed at {t.kill_at_s:.1f} s, {t.phase}): {t.failure}"]
        failed = next((r for r in t.reruns if r.output_tail), None)
        if failed is not None:
            rows += ["--- tail of the failed rerun ---", failed.output_tail or ""]
        elif t.killed_output_tail:
            rows += ["--- tail of the killed run ---", t.killed_output_tail]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=["sft", "ppo"], default="sft")
    parser.add_argument("--zero_stage", type=int, choices=[2, 3], default=2)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--max_reruns", type=int, default=3, help="reruns after the kill before a trial fails")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, checkpoints, models)")
    parser.add_argument("--window", choices=["run", "training"], default="run",
                        help="kill moments uniform over the whole run (launch to exit), or over its training only "
                             "(steps, saves, the final export), which start-up otherwise dominates")
    args = parser.parse_args()

    from transformers.utils import logging as transformers_logging

    # building the tiny models in this process: their progress bars and load reports are noise here
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    workdir = Path(tempfile.mkdtemp(prefix=f"soak_kill-{args.job}-z{args.zero_stage}-"))
    try:
        result = soak(args.job, args.zero_stage, args.trials, args.seed, workdir, max_reruns=args.max_reruns,
                      echo=True, window=args.window)
    finally:
        if args.keep:
            print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(summary(result))
    if args.out:
        args.out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
