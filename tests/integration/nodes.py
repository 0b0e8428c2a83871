"""Two "nodes" on one machine: each in its own Linux UTS and mount namespaces (its own hostname, its
own storage bind-mounted at the same path, so one --ckpt_path can be node-local), on the shared
loopback network, launched as users launch multi-node jobs: ``deepspeed --hostfile H --no_ssh
--node_rank i`` or ``torchrun --nnodes 2 --node_rank i``. Needs root (or user namespaces)."""

from __future__ import annotations

import contextlib
import enum
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import DEEPSPEED, Live, free_port

HOSTS = ("node0", "node1")


class Launcher(str, enum.Enum):
    DEEPSPEED = "deepspeed"
    TORCHRUN = "torchrun"


def require_namespaces() -> None:
    """Skip, saying why, on a machine where namespaces cannot be made."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare")
    probe = subprocess.run(["unshare", "--uts", "--mount", "--", "hostname", "probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create UTS and mount namespaces here: {probe.stderr.strip()}")


def node_command(node: int, cmd: list[str], *, storage: Path | None = None, mount_at: Path | None = None) -> list[str]:
    """``cmd`` on node ``node``: hostname node<i>; with ``storage``, that folder appears at ``mount_at``."""
    steps = [f"hostname {HOSTS[node]}"]
    if storage is not None:
        assert mount_at is not None
        steps.append(f"mount --bind {shlex.quote(str(storage))} {shlex.quote(str(mount_at))}")
    script = " && ".join(steps) + ' && exec "$@"'
    return ["unshare", "--uts", "--mount", "--", "bash", "-c", script, "node", *cmd]


class TwoNodes:
    """One job on two nodes of one rank each (so the world is 2 ranks, as ``--num_gpus 2`` on one)."""

    def __init__(self, tmp: Path, launcher: Launcher, module: str, args: list[str], *,
                 storage: tuple[Path, Path] | None = None, mount_at: Path | None = None, **env_extra: str) -> None:
        self.port = free_port()
        hostfile = tmp / "hostfile"
        hostfile.write_text("".join(f"{h} slots=1\n" for h in HOSTS))
        self.nodes: list[Live] = []
        for node in range(2):
            if launcher is Launcher.DEEPSPEED:
                cmd = [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                       "--master_addr", "127.0.0.1", "--master_port", str(self.port), "--module", module, *args]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                       "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(self.port),
                       "-m", module, *args]
            wrapped = node_command(node, cmd, storage=storage[node] if storage else None, mount_at=mount_at)
            # GLOO_SOCKET_IFNAME: the node names resolve nowhere; gloo would warn and fall back to loopback
            self.nodes.append(Live(wrapped, GLOO_SOCKET_IFNAME="lo", **env_extra))

    def finish(self, timeout: float = 300) -> list[tuple[int, str]]:
        return [node.finish(timeout) for node in self.nodes]

    def kill_node(self, node: int) -> float:
        """SIGKILL every process of one node at once, as a power loss would (every process in its UTS
        namespace: torchrun starts its workers in sessions of their own); returns when (monotonic)."""
        namespace = os.readlink(f"/proc/{self.nodes[node].proc.pid}/ns/uts")
        assert namespace != os.readlink("/proc/self/ns/uts"), "the node runs in a namespace of its own"
        for pid in _pids_in(namespace):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return time.monotonic()


def _pids_in(uts_namespace: str) -> list[int]:
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if os.readlink(entry / "ns" / "uts") == uts_namespace:
                pids.append(int(entry.name))
    return pids
