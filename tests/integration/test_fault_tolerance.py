"""Fault tolerance beyond kill -9: preemption signals, a second signal during the save, async saves
killed mid-write, a full disk, a resume on another number of ranks, and automatic restarts.

Every scenario runs the real CLI (2 CPU ranks) and ends by comparing with one uninterrupted run:
the same weights to the bit where the world size is unchanged, the same samples at every step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from launch import (
    REPO,
    Live,
    assert_bitwise_equal,
    committed,
    env,
    launch_cmd,
    no_traceback,
    one_line,
    run,
    sft_args,
    weights,
)
from launch import SFT_MODULE as MODULE
from launch import SFT_STEPS as TOTAL

pytestmark = pytest.mark.slow


def sample_records(folder: Path) -> dict[tuple[int, int], list[list[int]]]:
    """(rank, step) -> the sample ids of every run that trained that step (OPENRL_SAMPLE_LOG records,
    several when a step was trained again after a resume)."""
    out: dict[tuple[int, int], list[list[int]]] = defaultdict(list)
    for f in folder.glob("rank*.jsonl"):
        rank = int(f.stem.removeprefix("rank"))
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out[rank, rec["step"]].append(rec["ids"])
    return out


def samples_per_step(folder: Path) -> dict[int, list[int]]:
    """step -> the sorted ids all ranks trained on at that step, as the last run that trained it saw them."""
    out: dict[int, list[int]] = defaultdict(list)
    for (_, step), runs in sample_records(folder).items():
        out[step].extend(runs[-1])
    return {step: sorted(ids) for step, ids in out.items()}


def tb_losses(logdir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("loss")]


def test_crashes_preemption_async_kill_and_full_disk_then_bitwise_resume(tmp_path, reference, tiny_model_dir,
                                                                        sft_data):
    ckpt, out, tb, wandb_dir = tmp_path / "ckpt", tmp_path / "out", tmp_path / "tb", tmp_path / "wandb"
    samples = tmp_path / "samples"
    wandb_dir.mkdir()

    def launch(*extra: str, restarts: bool = False, **env_extra: str) -> Live:
        cmd = launch_cmd(MODULE, sft_args(tiny_model_dir, sft_data, ckpt, out, "--use_tensorboard", str(tb),
                                          "--use_wandb", "True", *extra))
        if restarts:
            cmd = [sys.executable, "-m", "openrl_ckpt.cli.restart", "--max_restarts", "2", "--restart_delay", "1",
                   "--", *cmd]
        return Live(cmd, OPENRL_SAMPLE_LOG=str(samples), WANDB_DIR=str(wandb_dir), **env_extra)

    # 1) Under the restart wrapper: one rank is SIGKILLed at step 3, before any checkpoint, so the relaunch
    #    starts from scratch; its save at step 5 hits a full disk and --ckpt_on_error continue trains on;
    #    then SIGTERM to one rank (rank 1): every rank stops after the same step, commits, exits 0, and
    #    the wrapper does not restart a preempted run.
    first = launch("--ckpt_on_error", "continue", restarts=True,
                   OPENRL_FAULT=f"step@3:kill:once={tmp_path / 'crash'},write@5:raise=ENOSPC")
    first.wait_for("step 7/24")
    os.kill(first.ranks()[1], signal.SIGTERM)
    rc, output = first.finish()
    assert rc == 0, output[-3000:]
    restart = one_line(output, "[restart] attempt 1 failed")
    assert "restart 1/2" in restart and "exit code" in restart, restart
    assert len([line for line in output.splitlines() if "no checkpoint in" in line]) == 2, "fresh, then fresh again"
    assert "exit code 0 after 1 restart(s)" in output
    full = one_line(output, ".tmp-global_step5 (No space left on device")
    assert "error: " not in full and "training goes on (--ckpt_on_error continue)" in full
    line = one_line(output, "preempted by SIGTERM on rank 1 during training: checkpoint")
    stop1 = int(re.search(r"global_step(\d+) committed at step (\d+)/24", line).group(1))
    assert committed(ckpt) == [f"global_step{stop1}"] and not out.exists(), "stopped, not exported"

    # 2) What a scheduler does: SIGTERM to every process of the job (the launcher forwards it again), and
    #    one more to both ranks while the preemption save runs (slowed down to 2 s): the save is unaffected.
    second = launch(OPENRL_FAULT="after_engines:sleep=2")
    second.wait_for("step 12/24")
    second.signal_all(signal.SIGTERM)
    second.wait_for("stop requested")
    for pid in second.ranks().values():
        os.kill(pid, signal.SIGTERM)
    _, output = second.finish()
    no_traceback(output)
    assert f"resumed from {ckpt}/global_step{stop1}: step {stop1}/24" in output
    line = one_line(output, "preempted by SIGTERM")
    stop2 = int(re.search(r"global_step(\d+) committed", line).group(1))
    assert "stop signals on this rank; the save went on unchanged" in line
    assert committed(ckpt)[-1] == f"global_step{stop2}" and 12 <= stop2 < 15

    # 3) --async_save, and kill -9 of the whole job while step 15 is written in the background (its write
    #    sleeps): training went on meanwhile, and the previous checkpoint is still the newest committed one.
    third = launch("--async_save", OPENRL_FAULT="write@15:sleep=60")
    third.wait_for("step 17/24")
    third.signal_all(signal.SIGKILL)
    _, output = third.finish()
    assert "checkpoint step 15 staged in host memory" in output
    assert (ckpt / ".tmp-global_step15").is_dir() and committed(ckpt)[-1] == f"global_step{stop2}"

    # 4) Under the restart wrapper with --async_save: one rank's background write of step 15 finds the disk
    #    full; with --ckpt_on_error stop (the default) all ranks stop with one error naming the folder, the
    #    temp dir is removed; the relaunch resumes from the previous checkpoint and finishes.
    fourth = launch("--async_save", restarts=True,
                    OPENRL_FAULT=f"write@15:raise=ENOSPC:once={tmp_path / 'full'}")
    rc, output = fourth.finish()
    assert rc == 0, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    error = errors[0]
    assert error.startswith("error: checkpoint save failed: cannot write")
    assert f"{ckpt}/.tmp-global_step15" in error and "No space left on device" in error
    assert "restart 1/2" in one_line(output, "[restart] attempt 1 failed (exit code 1: error: checkpoint save failed")
    assert len([line for line in output.splitlines() if f"resumed from {ckpt}/global_step{stop2}:" in line]) == 2
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp")]
    assert committed(ckpt)[-3:] == ["global_step15", "global_step20", "global_step24"]

    # The end: the reference's weights to the bit, and at every step every run (killed, failed or not)
    # trained each rank on exactly the reference's samples.
    assert_bitwise_equal(weights(reference / "out"), weights(out))
    want, got = sample_records(reference / "samples"), sample_records(samples)
    assert sorted({step for _, step in got}) == list(range(1, TOTAL + 1))
    assert all(ids == want[key][0] for key, runs in got.items() for ids in runs)
    # Tensorboard: what a run logged after its checkpoint was purged on resume, so the curve is the
    # reference's, once per step. wandb: after the first (crashed before any checkpoint) every run
    # logged into the one run whose id the checkpoints carry.
    assert tb_losses(tb) == tb_losses(reference / "tb")
    runs = sorted(p.name for p in (wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 6 and len({r.rsplit("-", 1)[1] for r in runs[1:]}) == 1, runs


def test_resume_on_one_rank_then_on_two_keeps_every_sample_once(tmp_path, reference, tiny_model_dir, sft_data):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    ckpt.mkdir()
    shutil.copytree(reference / "ckpt" / "global_step10", ckpt / "global_step10")  # saved on 2 ranks

    # 2 -> 1: the same command on one process, converted by itself; stopped by SIGUSR1 mid-epoch
    one = Live(launch_cmd(MODULE, sft_args(tiny_model_dir, sft_data, ckpt, out), ranks=0),
               OPENRL_SAMPLE_LOG=str(tmp_path / "s1"))
    one.wait_for("step 14/24")
    one.proc.send_signal(signal.SIGUSR1)
    rc, output = one.finish()
    no_traceback(output)
    assert rc == 0, output[-3000:]
    assert "saved on 2 rank(s) with ZeRO-2 and this run has 1 with ZeRO-2: converting it" in output
    assert "resumed from" in output and "step 10/24, epoch 0, 80 samples consumed" in output
    stop = int(re.search(r"global_step(\d+) committed", one_line(output, "preempted by SIGUSR1")).group(1))
    state = json.loads((ckpt / f"global_step{stop}" / "train_state.json").read_text())
    assert state["world_size"] == 1 and state["consumed_samples"] == 8 * stop
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp")], "the converted copy is removed"

    # 1 -> 2
    res = run(launch_cmd(MODULE, sft_args(tiny_model_dir, sft_data, ckpt, out)),
              OPENRL_SAMPLE_LOG=str(tmp_path / "s2"))
    no_traceback(res.output)
    assert res.returncode == 0, res.output[-3000:]
    assert "saved on 1 rank(s) with ZeRO-2 and this run has 2 with ZeRO-2: converting it" in res.output
    assert json.loads((ckpt / "global_step24" / "train_state.json").read_text())["world_size"] == 2

    # No sample skipped or seen twice: each step of the stitched run trained on the reference's samples,
    # and each epoch covers every row (96 positions for 90 rows: 6 repeat by wrap-around).
    ref = samples_per_step(reference / "samples")
    stitched = {s: ids for s, ids in ref.items() if s <= 10}
    stitched.update(samples_per_step(tmp_path / "s1"))
    stitched.update(samples_per_step(tmp_path / "s2"))
    assert sorted(stitched) == list(range(1, TOTAL + 1))
    assert all(stitched[s] == ref[s] for s in stitched)
    for epoch in range(2):
        ids = [i for s in range(1 + 12 * epoch, 13 + 12 * epoch) for i in stitched[s]]
        assert len(ids) == 96 and set(ids) == set(range(90))
    # The optimizer, schedule and weights carried over exactly: only the summation order differs from
    # the reference (a lost optimizer state would be off by the order of the learning rate, 5e-4).
    ref_w, got = weights(reference / "out"), weights(out)
    assert max(float((ref_w[k] - got[k]).abs().max()) for k in ref_w) < 1e-5


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MB tmpfs: a real file system that fills up (needs root; skipped where mounts are refused)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_real_full_disk_at_each_write_then_room_made_and_a_stale_build_lock(small_disk, reference, tiny_model_dir,
                                                                             sft_data):
    """Checkpoints and the export on a small tmpfs that a fault point fills to the byte at one moment of a
    save (the engine files, the manifest, the latest pointer) and before the final export; the next step
    makes room again. A build lock left by a killed build of DeepSpeed's CPU op waits in front of it."""
    from openrl_ckpt.strategy.build_lock import SHM_OP_NAME, extension_dir

    lock = extension_dir(SHM_OP_NAME) / "lock"
    lock.touch()  # what a build killed midway leaves: the file, and no process holding it
    ckpt, out, filler = small_disk / "ckpt", small_disk / "out", small_disk / "filler"
    faults = ",".join([f"write@4:fill={filler}", f"step@5:unfill={filler}",
                       f"before_commit@8:fill={filler}", f"step@9:unfill={filler}",
                       f"latest@12:fill={filler}", f"step@13:unfill={filler}",
                       f"export:fill={filler}"])
    args = sft_args(tiny_model_dir, sft_data, ckpt, out, "--save_steps", "4", "--max_ckpt_num", "2",
                    "--ckpt_on_error", "continue")
    first = run(launch_cmd(MODULE, args), OPENRL_FAULT=faults)
    no_traceback(first.output)
    assert not lock.exists() and "removed a stale build lock" in one_line(first.output, str(lock))
    engines = one_line(first.output, "global_step4")
    assert "No space left on device" in engines and "training goes on (--ckpt_on_error continue)" in engines
    manifest = one_line(first.output, ".tmp-global_step8")
    assert "cannot commit" in manifest and "No space left on device" in manifest
    latest = one_line(first.output, "could not be updated")
    assert "global_step12 is committed" in latest and "No space left on device" in latest
    # the final export: one line, exit 1, nothing half-written beside --save_path, the checkpoints intact
    assert first.returncode == 1
    export = one_line(first.output, "error: --save_path")
    assert "No space left on device" in export and "rerun the same command" in export
    assert not out.exists() and not [p for p in small_disk.iterdir() if p.name.startswith(".out")]
    assert committed(ckpt) == ["global_step20", "global_step24"]
    verify = subprocess.run([sys.executable, "-m", "openrl_ckpt.cli.ckpt", "verify", str(ckpt)], capture_output=True,
                            text=True, cwd=REPO, env=env())
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # room made: the same command resumes the finished run and only exports
    for f in small_disk.glob("filler.*"):
        f.unlink()
    second = run(launch_cmd(MODULE, args))
    assert second.returncode == 0, second.output[-3000:]
    assert "step 24/24" in one_line(second.output, "resumed from")
    assert_bitwise_equal(weights(reference / "out"), weights(out))


def test_a_hung_rank_ends_the_run_after_the_collective_timeout(tmp_path, tiny_model_dir, sft_data):
    """One rank stops answering (it sleeps at the boundary of step 2); the other waits
    --collective_timeout_mins 0.1 (6 s), not 10 minutes, and says so in one line."""
    args = sft_args(tiny_model_dir, sft_data, tmp_path / "ckpt", tmp_path / "out", "--collective_timeout_mins", "0.1")
    res = run(launch_cmd(MODULE, args), OPENRL_FAULT=f"step@2:sleep=12:once={tmp_path / 'hung'}")
    assert res.returncode != 0
    line = one_line(res.output, "within --collective_timeout_mins 0.1")
    assert line.startswith("error: ") and "heartbeat goes on" in line
