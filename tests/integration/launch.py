"""Launch the real CLIs (deepspeed with 2 CPU ranks, or one process) and inspect what they leave."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    e.pop("OPENRL_FAULT", None)
    e.update(extra)
    return e


def launch_cmd(module: str, args: list[str], ranks: int = 2) -> list[str]:
    if ranks == 0:  # a plain single process: python -m
        return [sys.executable, "-m", module, *args]
    return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", module, *args]


@dataclass
class Result:
    returncode: int
    output: str

    def lines(self, needle: str) -> list[str]:
        return [line for line in self.output.splitlines() if needle in line]


def run(cmd: list[str], *, timeout: float = 600, kill_when: str | None = None, **env_extra: str) -> Result:
    """Run to the end, or SIGKILL the whole process group as soon as ``kill_when`` appears in the output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=env(**env_extra), start_new_session=True)
    out: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            out.append(line)
            if kill_when and kill_when in line:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole run at once, as a node failure would
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd} ran past {timeout}s")
        proc.wait(timeout=60)
        out.append(proc.stdout.read() if not proc.stdout.closed else "")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return Result(proc.returncode, "".join(out))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def committed(ckpt: Path) -> list[str]:
    return sorted((p.name for p in ckpt.iterdir() if p.name.startswith("global_step")),
                  key=lambda n: int(n.removeprefix("global_step")))


SFT_MODULE = "openrl_ckpt.cli.train_sft"
SFT_STEPS = 24  # sft_args on 90 rows: global batch 8, 12 steps per epoch, 2 epochs


def sft_args(model: str, data: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    # micro batch 1: the per-micro-batch loss is then per sample, so 2 ranks x 4 accumulation steps and
    # 1 rank x 8 compute the same gradient (up to summation order) and a resume on another world size
    # can be compared with the reference run.
    return ["--pretrain", model, "--dataset", str(data), "--input_key", "question", "--output_key", "response",
            "--input_template", "User: {}\nAssistant: ", "--max_len", "256", "--train_batch_size", "8",
            "--micro_train_batch_size", "1", "--max_epochs", "2", "--learning_rate", "5e-4", "--zero_stage", "2",
            "--save_steps", "5", "--ckpt_path", str(ckpt), "--load_checkpoint", "--max_ckpt_num", "10",
            "--max_ckpt_mem", "10", "--save_path", str(out), "--logging_steps", "1", "--seed", "3", *extra]


class Live:
    """A launched run whose output is read in the background, so a test can act on a log line
    (signal one rank, the whole job, or SIGKILL it) and then collect the rest."""

    def __init__(self, cmd: list[str], **env_extra: str) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                     env=env(**env_extra), start_new_session=True)
        self.lines: list[str] = []
        self.ended = False
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cv:
                self.lines.append(line)
                self.cv.notify_all()
        with self.cv:
            self.ended = True
            self.cv.notify_all()

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        with self.cv:
            while not any(text in line for line in self.lines):
                assert not self.ended, f"the run ended before {text!r}:\n{''.join(self.lines)[-4000:]}"
                assert time.monotonic() < deadline, f"no {text!r} within {timeout}s"
                self.cv.wait(1)

    def ranks(self) -> dict[int, int]:
        """local rank -> pid of the training processes below the launched command."""
        import psutil

        out = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = " ".join(child.cmdline())
            except psutil.Error:
                continue
            m = re.search(r"--local_rank=(\d+)", cmd)
            if m and "deepspeed.launcher" not in cmd:
                out[int(m.group(1))] = child.pid
        return out

    def signal_all(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        """Wait until every process of the run has exited (ranks can outlive a signalled launcher)."""
        deadline = time.monotonic() + timeout
        try:
            with self.cv:
                while not self.ended:
                    assert time.monotonic() < deadline, "the run did not end"
                    self.cv.wait(1)
            self.proc.wait(timeout=60)
            while _group_alive(self.proc.pid):
                assert time.monotonic() < deadline, "processes of the run are left"
                time.sleep(0.2)
        finally:
            if _group_alive(self.proc.pid):
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode, "".join(self.lines)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def no_traceback(output: str) -> None:
    assert "Traceback" not in output, output[-5000:]


def one_line(output: str, needle: str) -> str:
    lines = [line for line in output.splitlines() if needle in line]
    assert len(lines) == 1, f"{needle!r}: {lines}\n{output[-3000:]}"
    return lines[0]
