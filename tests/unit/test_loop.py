"""The shared loop and its Checkpointer in one process, without DeepSpeed or a process group.

A tiny linear model behind a stand-in engine (plain SGD with gradient accumulation) trains on a
regression data set; checkpoints go through the real manager and commit protocol, with the model's
weights as a safetensors file. Cadence, time-based saves, stop requests, failed background saves,
the best pin, the final save and resume arithmetic are checked here in milliseconds; the launched
integration tests keep checking the same promises end to end under DeepSpeed.
"""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from openrl_ckpt.checkpoint.config import SAVE_NOW_FILE, BestMode, CheckpointConfig, SaveErrorPolicy
from openrl_ckpt.checkpoint.contents import StagedWrite, TensorFile
from openrl_ckpt.checkpoint.files import CheckpointError, committed_steps, read_manifest
from openrl_ckpt.checkpoint.manager import CheckpointManager, Resumed
from openrl_ckpt.checkpoint.preemption import Preempted
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy, StrategyConfig
from openrl_ckpt.trainers.base import LoopConfig, StepOutput, Trainer
from openrl_ckpt.trainers.progress import TrackerConfig

WEIGHTS = "model/weights.safetensors"


class OneProcess(DeepspeedStrategy):
    """The real strategy in a world of one, without joining a process group."""

    def __init__(self, micro: int, global_batch: int) -> None:
        super().__init__(StrategyConfig(micro_train_batch_size=micro, train_batch_size=global_batch, zero_stage=0))
        self.grad_accum = self.accumulation_steps(1)


class StandInEngine(torch.nn.Module):
    """What the loop needs of a DeepSpeed engine: backward, a step at accumulation boundaries, the lr."""

    def __init__(self, accumulation: int, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.module = torch.nn.Linear(3, 1)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=lr)
        self.accumulation = accumulation
        self.micro = 0
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x).squeeze(-1)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro + 1) % self.accumulation == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.micro += 1

    def zero_optimization(self) -> bool:
        return False

    bfloat16_enabled = fp16_enabled = zero_optimization

    def get_lr(self) -> list[float]:
        return [self.lr]

    def get_global_grad_norm(self) -> None:
        return None


class WeightsStore:
    """The engine's weights as one safetensors file per checkpoint, through a one-process manager."""

    def __init__(self, engine: StandInEngine) -> None:
        self.engine = engine

    def open_manager(self, ckpt_path: str, max_ckpt_num: int, max_ckpt_mem_gb: float,
                     background: bool) -> CheckpointManager:
        return CheckpointManager.single_process(ckpt_path, max_ckpt_num=max_ckpt_num, max_ckpt_mem_gb=max_ckpt_mem_gb,
                                                background=background)

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()}

    def stage(self, staging: Path, *, host_copy: bool, engine_files: bool, hf_weights: bool) -> list[StagedWrite]:
        return [TensorFile(WEIGHTS, self._weights())] if engine_files else []

    def stage_export(self) -> StagedWrite:
        return TensorFile("model.safetensors", self._weights())

    def load(self, resumed: Resumed) -> None:
        self.engine.module.load_state_dict(load_file(str(resumed.path / WEIGHTS)))


