"""Metrics out: the rank-0 log line, wandb and tensorboard."""

from __future__ import annotations

import logging
import os
from typing import Any

from openrl_ckpt.errors import UserError

log = logging.getLogger("openrl_ckpt")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("openrl_ckpt").setLevel(level)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Tracker:
    """Sends scalars to wandb / tensorboard on rank 0; a no-op elsewhere."""

    def __init__(self, *, enabled: bool, use_wandb: str | None, wandb_project: str, wandb_run_name: str | None,
                 wandb_group: str | None, wandb_org: str | None, use_tensorboard: str | None,
                 config: dict[str, Any], wandb_run_id: str | None = None, start_step: int = 0) -> None:
        self.wandb: Any = None
        self.tb: Any = None
        self.run_id: str | None = wandb_run_id
        if not enabled:
            return
        if use_wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("--use_wandb needs the wandb package (pip install wandb)") from None
            if use_wandb not in ("True", "true", "1") and os.environ.get("WANDB_MODE") != "offline":
                wandb.login(key=use_wandb)
            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name, group=wandb_group, entity=wandb_org,
                                    config=config, id=wandb_run_id, resume="allow" if wandb_run_id else None)
            self.run_id = self.wandb.id
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events an earlier run wrote after the step this one starts from (a crash
            # after its last checkpoint, whose own step was logged before it was saved; or before any
            # checkpoint, for a run that starts fresh), so each curve holds every step once
            self.tb = SummaryWriter(log_dir=use_tensorboard, purge_step=start_step + 1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.wandb is not None:
            try:
                self.wandb.log(metrics, step=step)
            except Exception as e:
                self._wandb_lost(e)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:
                self._wandb_lost(e)
        if self.tb is not None:
            self.tb.close()

    def _wandb_lost(self, e: Exception) -> None:
        """wandb's service process is gone: a job-wide SIGTERM reaches it too (the deepspeed launcher
        signals the ranks' children). Losing the metrics must not lose the run or its checkpoint."""
        import wandb

        log.warning("wandb stopped working (%s: %s); training goes on without it", type(e).__name__, e)
        self.wandb = None
        try:
            wandb.teardown()  # unregisters wandb's exit hook first, which would otherwise fail the same way
        except Exception:
            pass  # the service is gone: nothing left to tear down
