"""Relaunch a training command after a crash, up to --max_restarts times.

    python -m openrl_ckpt.cli.restart --max_restarts 3 -- \
        deepspeed --num_gpus 8 --module openrl_ckpt.cli.train_sft ... --ckpt_path ./ckpt --load_checkpoint

Each attempt runs the same command; with --load_checkpoint it resumes from the newest valid
checkpoint (or starts fresh when a crash came before the first one). Every restart is logged with
its number and cause (exit status and the last error line). Not restarted: success or a handled
preemption (exit 0), a user error (exit 2: the same mistake would fail again), and a stop asked of
this wrapper: SIGTERM/SIGUSR1/SIGINT are passed to the whole command (every rank gets it, so the
run commits a checkpoint and stops) and the wrapper exits once all of its processes have ended.
SIGUSR2 to the wrapper asks for a checkpoint now: it creates the command's ``<--ckpt_path>/save_now``,
which the run answers at its next step and goes on (a signal passed to the launchers would kill them).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from openrl_ckpt.checkpoint.config import SAVE_NOW_FILE
from openrl_ckpt.errors import UserError

NO_RESTART = {0: "finished (or stopped after a committed checkpoint)",
              2: "a user error; a restart would fail the same way"}
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# The lines that say why a run died: our one-line errors and Python exceptions (possibly behind a
# "[rank1]:" prefix), else the launcher's verdict.
_CAUSES = (re.compile(r"(?:^|\]:?\s*)(error: .*|[A-Za-z_.]*(?:Error|Exception|Interrupt)\b.*)$"),
           re.compile(r"(.*exits with return code.*)$"))


def _say(msg: str) -> None:
    print(f"[restart] {msg}", file=sys.stderr, flush=True)


def describe(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    if returncode > 128 and returncode - 128 in signal.Signals._value2member_map_:
        return f"exit code {returncode} ({signal.Signals(returncode - 128).name})"
    return f"exit code {returncode}"


def last_cause(lines: Sequence[str]) -> str | None:
    """The last line of the output that looks like the reason of a failure."""
    for pattern in _CAUSES:
        for line in reversed(lines):
            m = pattern.search(line.strip())
            if m:
                return m.group(1)[:300]
    return None


class Supervisor:
    def __init__(self, command: list[str], max_restarts: int, delay: float) -> None:
        self.command = command
        self.max_restarts = max_restarts
        self.delay = delay
        self.stop_signal: int | None = None
        self.proc: subprocess.Popen[str] | None = None
        self.ckpt_path = flag_value(command, "--ckpt_path")

    def _save_now(self, signum: int, frame: object) -> None:
        if self.ckpt_path is None:
            _say("SIGUSR2: the command names no --ckpt_path, so there is no trigger file to create; create "
                 f"<ckpt_path>/{SAVE_NOW_FILE} yourself")
            return
        trigger = os.path.join(self.ckpt_path, SAVE_NOW_FILE)
        try:
            open(trigger, "a").close()
        except OSError as e:
            _say(f"SIGUSR2: cannot create {trigger} ({e.strerror or e})")
            return
        _say(f"SIGUSR2: created {trigger}; the run saves a checkpoint at its next step and goes on")

    def _forward(self, signum: int, frame: object) -> None:
        self.stop_signal = signum
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def _attempt(self) -> tuple[int, list[str]]:
        tail: collections.deque[str] = collections.deque(maxlen=200)
        # Its own process group, so a forwarded signal reaches every rank, not only the launcher.
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, errors="replace")
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
        returncode = self.proc.wait()
        _wait_group(self.proc.pid)  # ranks may outlive a launcher that a signal killed
        return returncode, list(tail)

    def run(self) -> int:
        for sig in FORWARDED:
            signal.signal(sig, self._forward)
        signal.signal(signal.SIGUSR2, self._save_now)
        restarts = 0
        while True:
            started = time.monotonic()
            returncode, tail = self._attempt()
            took = time.monotonic() - started
            if self.stop_signal is not None:
                _say(f"stopped by {signal.Signals(self.stop_signal).name} (passed to the command, which ended with "
                     f"{describe(returncode)} after {took:.0f}s); not restarting")
                return 128 + self.stop_signal
            if returncode in NO_RESTART:
                if restarts:
                    _say(f"{describe(returncode)} after {restarts} restart(s): {NO_RESTART[returncode]}")
                return returncode
            cause = last_cause(tail)
            what = describe(returncode) + (f": {cause}" if cause else "")
            if restarts >= self.max_restarts:
                _say(f"attempt {restarts + 1} failed ({what}) after {took:.0f}s; --max_restarts {self.max_restarts} "
                     f"used up, giving up")
                return returncode
            restarts += 1
            _say(f"attempt {restarts} failed ({what}) after {took:.0f}s; restart {restarts}/{self.max_restarts} "
                 f"in {self.delay:g}s")
            time.sleep(self.delay)
            if self.stop_signal is not None:
                return 128 + self.stop_signal


def flag_value(command: list[str], flag: str) -> str | None:
    """The value a command gives ``flag`` (``--flag V`` or ``--flag=V``; the last one wins), or None."""
    value = None
    for i, word in enumerate(command):
        if word == flag and i + 1 < len(command):
            value = command[i + 1]
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
    return value


def _wait_group(pgid: int) -> None:
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:  # a process of the group changed its user: it is not ours to wait for
            return
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="restart", description=__doc__.splitlines()[0])
    p.add_argument("--max_restarts", type=int, default=3, help="relaunch at most this many times")
    p.add_argument("--restart_delay", type=float, default=5.0, help="seconds between a crash and the relaunch")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the training command (after --)")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UserError("no command to run: restart [--max_restarts N] -- <training command>")
    if args.max_restarts < 0:
        raise UserError(f"--max_restarts must be 0 or more, got {args.max_restarts}")
    if "--load_checkpoint" not in command:
        raise UserError("the command has no --load_checkpoint: every restart would start over from step 0; add it "
                        "(with --save_steps or --save_interval_mins) so a restart resumes")
    return Supervisor(command, args.max_restarts, args.restart_delay).run()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
