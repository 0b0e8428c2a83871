"""``python -m <module> <args>`` in a child forked from the test process, which has already imported the
module's dependencies (torch, transformers, deepspeed, datasets): the same code, environment, working
folder, output and exit status as a launch of its own, without paying ~8 s of imports each time.

For one-process runs (``launch_cmd(..., ranks=0)``) whose point is what the CLI says and how it exits:
error paths above all. Runs of several ranks stay real ``deepspeed`` launches (launch.py).

One difference from a process of its own: the child ends with ``os._exit``, so ``atexit`` handlers do not
run (it inherited pytest's, which must not); a CLI run that finished with a process group skips them too
(``cli/entry.py``). Modules imported here were imported with this process's environment (conftest.py
and scripts/test.sh set the offline and CPU flags launch.env passes on).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings

from launch import REPO, Result, env, launch_cmd, run

# the interpreter's own warning filters (python -W default is what a fresh process starts with)
_FRESH_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                  ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                  ("ignore", ResourceWarning, None)]


def run_module(module: str, args: list[str], *, timeout: float = 300, **env_extra: str) -> Result:
    """Fork, make the child look like a fresh ``python -m module args`` (environment of launch.env, cwd
    the repository, stdout and stderr into one file, logging, warnings and one torch thread as a new
    process has them), run the module as ``__main__``, and return its exit status and output. After a test
    of this process set up torch.distributed or vLLM (the in-process engine test), a fork would inherit them
    (a child then crashed at exit, SIGSEGV): such a run is a real ``python -m`` launch instead."""
    import torch.distributed as dist

    if dist.is_initialized() or "vllm" in sys.modules:
        return run(launch_cmd(module, args, ranks=0), timeout=timeout, **env_extra)
    importlib.import_module(module)  # the imports, once, in this process; the child inherits them
    with tempfile.TemporaryFile() as out:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                code = _child(module, args, out.fileno(), env(**env_extra))
            finally:
                os._exit(code)
        deadline = time.monotonic() + timeout
        try:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"python -m {module} {args} ran past {timeout}s")
                time.sleep(0.05)
        finally:
            if not done:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        out.seek(0)
        return Result(os.waitstatus_to_exitcode(status), out.read().decode("utf-8", errors="replace"))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


def _child(module: str, args: list[str], fd: int, environ: dict[str, str]) -> int:
    os.setsid()  # its own process group, as launch.run starts one; a timeout kills the whole of it
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)  # pytest's capture replaced them
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)
    import faulthandler

    faulthandler.disable()  # pytest's points at its own capture
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(REPO)
    logging.root.handlers.clear()  # pytest's log capture: the CLI's basicConfig must install its own
    logging.root.setLevel(logging.WARNING)
    warnings.resetwarnings()  # pytest records warnings; a fresh process prints them with its default filters
    for action, category, mod in reversed(_FRESH_FILTERS):
        warnings.filterwarnings(action, category=category, module=mod or "")
    warnings.showwarning = _show_warning
    import torch

    torch.set_num_threads(int(environ.get("OMP_NUM_THREADS", "1")))  # launch.env sets 1
    sys.modules.pop(module, None)  # run as __main__, not as the module the parent imported
    sys.argv = ["-m", *args]
    import runpy

    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    return code
