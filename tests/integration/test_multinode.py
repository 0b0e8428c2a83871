"""Two nodes on one machine (``nodes.py``: own hostname and storage per node, shared loopback), launched
as users launch multi-node jobs, each case ending with the weights of the one-node reference run (2
ranks either way) to the bit.

- ``deepspeed --hostfile --no_ssh --node_rank``, shared storage: one commit by one leader, and a stop
  signal at the moments of a run's life a step boundary does not cover (start-up, a save, resume, the
  final export; a stop at a step is test_fault_tolerance's), each answered by one line and exit 0;
- ``torchrun --nnodes 2``, node-local storage: each node's leader commits its node's files; kill -9 of a
  whole node, the survivor's one line naming it; then storages that disagree (the newest step on one
  node only, a damaged copy on the other): every rank resumes the newest step valid on every node.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import REPO, SFT_MODULE, assert_bitwise_equal, committed, env, no_traceback, one_line, sft_args, weights
from nodes import Launcher, TwoNodes, require_namespaces

pytestmark = pytest.mark.slow


def stopped_cleanly(job: TwoNodes) -> str:
    """Both nodes exited 0 without a traceback; their output together."""
    results = job.finish()
    for rc, output in results:
        no_traceback(output)
        assert rc == 0, output[-3000:]
    return "".join(output for _, output in results)


def test_shared_storage_over_deepspeed_no_ssh_and_a_stop_at_every_moment(tmp_path, reference, tiny_model_dir,
                                                                         sft_data):
    require_namespaces()
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    args = sft_args(tiny_model_dir, sft_data, ckpt, out)

    def launch(fault: str) -> str:
        marker = tmp_path / f"fired-{fault.split(':')[0]}"  # one rank gets the signal, whichever comes first
        return stopped_cleanly(TwoNodes(tmp_path, Launcher.DEEPSPEED, SFT_MODULE, args,
                                        OPENRL_FAULT=f"{fault}:once={marker}"))

    # 1) SIGTERM during start-up (the process group is up, data and model not loaded yet)
    output = launch("start:signal=SIGTERM")
    assert re.search(r"stopped by SIGTERM on rank \d during start-up, before step 1/24: nothing new to save; no "
                     r"checkpoint yet: a rerun of the same command starts afresh", output), output[-3000:]
    assert committed(ckpt) == []

    # 2) SIGTERM while step 5 is saved: the save completes, the run stops right after it
    output = launch("after_engines@5:signal=SIGTERM")
    line = one_line(output, "preempted by SIGTERM")
    assert re.search(r"on rank \d during a checkpoint save: checkpoint .*global_step5 committed at step 5/24", line)
    assert committed(ckpt) == ["global_step5"] and not out.exists()
    # shared storage: one leader committed one manifest holding both nodes' files
    assert "rank0]" in one_line(output, "saved checkpoint")
    files = json.loads((ckpt / "global_step5" / "manifest.json").read_text())["files"]
    assert {f"model/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(files)
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")], "no probe or staging folder left"

    # 3) SIGINT (Ctrl-C) while the rerun loads that checkpoint: nothing new to save
    output = launch("resume:signal=SIGINT")
    assert re.search(r"stopped by SIGINT on rank \d during resume, before step 6/24: nothing new to save; a rerun "
                     r"of the same command resumes from .*global_step5 \(step 5\)", output), output[-3000:]

    # 4) SIGTERM during the final export (rank 0 writes it): the export completes, nothing is left to do
    output = launch("export:signal=SIGTERM")
    assert "step 5/24" in one_line(output, "resumed from")
    one_line(output, "SIGTERM came during the final export after the last step: the run is complete")
    assert committed(ckpt)[-1] == "global_step24"
    assert_bitwise_equal(weights(reference / "out"), weights(out))


def ckpt_listing(storage: Path) -> list[tuple[int, bool, int]]:
    """(step, valid, consumed samples) of each checkpoint ``ckpt list`` finds in one node's storage."""
    res = subprocess.run([sys.executable, "-m", "openrl_ckpt.cli.ckpt", "list", str(storage), "--json"],
                         capture_output=True, text=True, cwd=REPO, env=env())
    assert res.returncode == 0, res.stderr
    return [(c["step"], c["valid"], c["consumed_samples"]) for c in json.loads(res.stdout)["checkpoints"]]


def test_node_local_storage_over_torchrun_a_lost_node_and_storages_that_disagree(tmp_path, reference, tiny_model_dir,
                                                                                 sft_data):
    require_namespaces()
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    storage = (tmp_path / "node0-disk", tmp_path / "node1-disk")
    for folder in (ckpt, *storage):
        folder.mkdir()
    args = sft_args(tiny_model_dir, sft_data, ckpt, out)

    # 1) kill -9 of node 1 (its launcher and rank) in the middle of step 17's work
    job = TwoNodes(tmp_path, Launcher.TORCHRUN, SFT_MODULE, args, storage=storage, mount_at=ckpt)
    job.nodes[0].wait_for("step 17/24")
    killed_at = job.kill_node(1)
    rc, output = job.nodes[0].finish()
    waited = time.monotonic() - killed_at
    job.nodes[1].finish()
    assert rc != 0
    line = one_line(output, "error: lost rank 1 on host node1 (its heartbeat stopped)")
    assert "Rerun the same command" in line
    assert waited < 60, f"the survivor took {waited:.0f}s to stop"  # a bound, not a timing: the default wait is 10 min
    # each node's leader committed its node's files: node 1 wrote its own copy of the model states
    for disk in storage:
        assert committed(disk) == ["global_step5", "global_step10", "global_step15"]
    node1_files = json.loads((storage[1] / "global_step15" / "manifest.json").read_text())["files"]
    assert "model/mp_rank_00_model_states.pt" in node1_files
    assert "model/zero_pp_rank_1_mp_rank_00_optim_states.pt" in node1_files
    assert "model/zero_pp_rank_0_mp_rank_00_optim_states.pt" not in node1_files

    # 2) The storages disagree: node 1 lost step 15 (as if it died before committing; its latest names 10),
    #    and node 0's copy of step 10 is damaged. Every rank resumes step 5, the newest valid on both.
    shutil.rmtree(storage[1] / "global_step15")
    (storage[1] / "latest").write_text("global_step10\n")
    damaged = storage[0] / "global_step10" / "model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    results = TwoNodes(tmp_path, Launcher.TORCHRUN, SFT_MODULE, args, storage=storage, mount_at=ckpt).finish()
    for rc, node_output in results:
        no_traceback(node_output)
        assert rc == 0, node_output[-3000:]
    output = results[0][1]
    one_line(output, "checkpoint steps 15 are committed on the storage of some nodes only")
    one_line(output, "global_step10 is damaged, skipping it")
    one_line(output, "resumed from")
    assert "step 5/24, epoch 0, 40 samples consumed" in one_line(output, "resumed from")
    assert_bitwise_equal(weights(reference / "out"), weights(out))
    # `ckpt list` on each node: the same checkpoints, all valid, at the same data position
    listings = [ckpt_listing(disk) for disk in storage]
    assert listings[0] == listings[1] and all(valid for _, valid, _ in listings[0]), listings
    assert [step for step, _, _ in listings[0]] == [5, 10, 15, 20, 24]
