"""The command-line entry points, one module per job."""

import sys

# `python -m openrl_ckpt.cli.train_<job>` (how deepspeed, torchrun and Ray launch a training job):
# record stop signals before the job's heavy imports, so a preemption notice during start-up is
# answered by the run (one line, exit 0) instead of killing it with the default handler. Other jobs
# (serving, chat, inference, the ckpt tool) keep the default handlers: Ctrl-C stops them at once.
_argv = getattr(sys, "orig_argv", [])
if "-m" in _argv[:-1] and _argv[_argv.index("-m") + 1].startswith("openrl_ckpt.cli.train_"):
    from openrl_ckpt.checkpoint.preemption import record_for_process

    record_for_process()