class Regression:
    """Mean squared error; records the sample indices of each micro batch, and can signal itself."""

    name = "regression"

    def __init__(self, engine: StandInEngine, stop_at_call: int | None = None,
                 eval_losses: list[float] | None = None, at_call: dict[int, Any] | None = None) -> None:
        self.engine = engine
        self.calls = 0
        self.stop_at_call = stop_at_call
        self.at_call = dict(at_call or {})  # call number -> what a user does during that micro batch
        self.trained: list[int] = []
        self.eval_losses = list(eval_losses or [])
        self.steps_seen = 0

    def train_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        self.calls += 1
        if self.calls == self.stop_at_call:
            os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice arrives during this micro batch
        if self.calls in self.at_call:
            self.at_call.pop(self.calls)()
        self.trained.extend(int(i) for i in batch["index"])
        loss = torch.nn.functional.mse_loss(self.engine(batch["x"]), batch["y"])
        return StepOutput(loss=loss, metrics={"loss": loss.item()}, tokens=len(batch["index"]))

    def eval_step(self, batch: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
        value = self.eval_losses.pop(0) if self.eval_losses else 0.0  # a scripted evaluation, one per call
        return {"eval_loss": (value, 1.0)}

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state.get("calls", 0)


def rows(n: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    return [{"x": x[i], "y": y[i], "index": i} for i in range(n)]


def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([r["x"] for r in batch]), "y": torch.stack([r["y"] for r in batch]),
            "index": torch.tensor([r["index"] for r in batch])}


def make_trainer(ckpt: CheckpointConfig, *, samples: int = 10, micro: int = 1, global_batch: int = 2,
                 epochs: int = 1, stop_at_call: int | None = None, eval_losses: list[float] | None = None,
                 eval_steps: int = -1,
                 at_call: dict[int, Any] | None = None) -> tuple[Trainer, Regression, StandInEngine]:
    strategy = OneProcess(micro, global_batch)
    engine = StandInEngine(strategy.grad_accum)
    algorithm = Regression(engine, stop_at_call, eval_losses, at_call)
    cfg = LoopConfig(algorithm="regression", max_epochs=epochs, seed=3, checkpoint=ckpt, eval_steps=eval_steps)
    data = rows(samples)
    trainer = Trainer(strategy, engine, algorithm, data, collate, cfg, TrackerConfig(), "fingerprint",
                      eval_set=data[:2] if eval_losses is not None else None, engine_store=WeightsStore(engine))
    return trainer, algorithm, engine


def weights(engine: StandInEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.module.state_dict().items()}


def test_saves_on_the_cadence_and_at_the_end(tmp_path):
    """10 samples, global batch 2: 5 steps; --save_steps 2 saves at 2 and 4, the end adds 5."""
    trainer, _, _ = make_trainer(CheckpointConfig(str(tmp_path), save_steps=2, max_ckpt_num=10))
    state = trainer.fit()
    assert state.global_step == 5 and state.consumed_samples == 10
    assert committed_steps(tmp_path) == [5, 4, 2]
    assert read_manifest(tmp_path / "global_step4")["meta"]["consumed_samples"] == 8


def test_rotation_keeps_the_newest(tmp_path):
    make_trainer(CheckpointConfig(str(tmp_path), save_steps=1, max_ckpt_num=2))[0].fit()
    assert committed_steps(tmp_path) == [5, 4]


@pytest.mark.parametrize("minutes, expected", [(1e-9, [5, 4, 3, 2, 1]), (1000.0, [5])],
                         ids=["every_step_due", "never_due"])
def test_time_based_saves(tmp_path, minutes, expected):
    trainer, _, _ = make_trainer(CheckpointConfig(str(tmp_path), save_interval_mins=minutes, max_ckpt_num=10))
    trainer.fit()
    assert committed_steps(tmp_path) == expected, "the final save always comes on top"


def test_without_periodic_saves_nothing_is_written(tmp_path):
    make_trainer(CheckpointConfig(str(tmp_path / "ckpt")))[0].fit()
    assert not (tmp_path / "ckpt").exists()


def test_stop_request_commits_at_the_step_boundary_and_the_resumed_run_ends_bitwise_equal(tmp_path):
    """Global batch 4 of micro 1 (4 micro batches a step), 10 samples over 2 epochs: 3 steps an epoch.
    SIGTERM during the 14th micro batch (step 4, in the second epoch) stops after step 4."""
    cfg = CheckpointConfig(str(tmp_path / "ckpt"), save_steps=10, load_checkpoint=True)
    reference, reference_algorithm, reference_engine = make_trainer(
        replace(cfg, ckpt_path=str(tmp_path / "reference")), global_batch=4, epochs=2)
    reference.fit()

    trainer, algorithm, _ = make_trainer(cfg, global_batch=4, epochs=2, stop_at_call=14)
    with pytest.raises(Preempted, match=r"preempted by SIGTERM on rank 0 during training: checkpoint .*global_step4 "
                                        r"committed at "
                                        r"step 4/6") as stopped:
        trainer.fit()
    assert stopped.value.exit_code == 0 and committed_steps(tmp_path / "ckpt") == [4]
    assert trainer.state.consumed_samples == 16 and trainer.state.epoch == 1  # epoch positions: 3 x 4 = 12

    resumed, resumed_algorithm, resumed_engine = make_trainer(cfg, global_batch=4, epochs=2)
    state = resumed.fit()
    assert state.global_step == 6 and resumed_algorithm.calls == 24, "the algorithm's own state came back"
    assert algorithm.trained + resumed_algorithm.trained == reference_algorithm.trained, \
        "every sample once, in the uninterrupted order"
    for name, value in weights(reference_engine).items():
        assert torch.equal(weights(resumed_engine)[name], value), name


def test_stop_during_start_up_is_answered_before_the_first_step(tmp_path, monkeypatch):
    """A training CLI records signals from its first import; one that came during start-up (model
    loading, say) stops the run before its first step: nothing new to save, exit 0."""
    from openrl_ckpt.checkpoint import preemption

    early = preemption.StopRequests()  # recorded, not installed: the test process keeps its handlers
    early._handle(signal.SIGTERM, None)
    monkeypatch.setattr(preemption, "_process_requests", early)
    trainer, algorithm, _ = make_trainer(CheckpointConfig(str(tmp_path / "ckpt"), save_steps=2, load_checkpoint=True))
    with pytest.raises(Preempted, match=r"stopped by SIGTERM on rank 0 during start-up, before step 1/5: nothing "
                                        r"new to save; no checkpoint yet: a rerun of the same command starts "
                                        r"afresh") as stopped:
        trainer.fit()
    assert stopped.value.exit_code == 0 and algorithm.calls == 0 and committed_steps(tmp_path / "ckpt") == []


class SignalledStore(WeightsStore):
    """A store that receives SIGTERM while it loads a checkpoint or stages one of ``at_save_step``."""

    def __init__(self, engine: StandInEngine, during: str, at_save_step: int = 0) -> None:
        super().__init__(engine)
        self.during, self.at_save_step, self.saves = during, at_save_step, 0

    def load(self, resumed: Resumed) -> None:
        if self.during == "resume":
            os.kill(os.getpid(), signal.SIGTERM)
        super().load(resumed)

    def stage(self, staging: Path, *, host_copy: bool, engine_files: bool, hf_weights: bool) -> list[StagedWrite]:
        if self.during == "save" and staging.name.endswith(f"global_step{self.at_save_step}"):
            os.kill(os.getpid(), signal.SIGTERM)
        return super().stage(staging, host_copy=host_copy, engine_files=engine_files, hf_weights=hf_weights)


def test_stop_during_a_save_or_a_resume_is_answered_at_once_and_the_rerun_ends_bitwise_equal(tmp_path):
    """SIGTERM while step 2 is saved: the save completes and the run stops right after it (not one step
    later). SIGTERM while the rerun loads that checkpoint: it stops before its first step. The third run
    ends with the uninterrupted run's weights."""
    cfg = CheckpointConfig(str(tmp_path / "ckpt"), save_steps=2, load_checkpoint=True, max_ckpt_num=10)
    reference, _, reference_engine = make_trainer(replace(cfg, ckpt_path=str(tmp_path / "reference")))
    reference.fit()

    def trainer_with(**signalled: Any) -> tuple[Trainer, StandInEngine]:
        trainer, _, engine = make_trainer(cfg)
        if signalled:
            trainer.checkpointer.engines = SignalledStore(engine, **signalled)
        return trainer, engine

    saving, _ = trainer_with(during="save", at_save_step=2)
    with pytest.raises(Preempted, match=r"preempted by SIGTERM on rank 0 during a checkpoint save: checkpoint "
                                        r".*global_step2 committed at step 2/5") as stopped:
        saving.fit()
    assert stopped.value.exit_code == 0 and committed_steps(tmp_path / "ckpt") == [2]

    resuming, _ = trainer_with(during="resume")
    with pytest.raises(Preempted, match=r"stopped by SIGTERM on rank 0 during resume, before step 3/5: nothing new "
                                        r"to save; a rerun of the same command resumes from .*global_step2") as again:
        resuming.fit()
    assert again.value.exit_code == 0 and committed_steps(tmp_path / "ckpt") == [2]

    finishing, engine = trainer_with()
    assert finishing.fit().global_step == 5
    for name, value in weights(reference_engine).items():
        assert torch.equal(weights(engine)[name], value), name


def test_stop_request_without_a_checkpoint_folder_exits_non_zero(tmp_path):
    trainer, _, _ = make_trainer(CheckpointConfig(str(tmp_path / "ckpt")), stop_at_call=2)
    with pytest.raises(Preempted, match="without a checkpoint: checkpointing is off") as stopped:
        trainer.fit()
    assert stopped.value.exit_code == 1 and trainer.state.global_step == 1


def test_resume_of_a_finished_run_trains_nothing(tmp_path):
    cfg = CheckpointConfig(str(tmp_path), save_steps=2, load_checkpoint=True)
    make_trainer(cfg)[0].fit()
    again, algorithm, _ = make_trainer(cfg)
    assert again.fit().global_step == 5 and algorithm.trained == []


@pytest.mark.parametrize("policy", list(SaveErrorPolicy))
def test_failed_background_save(tmp_path, monkeypatch, caplog, policy):
    """The background write of step 2 fails (disk full): ``continue`` trains on and saves at 4 and 5;
    ``stop`` raises at the next step boundary. The committed checkpoints are never damaged."""
    monkeypatch.setenv("OPENRL_FAULT", "write@2:raise=ENOSPC")
    cfg = CheckpointConfig(str(tmp_path), save_steps=2, async_save=True, ckpt_on_error=policy, max_ckpt_num=10)
    trainer, _, _ = make_trainer(cfg)
    if policy is SaveErrorPolicy.STOP:
        with pytest.raises(CheckpointError, match="No space left on device"):
            trainer.fit()
        assert committed_steps(tmp_path) == [] and trainer.state.global_step in (2, 3, 4)
        return
    caplog.set_level("ERROR", logger="openrl_ckpt")
    assert trainer.fit().global_step == 5
    assert committed_steps(tmp_path) == [5, 4] and "training goes on (--ckpt_on_error continue)" in caplog.text


def test_best_checkpoint_is_pinned_out_of_rotation(tmp_path):
    """An evaluation at every step (2 rows, one call each: the scripted losses are per row); the best
    step (2) stays beside the newest although --max_ckpt_num is 1."""
    per_step = [3.0, 1.0, 2.0, 4.0, 5.0]
    cfg = CheckpointConfig(str(tmp_path), save_steps=1, max_ckpt_num=1, save_best_metric="eval_loss",
                           save_best_mode=BestMode.MIN)
    trainer, _, _ = make_trainer(cfg, eval_losses=[v for v in per_step for _ in range(2)], eval_steps=1)
    trainer.fit()
    assert committed_steps(tmp_path) == [5, 2]
    assert read_manifest(tmp_path / "global_step5")["meta"]["best"] == {"step": 2, "metric": "eval_loss",
                                                                       "mode": "min", "value": 1.0}


def test_checkpoint_options_are_checked_before_training(tmp_path):
    from openrl_ckpt.errors import UserError

    with pytest.raises(UserError, match="needs an --eval_dataset"):
        make_trainer(CheckpointConfig(str(tmp_path), save_best_metric="eval_loss"))
    with pytest.raises(UserError, match="needs --eval_steps > 0"):
        make_trainer(CheckpointConfig(str(tmp_path), save_best_metric="eval_loss"), eval_losses=[])


def test_epoch_cadence_with_accumulation_and_a_partial_last_batch(tmp_path):
    """10 samples, global batch 4 of micro 1 (4 micro batches a step): 3 steps an epoch, 3 epochs."""
    every = make_trainer(CheckpointConfig(str(tmp_path / "every"), save_epochs=1, max_ckpt_num=10), global_batch=4,
                         epochs=3)[0]
    every.fit()
    assert committed_steps(tmp_path / "every") == [9, 6, 3]
    second = make_trainer(CheckpointConfig(str(tmp_path / "second"), save_epochs=2, max_ckpt_num=10), global_batch=4,
                          epochs=3)[0]
    second.fit()
    assert committed_steps(tmp_path / "second") == [9, 6], "epoch 2, and the final save"


def test_save_now_by_signal_and_by_file_and_training_goes_on(tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    trigger = ckpt / SAVE_NOW_FILE
    # global batch 2 of micro 1: calls 3-4 are step 2, calls 7-8 step 4
    at_call = {3: lambda: os.kill(os.getpid(), signal.SIGUSR2), 7: trigger.touch}
    caplog.set_level("INFO", logger="openrl_ckpt")
    trainer, _, _ = make_trainer(CheckpointConfig(str(ckpt), save_steps=10, max_ckpt_num=10), at_call=at_call)
    assert trainer.fit().global_step == 5
    assert committed_steps(ckpt) == [5, 4, 2], "saved at the requests (steps 2 and 4) and at the end"
    assert not trigger.exists(), "an answered trigger file is removed"
    assert "save requested (SIGUSR2 on rank 0): saving a checkpoint at step 2/5" in caplog.text
    assert f"save requested ({trigger}): saving a checkpoint at step 4/5" in caplog.text


def test_resume_from_a_chosen_checkpoint_sets_the_newer_ones_aside(tmp_path, caplog):
    from openrl_ckpt.checkpoint.files import set_aside_dirs
    from openrl_ckpt.errors import UserError

    cfg = CheckpointConfig(str(tmp_path), save_steps=1, max_ckpt_num=2, load_checkpoint=True)
    make_trainer(cfg)[0].fit()
    assert committed_steps(tmp_path) == [5, 4]
    with pytest.raises(UserError, match=r"--resume_from 2: .*global_step2 cannot be resumed: .*no manifest.json"):
        make_trainer(replace(cfg, resume_from="2"))[0].fit()
    caplog.set_level("INFO", logger="openrl_ckpt")
    rollback, algorithm, _ = make_trainer(replace(cfg, resume_from=str(tmp_path / "global_step4")))
    assert rollback.fit().global_step == 5 and len(algorithm.trained) == 2, "step 5 trained again"
    assert [p.name for p in set_aside_dirs(tmp_path)] == ["global_step5"], "the old step 5, kept"
    assert committed_steps(tmp_path) == [5, 4], "rotation never touched the set-aside one"
    assert "set aside in" in caplog.text
    again, algorithm, _ = make_trainer(replace(cfg, resume_from="4"))  # the same command, rerun
    assert again.fit().global_step == 5 and algorithm.trained == [], "the branch goes on; no second roll-back"
    assert len(set_aside_dirs(tmp_path)) == 1
    with pytest.raises(UserError, match="give a step number or a global_step<N> folder of --ckpt_path"):
        make_trainer(replace(cfg, resume_from=str(tmp_path / "elsewhere" / "global_step4")))[0].fit()


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_exports_on_their_own_cadence_and_rotation(tmp_path, background):
    save_path = tmp_path / "out"
    cfg = CheckpointConfig(str(tmp_path / "ckpt"), save_steps=5, export_steps=2, max_export_num=1,
                           save_path=str(save_path), async_save=background)
    trainer, _, engine = make_trainer(cfg)
    trainer.fit()
    assert sorted(p.name for p in save_path.iterdir()) == ["global_step4"], "step 2 rotated out"
    assert committed_steps(tmp_path / "ckpt") == [5], "exports are not checkpoints"
    exported = load_file(str(save_path / "global_step4" / "model.safetensors"))
    assert exported.keys() == weights(engine).keys()
