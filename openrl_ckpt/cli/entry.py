"""How every CLI's ``main`` runs: a user error is one ``error:`` line (said once, by rank 0) and a
non-zero exit status, never a traceback from each rank."""

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


def run(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a CLI main: user errors become ``error: ...`` on one line and a non-zero exit; a run
    stopped by SIGTERM/SIGUSR1 exits 0 once its checkpoint is committed (the loop logged which)."""
    from openrl_ckpt.checkpoint.files import CheckpointError
    from openrl_ckpt.checkpoint.preemption import Preempted

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
    finally:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.destroy_process_group()
    if argv is None and distributed:
        # A finished launch (checkpoint committed, model saved, trackers closed) skips interpreter
        # teardown: a torch thread destroyed there aborted one finished run of ~70 in the test suite
        # ("terminate called without an active exception", exit 250).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
