"""The Checkpointer: every training loop's checkpoint policy, in one part that loops compose.

A loop calls four things, all on every rank together::

    with checkpointer.session():                       # checkpoint folder ready, stop signals recorded
        state = checkpointer.resume(state)             # --load_checkpoint / --resume_from: checked, loaded
        ... each step: stopped_by = checkpointer.after_step(state, evaluate=..., epoch_end=...)
        checkpointer.finish(state, stopped_by)         # final save, or preemption (raises Preempted)

``after_step`` is the step boundary: one small all-reduce makes a stop request on any rank, a save
request (SIGUSR2 on any rank, or ``save_now`` in --ckpt_path), rank 0's clocks (--save_interval_mins,
--export_interval_mins) and a failed background save every rank's decision at the same step; then the
loop's evaluation runs, a save follows on --save_steps, --save_epochs, the clock or a request, and a
model export on its own cadence. Saving stages the contents (engines, Hugging Face folders, extra parts
such as an EMA) as data and hands them to the ``CheckpointManager`` (synchronously, or in the background
under --async_save); a failed save follows --ckpt_on_error. --save_best_metric pins the best checkpoint
out of rotation; --resume_from sets the newer checkpoints of the abandoned branch aside.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from openrl_ckpt.checkpoint.config import SAVE_NOW_FILE, CheckpointConfig, SaveErrorPolicy
from openrl_ckpt.checkpoint.contents import CheckpointContents, StagedWrite
from openrl_ckpt.checkpoint.faults import fault_point
from openrl_ckpt.checkpoint.files import STEP_DIR, CheckpointError, step_dir_name
from openrl_ckpt.checkpoint.inspect import BEST_KEY, EVAL_KEY, best_checkpoint, describe
from openrl_ckpt.checkpoint.manager import CheckpointManager, Resumed
from openrl_ckpt.checkpoint.preemption import Phase, Preempted, StopRequests, process_requests, signal_name
from openrl_ckpt.checkpoint.state import TrainState, incompatibility
from openrl_ckpt.errors import UserError
from openrl_ckpt.strategy.deepspeed import ReduceOp
from openrl_ckpt.trainers.exports import ModelExports

log = logging.getLogger("openrl_ckpt")


class Stateful(Protocol):
    """An algorithm's own JSON state (KL coefficient, reward statistics...), kept in the train state."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointPart(Protocol):
    """Files a checkpoint holds besides the engines (PPO's EMA weights)."""

    def stage(self, is_rank_0: bool) -> list[StagedWrite]:
        """What to write, captured now (training goes on changing the originals)."""
        ...

    def load(self, checkpoint_dir: Path) -> None: ...


class EngineStore(Protocol):
    """The trained engines' side of checkpointing, over their process group (``strategy.engine_checkpoint.
    DeepspeedEngines``; a fake in the loop's own tests)."""

    def open_manager(self, ckpt_path: str, max_ckpt_num: int, max_ckpt_mem_gb: float,
                     background: bool) -> CheckpointManager: ...

    def stage(self, staging: Path, *, host_copy: bool, engine_files: bool, hf_weights: bool) -> list[StagedWrite]:
        """The engines' files (``engine_files``; copied to host memory with ``host_copy``) and each engine's
        Hugging Face folder (config and tokenizer; the weights too with ``hf_weights``), collective."""
        ...

    def stage_export(self) -> StagedWrite | None:
        """The model as --save_path would hold it (collective; None off rank 0)."""
        ...

    def load(self, resumed: Resumed) -> None: ...


class RankInfo(Protocol):
    """What the Checkpointer needs of the strategy: who this rank is, the run's shape, one all-reduce."""

    rank: int
    world_size: int

    @property
    def is_rank_0(self) -> bool: ...

    @property
    def zero_stage(self) -> int: ...

    @property
    def global_batch_size(self) -> int: ...

    def all_reduce(self, values: dict[str, float], op: ReduceOp = ReduceOp.MEAN) -> dict[str, float]: ...


BRANCH_KEY = "branch"  # train state extra: the --resume_from this run's line of checkpoints started at


