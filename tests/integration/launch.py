"""Launch the real CLIs (deepspeed with 2 CPU ranks, or one process) and inspect what they leave."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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
