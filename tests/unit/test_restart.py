"""The restart wrapper, driving small python commands instead of a training run."""

import signal
import subprocess
import sys

import pytest

from openrl_ckpt.cli.restart import describe, last_cause, main
from openrl_ckpt.errors import UserError

PY = sys.executable


def crash_until(counter, good_after: int, code: int = 1) -> list[str]:
    """A command that fails with ``code`` until it has run ``good_after`` times, then succeeds."""
    script = (f"import pathlib,sys; p=pathlib.Path({str(counter)!r}); n=int(p.read_text()) if p.exists() else 0; "
              f"p.write_text(str(n+1)); print('attempt', n+1, flush=True); "
              f"sys.exit(0) if n+1>={good_after} else (print('RuntimeError: boom', n+1, flush=True), sys.exit({code}))")
    return [PY, "-c", script, "--load_checkpoint"]


def test_restarts_until_success_and_logs_count_and_cause(tmp_path, capfd):
    counter = tmp_path / "n"
    assert main(["--max_restarts", "3", "--restart_delay", "0", "--", *crash_until(counter, 3)]) == 0
    assert counter.read_text() == "3"
    err = capfd.readouterr().err
    assert "attempt 1 failed (exit code 1: RuntimeError: boom 1)" in err and "restart 1/3" in err
    assert "restart 2/3" in err and "restart 3/3" not in err
    assert "exit code 0 after 2 restart(s)" in err


def test_gives_up_after_max_restarts(tmp_path, capfd):
    counter = tmp_path / "n"
    assert main(["--max_restarts", "1", "--restart_delay", "0", "--", *crash_until(counter, 99, code=3)]) == 3
    assert counter.read_text() == "2", "one run plus one restart"
    assert "--max_restarts 1 used up" in capfd.readouterr().err


@pytest.mark.parametrize("code", [0, 2])
def test_no_restart_after_success_or_user_error(tmp_path, code):
    counter = tmp_path / "n"
    assert main(["--max_restarts", "3", "--restart_delay", "0", "--", *crash_until(counter, 99 if code else 1,
                                                                                   code=code)]) == code
    assert counter.read_text() == "1"


def test_refuses_a_command_without_load_checkpoint():
    with pytest.raises(UserError, match="--load_checkpoint"):
        main(["--max_restarts", "1", "--", PY, "-c", "pass"])


def test_sigterm_to_the_wrapper_reaches_the_whole_command_and_stops_restarts(tmp_path):
    # The command is a parent that dies on SIGTERM (like a launcher) and a child that handles it
    # (like a rank): the child must get the signal too, and the wrapper waits for it to finish.
    done = tmp_path / "child_saved"
    child = (f"import signal,time,pathlib; signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.5), "
             f"pathlib.Path({str(done)!r}).write_text('ok'), exit(0))); print('ready', flush=True); time.sleep(60)")
    parent = f"import subprocess,sys,time; subprocess.Popen([sys.executable,'-c',{child!r}]); time.sleep(60)"
    wrapper = subprocess.Popen([PY, "-m", "openrl_ckpt.cli.restart", "--max_restarts", "3", "--", PY, "-c", parent,
                                "--load_checkpoint"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wrapper.stdout.readline().strip() == "ready"
    wrapper.send_signal(signal.SIGTERM)
    out = wrapper.communicate(timeout=30)[0]
    assert wrapper.returncode == 128 + signal.SIGTERM
    assert done.read_text() == "ok", "the child got SIGTERM and the wrapper waited for it"
    assert "stopped by SIGTERM" in out and "not restarting" in out


def test_describe_and_cause():
    assert describe(-9) == "killed by SIGKILL"
    assert describe(137) == "exit code 137 (SIGKILL)"
    assert describe(1) == "exit code 1"
    lines = ["step 3/24 loss 1\n", "[rank1]: OSError: [Errno 28] No space left\n",
             "[launch] ... exits with return code = 1\n"]
    assert last_cause(lines) == "OSError: [Errno 28] No space left"
    assert last_cause(lines[2:]) == "[launch] ... exits with return code = 1"
    assert last_cause(["error: --dataset x: no such file\n", "done\n"]) == "error: --dataset x: no such file"
    assert last_cause(["all fine\n"]) is None


def test_sigusr2_to_the_wrapper_creates_the_save_now_trigger(tmp_path, capsys):
    from openrl_ckpt.checkpoint.config import SAVE_NOW_FILE
    from openrl_ckpt.cli.restart import Supervisor, flag_value

    command = ["deepspeed", "--module", "openrl_ckpt.cli.train_sft", "--ckpt_path", "a", f"--ckpt_path={tmp_path}"]
    assert flag_value(command, "--ckpt_path") == str(tmp_path), "the last one wins, as argparse decides"
    Supervisor(command, max_restarts=0, delay=0)._save_now(signal.SIGUSR2, None)
    assert (tmp_path / SAVE_NOW_FILE).exists()
    Supervisor(["python", "-m", "x", "--load_checkpoint"], max_restarts=0, delay=0)._save_now(signal.SIGUSR2, None)
    assert "names no --ckpt_path" in capsys.readouterr().err