def resume_step(spec: str, root: Path) -> int:
    """The step --resume_from names: a step number, or a ``global_step<N>`` folder of --ckpt_path."""
    if spec.isdigit():
        return int(spec)
    path = Path(spec)
    match = STEP_DIR.match(path.name)
    if match is None or path.resolve().parent != root.resolve():
        raise UserError(f"--resume_from {spec}: give a step number or a global_step<N> folder of --ckpt_path {root}")
    return int(match.group(1))


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, strategy: RankInfo, engines: EngineStore, *, algorithm: str,
                 algorithm_state: Stateful, total_steps: int, meta: dict[str, Any] | None = None,
                 parts: dict[str, CheckpointPart] | None = None, eval_steps: int | None = None) -> None:
        """``eval_steps``: the loop's --eval_steps, None when it has no evaluation data."""
        self.cfg = cfg
        self.strategy = strategy
        self.engines = engines
        self.algorithm = algorithm
        self.algorithm_state = algorithm_state
        self.total_steps = total_steps
        self.meta = dict(meta or {})
        self.parts = dict(parts or {})
        self.manager: CheckpointManager | None = None
        self._stop: StopRequests | None = None
        self._last_saved = -1  # the step of the last checkpoint saved (or resumed from)
        self._last_save_time = time.monotonic()
        self._last_eval: tuple[int, dict[str, float]] | None = None
        self._best_room_checked = False
        self._check_options(eval_steps)
        self.exports = None
        if cfg.periodic_exports and cfg.save_path:  # checked above: exports need a --save_path
            self.exports = ModelExports(cfg.save_path, cfg.max_export_num, background=cfg.async_save)
        self._last_export_time = time.monotonic()

    def _check_options(self, eval_steps: int | None) -> None:
        cfg = self.cfg
        if cfg.periodic_exports:
            if not cfg.save_path:
                raise UserError("--export_steps / --export_epochs / --export_interval_mins need a --save_path")
            if Path(cfg.save_path).resolve() == Path(cfg.ckpt_path).resolve():
                raise UserError(f"--save_path {cfg.save_path} is --ckpt_path too: model exports (<save_path>/"
                                "global_step<N>/) would be taken for checkpoints; give them another folder")
            if cfg.max_export_num < 1:
                raise UserError(f"--max_export_num must be at least 1, got {cfg.max_export_num}")
        if cfg.disable_ds_ckpt and self.strategy.is_rank_0:
            log.warning("--disable_ds_ckpt: checkpoints hold only a Hugging Face copy of the model (no optimizer "
                        "state or data position), so a run cannot resume from them%s",
                        "; --load_checkpoint is ignored" if cfg.load_checkpoint else "")
        if not cfg.save_best_metric:
            return
        if eval_steps is None:
            raise UserError(f"--save_best_metric {cfg.save_best_metric} needs an --eval_dataset")
        if eval_steps <= 0:
            raise UserError("--save_best_metric needs --eval_steps > 0: a checkpoint can be the best only "
                            "when the run evaluates at its step")
        if cfg.save_steps > 0 and cfg.save_steps % eval_steps and self.strategy.is_rank_0:
            log.warning("--save_steps %d is not a multiple of --eval_steps %d: only checkpoints at evaluated "
                        "steps can be the best", cfg.save_steps, eval_steps)

    # ------------------------------------------------------------------ the loop's calls
    @contextlib.contextmanager
    def session(self) -> Iterator[Checkpointer]:
        """Stop signals recorded (a training CLI records them from its start: what came during start-up is
        answered here too), the checkpoint folder prepared (when the run has one), for the loop's life."""
        recorded = process_requests()
        if recorded is not None:
            recorded.install()  # again: a library may have set its own handlers since (ray.init does)
        with contextlib.nullcontext(recorded) if recorded is not None else StopRequests() as stop:
            self._stop = stop
            try:
                if self.cfg.checkpointing:
                    cfg = self.cfg
                    self.manager = self.engines.open_manager(cfg.ckpt_path, cfg.max_ckpt_num, cfg.max_ckpt_mem,
                                                             background=cfg.async_save)
                self._last_save_time = time.monotonic()
                yield self
            finally:
                self._stop = None
                self.manager = None

    def resume(self, state: TrainState) -> TrainState:
        """With --load_checkpoint, the state of the newest checkpoint that verifies and can continue this
        run (with --resume_from, the chosen one), its engines and parts loaded; otherwise ``state`` itself
        (a fresh start, said in the log)."""
        assert self._stop is not None, "resume runs inside session()"
        self._stop.phase = Phase.RESUME
        resumed = self._find_resumable()
        if resumed is not None:
            state = self._load(resumed, state)
        self._last_saved = state.global_step if state.global_step > 0 else -1
        self._stop_before_training(state, resumed)
        self._stop.phase = Phase.TRAINING
        self._last_save_time = time.monotonic()  # rank 0's clock decides --save_interval_mins for all ranks
        return state

    def _stop_code(self) -> float:
        """This rank's stop request as one number, so that the MAX over ranks reports one rank's signal
        and phase together (0: none)."""
        stop = self._stop
        assert stop is not None
        if stop.signum is None:
            return 0.0
        phase = stop.phase_at_signal or stop.phase
        return float((self.strategy.rank + 1) * 10_000 + stop.signum * 100 + list(Phase).index(phase))

    @staticmethod
    def _stopped_by(code: float) -> str | None:
        """``SIGTERM on rank 1 during start-up`` from an agreed stop code, None for 0."""
        agreed = int(code)
        if not agreed:
            return None
        rank, signum, phase = agreed // 10_000 - 1, agreed // 100 % 100, list(Phase)[agreed % 100]
        return f"{signal_name(signum)} on rank {rank} during {phase.value}"

    def _agreed_stop(self) -> str | None:
        """Collective: who asked to stop, on any rank, or None."""
        return self._stopped_by(self.strategy.all_reduce({"stop": self._stop_code()}, op=ReduceOp.MAX)["stop"])

    def _stop_before_training(self, state: TrainState, resumed: Resumed | None) -> None:
        """A stop that came during start-up or resume is answered before the first step: nothing new to
        save, so the run says where a rerun starts and exits 0."""
        stopped_by = self._agreed_stop()
        if stopped_by is None:
            return
        if resumed is not None:
            where = f"a rerun of the same command resumes from {resumed.path} (step {state.global_step})"
        elif self.manager is not None and self.cfg.load_checkpoint:
            where = "no checkpoint yet: a rerun of the same command starts afresh"
        else:
            where = "a rerun of the same command starts afresh"
        msg = (f"stopped by {stopped_by}, before step {state.global_step + 1}/{self.total_steps}: nothing new to "
               f"save; {where}")
        if self.strategy.is_rank_0:
            log.info("%s", msg)
        raise Preempted(msg, resumed.path if resumed is not None else None, exit_code=0)

    def after_step(self, state: TrainState, evaluate: Callable[[], None] | None = None,
                   epoch_end: bool = False) -> str | None:
        """The step boundary of every loop, after the step's metrics are logged. Returns who asked to
        stop (e.g. ``SIGTERM on rank 1``) without saving; otherwise handles a failed background save,
        runs ``evaluate`` (the loop's own cadence), and saves on --save_steps, --save_epochs (``epoch_end``:
        this step finished an epoch), --save_interval_mins or a save request (SIGUSR2 on any rank, or the
        trigger file in --ckpt_path)."""
        cfg, strategy = self.cfg, self.strategy
        fault_point("step", state.global_step)
        stop = self._stop
        assert stop is not None, "after_step runs inside session()"
        now = time.monotonic()
        time_due = (strategy.is_rank_0 and cfg.save_interval_mins > 0
                    and now - self._last_save_time >= cfg.save_interval_mins * 60)
        export_time_due = (strategy.is_rank_0 and cfg.export_interval_mins > 0
                           and now - self._last_export_time >= cfg.export_interval_mins * 60)
        manager = self.manager
        trigger = Path(cfg.ckpt_path) / SAVE_NOW_FILE
        agreed = strategy.all_reduce({"stop": self._stop_code(), "time_due": float(time_due),
                                      "save_failed": float(manager is not None and manager.background_failed()),
                                      "save_rank": float(strategy.rank + 1) if stop.save_requested else 0.0,
                                      "save_file": float(strategy.is_rank_0 and trigger.exists()),
                                      "export_time_due": float(export_time_due)},
                                     op=ReduceOp.MAX)
        stopped_by = self._stopped_by(agreed["stop"])
        if stopped_by is not None:
            if strategy.is_rank_0:
                log.info("stop requested (%s): step %d/%d is done, saving a checkpoint and exiting", stopped_by,
                         state.global_step, self.total_steps)
            return stopped_by
        if manager is not None and agreed["save_failed"]:
            self._wait(must_commit=False)
        if evaluate is not None:
            evaluate()
        requested = self._save_request(agreed, trigger, state)
        cadence = ((cfg.save_steps > 0 and state.global_step % cfg.save_steps == 0)
                   or (epoch_end and cfg.save_epochs > 0 and state.epoch % cfg.save_epochs == 0))
        saved = manager is not None and (cadence or agreed["time_due"] or requested)
        if saved:
            self.save(state)
        if requested and strategy.is_rank_0:
            trigger.unlink(missing_ok=True)  # answered (a failed save is logged; ask again to retry)
        export_cadence = ((cfg.export_steps > 0 and state.global_step % cfg.export_steps == 0)
                          or (epoch_end and cfg.export_epochs > 0 and state.epoch % cfg.export_epochs == 0))
        exported = self.exports is not None and (export_cadence or agreed["export_time_due"])
        if exported:
            self.export(state.global_step)
        if saved or exported:
            # A stop that came while saving or exporting is answered now, not one step later: the
            # checkpoint of this step is there already (or its failed save is saved again).
            stopped_by = self._agreed_stop()
            if stopped_by is not None:
                if strategy.is_rank_0:
                    log.info("stop requested (%s): step %d/%d is done, exiting after its checkpoint", stopped_by,
                             state.global_step, self.total_steps)
                return stopped_by
        return None

    def export(self, step: int) -> None:
        """A model export of this step (collective), under --async_save written in the background; a failed
        one follows --ckpt_on_error like a failed save."""
        assert self.exports is not None and self._stop is not None
        self._last_export_time = time.monotonic()
        self._stop.phase = Phase.EXPORT
        try:
            self.exports.write(step, self.engines.stage_export())
        except CheckpointError as e:
            self._save_failed(e, must_commit=False)
        finally:
            self._stop.phase = Phase.TRAINING

    def _wait_exports(self) -> None:
        if self.exports is None:
            return
        try:
            self.exports.wait()
        except CheckpointError as e:
            self._save_failed(e, must_commit=False)

    def _save_request(self, agreed: dict[str, float], trigger: Path, state: TrainState) -> bool:
        """Whether a rank got SIGUSR2 or rank 0 found the trigger file: say who asked, and forget the request."""
        assert self._stop is not None
        self._stop.save_requested = False
        if not (agreed["save_rank"] or agreed["save_file"]):
            return False
        who = (f"SIGUSR2 on rank {int(agreed['save_rank']) - 1}" if agreed["save_rank"] else f"{trigger}")
        if self.strategy.is_rank_0:
            if self.manager is None:
                log.warning("save requested (%s) at step %d, but this run has no checkpoint folder (set "
                            "--save_steps, --save_epochs, --save_interval_mins, --load_checkpoint or --resume_from); "
                            "going on",
                            who, state.global_step)
            else:
                log.info("save requested (%s): saving a checkpoint at step %d/%d, then training goes on", who,
                         state.global_step, self.total_steps)
        return True

    def finish(self, state: TrainState, stopped_by: str | None) -> None:
        """The end of a loop. Not stopped: the finished state is saved (so a rerun of the same command
        only re-exports) and the background save waited for. Stopped: a checkpoint is committed and
        ``Preempted`` raised, so the CLI exits without exporting."""
        self._wait_exports()  # the final model goes into the same folder
        if stopped_by is not None:
            self._preempted(state, stopped_by)
        if self.manager is not None and self.cfg.periodic_saves and self._last_saved != state.global_step:
            self.save(state)
        if self.manager is not None:
            self._wait(must_commit=False)
        assert self._stop is not None
        self._stop.phase = Phase.FINAL_EXPORT  # what the CLI does next; a stop then is answered after it

    def record_eval(self, step: int, metrics: dict[str, float]) -> None:
        """An evaluation's result, for --save_best_metric (a checkpoint at this step records it)."""
        name = self.cfg.save_best_metric
        if name and name not in metrics:
            raise UserError(f"--save_best_metric {name}: the evaluation reports {', '.join(sorted(metrics))}")
        self._last_eval = (step, metrics)

    # ------------------------------------------------------------------ resume
    def _find_resumable(self) -> Resumed | None:
        cfg = self.cfg
        if cfg.disable_ds_ckpt:  # --disable_ds_ckpt: said at start
            return None
        if cfg.resume_from is not None:
            return self._resume_from(cfg.resume_from)
        if not cfg.load_checkpoint:
            return None
        resumed = self.manager.find_resumable() if self.manager is not None else None
        if resumed is None:
            log.info("--load_checkpoint: no checkpoint in %s, starting fresh", cfg.ckpt_path)
        return resumed

    def _resume_from(self, spec: str) -> Resumed:
        """--resume_from: the chosen checkpoint, verified; the newer checkpoints of the run it leaves are set
        aside (never deleted, never resumed). Applied once: when the newest checkpoint already descends from
        a resume at this step (the same command rerun after a crash), the run continues that branch."""
        manager = self.manager
        assert manager is not None
        step = resume_step(spec, manager.root)
        newest = manager.find_resumable()
        branch = newest.state.extra.get(BRANCH_KEY) if newest is not None else None
        if newest is not None and branch is not None and branch.get("from_step") == step:
            if self.strategy.is_rank_0:
                log.info("--resume_from %d: this run already went back to step %d (branch %s); continuing its "
                         "newest checkpoint, step %d", step, step, branch["name"], newest.step)
            return newest
        chosen = manager.load_step(step)
        if not isinstance(chosen, Resumed):
            raise UserError(f"--resume_from {spec}: {manager.root / step_dir_name(step)} cannot be resumed: {chosen}")
        newer = [s for s in manager.committed_steps() if s > step]
        name = f"resumed-from-{step}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        name = manager.comm.broadcast_object(name)  # every rank's clock may say another second
        if newer:
            folder = manager.set_aside(newer, name)
            if self.strategy.is_rank_0:
                log.warning("--resume_from %d: the newer checkpoints of the run left behind (steps %s) are set aside "
                            "in %s: resume and rotation ignore them, nothing deletes them", step,
                            ", ".join(map(str, sorted(newer))), folder)
        chosen.state.extra[BRANCH_KEY] = {"from_step": step, "name": name, "set_aside": sorted(newer)}
        return chosen

    def _load(self, resumed: Resumed, state: TrainState) -> TrainState:
        assert self.manager is not None
        problem = incompatibility(resumed.state, state)
        if problem:
            raise UserError(f"--load_checkpoint: {resumed.path} cannot continue this run: {problem}")
        world_size = self.strategy.world_size
        if resumed.state.world_size != world_size and not self.manager.shared_storage:
            saved_on = resumed.state.world_size
            raise UserError(f"--load_checkpoint: {resumed.path} was saved on {saved_on} ranks and this run has "
                            f"{world_size}; converting it needs every rank's files, but --ckpt_path is on node-local "
                            f"storage: resume on {saved_on} ranks or use shared storage")
        fault_point("resume", resumed.step)
        self.engines.load(resumed)
        loaded = resumed.state
        loaded.world_size = world_size
        loaded.zero_stage = self.strategy.zero_stage
        self.algorithm_state.load_state_dict(loaded.extra.get(self.algorithm, {}))
        for part in self.parts.values():
            part.load(resumed.path)
        log.info("resumed from %s: step %d/%d, epoch %d, %d samples consumed", resumed.path, loaded.global_step,
                 self.total_steps, loaded.epoch, loaded.consumed_samples)
        return loaded

    # ------------------------------------------------------------------ save
    def save(self, state: TrainState, must_commit: bool = False) -> Path | None:
        """Commit a checkpoint of ``state`` (under --async_save: stage it and write it in the background).
        ``must_commit`` waits for the commit and raises on failure whatever --ckpt_on_error says;
        otherwise a failure follows --ckpt_on_error. Returns the committed (or background) path, None when
        the save failed and the run goes on."""
        manager = self.manager
        assert manager is not None, "save needs a checkpoint folder"
        self._wait(must_commit=False)  # a failed background save: stop, or go on and save again now
        state.extra[self.algorithm] = self.algorithm_state.state_dict()
        strategy = self.strategy
        assert self._stop is not None
        phase, self._stop.phase = self._stop.phase, Phase.SAVE
        meta = dict(self.meta, algorithm=self.algorithm, zero_stage=strategy.zero_stage,
                    global_batch_size=strategy.global_batch_size, world_size=strategy.world_size,
                    model_fingerprint=state.model_fingerprint, epoch=state.epoch,
                    consumed_samples=state.consumed_samples)
        try:
            staging = manager.begin(state.global_step)
            try:
                contents = self._stage(staging)
            except BaseException:
                manager.abort(state.global_step)
                raise
            path = manager.save(state, contents, meta, self._best(state, meta), background=self.cfg.async_save)
            if must_commit:
                manager.wait()
        except CheckpointError as e:
            self._save_failed(e, must_commit)
            return None
        finally:
            self._last_save_time = time.monotonic()  # a failed save also waits for the next one
            self._stop.phase = phase
        self._last_saved = state.global_step
        return path

    def _stage(self, staging: Path) -> CheckpointContents:
        """What a checkpoint holds: the engines (unless --disable_ds_ckpt), each engine's Hugging Face folder
        (the weights too under --save_hf_ckpt / --disable_ds_ckpt) and the extra parts."""
        cfg = self.cfg
        contents = CheckpointContents()
        contents.extend(self.engines.stage(staging, host_copy=cfg.async_save, engine_files=not cfg.disable_ds_ckpt,
                                           hf_weights=cfg.save_hf_ckpt or cfg.disable_ds_ckpt))
        for part in self.parts.values():
            contents.extend(part.stage(self.strategy.is_rank_0))
        return contents

    def _wait(self, must_commit: bool) -> None:
        """Wait for the background save in flight, if any; its failure is handled like a failed save."""
        assert self.manager is not None
        try:
            self.manager.wait()
        except CheckpointError as e:
            self._save_failed(e, must_commit)

    def _save_failed(self, e: CheckpointError, must_commit: bool) -> None:
        if must_commit or self.cfg.ckpt_on_error is SaveErrorPolicy.STOP:
            raise e
        if self.strategy.is_rank_0:
            log.error("%s; training goes on (--ckpt_on_error continue) and the next save tries again", e)

    def _preempted(self, state: TrainState, stopped_by: str) -> None:
        assert self._stop is not None
        if self.manager is None:
            msg = (f"stopped by {stopped_by} after step {state.global_step}/{self.total_steps} without a checkpoint: "
                   f"checkpointing is off (set --save_steps, --save_interval_mins or --load_checkpoint)")
            if self.strategy.is_rank_0:
                log.error("%s", msg)
            raise Preempted(msg, None)
        if self._last_saved == state.global_step:  # saved at this step already (the stop came during it)
            self._wait(must_commit=True)
            path = self.manager.root / step_dir_name(state.global_step)
        else:
            path = self.save(state, must_commit=True)
        count = self._stop.count
        extra = f" ({count} stop signals on this rank; the save went on unchanged)" if count > 1 else ""
        msg = (f"preempted by {stopped_by}: checkpoint {path} committed at step {state.global_step}/"
               f"{self.total_steps}; rerun the same command with --load_checkpoint to continue{extra}")
        if self.strategy.is_rank_0:
            log.info("%s", msg)
        raise Preempted(msg, path)

    def _best(self, state: TrainState, meta: dict[str, Any]) -> frozenset[int]:
        """--save_best_metric: record this checkpoint's own evaluation in ``meta`` (when the run evaluated at
        this step) and the best checkpoint so far in the state and ``meta``; returns it, pinned out of rotation.
        The best is chosen among committed checkpoints from their manifests, so a failed save never steals
        the pin and a resumed run knows it."""
        cfg = self.cfg
        name, mode = cfg.save_best_metric, cfg.save_best_mode
        if not name:
            return frozenset()
        own = None
        if self._last_eval is not None and self._last_eval[0] == state.global_step:
            own = self._last_eval[1][name]
            meta[EVAL_KEY] = {name: own}
        best = best_checkpoint(Path(cfg.ckpt_path), name, mode.value)
        if own is not None and (best is None or mode.better(own, best[1])):
            best = (state.global_step, own)
        if best is None:
            return frozenset()
        state.extra[BEST_KEY] = meta[BEST_KEY] = {"step": best[0], "metric": name, "mode": mode.value, "value": best[1]}
        if best[0] != state.global_step and not self._best_room_checked and self.strategy.is_rank_0:
            self._best_room_checked = True
            size = describe(Path(cfg.ckpt_path), best[0], check=False).size
            if cfg.max_ckpt_num < 2 or 2 * size > cfg.max_ckpt_mem * 1e9:
                log.warning("the best checkpoint (step %d, %s %.4g, %.2f GB) stays besides the newest, but "
                            "--max_ckpt_num %d / --max_ckpt_mem %g GB leave no room for both: both are kept and the "
                            "limit is exceeded", best[0], name, best[1], size / 1e9, cfg.max_ckpt_num,
                            cfg.max_ckpt_mem)
        return frozenset({best[0]})
