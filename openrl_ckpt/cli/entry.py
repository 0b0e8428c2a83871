"""How every CLI's ``main`` runs: a user error is one ``error:`` line (said once, by rank 0) and a
non-zero exit status, never a traceback from each rank; a lost or hung peer is one line naming it; a
stop signal is answered with one line and exit 0."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from openrl_ckpt.errors import UserError


def is_rank_0() -> bool:
    """Rank 0 of the launch, known before any process group exists (the launcher sets RANK)."""
    return os.environ.get("RANK", "0") == "0"


def _exit_now(code: int) -> None:
    """Leave without interpreter teardown: a torch thread destroyed there aborted one finished run of ~70
    in the test suite ("terminate called without an active exception", exit 250), and a process group
    with a dead peer can hang its own destruction."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a CLI main: user errors become ``error: ...`` on one line and a non-zero exit; a run
    stopped by SIGTERM/SIGUSR1/SIGINT exits 0 once it is handled (the loop logged how); a collective
    that failed because a peer died or hung is one ``error:`` line naming the peer, exit 1."""
    from openrl_ckpt.checkpoint.files import CheckpointError
    from openrl_ckpt.checkpoint.preemption import Phase, Preempted, process_requests, signal_name
    from openrl_ckpt.strategy.peers import describe_failure, is_collective_failure

    try:
        main(argv)
    except Preempted as e:
        sys.exit(e.exit_code)
    except UserError as e:
        if is_rank_0():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except CheckpointError as e:  # raised on all ranks together: say it once
        if is_rank_0():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        if not is_collective_failure(e):
            raise
        message, say_it = describe_failure(e)
        if say_it:
            print(f"error: {message}", file=sys.stderr)
        _exit_now(1)
    finally:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.destroy_process_group()
    stops = process_requests()
    if stops is not None and stops.signum is not None:
        # Training was finished when the signal came (the final save or export): nothing is left to do.
        phase = stops.phase_at_signal or Phase.FINAL_EXPORT
        print(f"{signal_name(stops.signum)} came during {phase.value} after the last step: the run is complete "
              f"and its model written; there is nothing to rerun", file=sys.stderr)
    if argv is None and distributed:
        _exit_now(0)
