"""Save policies on 2 CPU ranks: epoch cadence, model exports on their own cadence, save now (by signal
and by trigger file), and a roll-back to a chosen checkpoint followed by a second resume.

Three launches of one SFT run (ZeRO-2, global batch 8 of micro 2 on 2 ranks: 2 micro batches a step;
36 rows, so 5 steps an epoch with a filled last batch; 2 epochs):
1. --save_epochs 1 --export_steps 5, SIGUSR2 to one rank at step 2, the trigger file at step 7:
   checkpoints at 2, 5, 7 and 10, exports at 5 and 10, the final model in --save_path beside them;
2. the same command with --resume_from 5: 7 and 10 set aside, steps 6-10 trained again, ending bitwise
   equal to launch 1 (the requests of launch 1 changed nothing in training);
3. that command rerun: it continues the branch (nothing to train), it does not roll back again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import assert_bitwise_equal, committed, launch_cmd, run, weights
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SFT = "openrl_ckpt.cli.train_sft"


def sft(model: str, data: Path, root: Path, *extra: str) -> list[str]:
    return launch_cmd(SFT, [
        "--pretrain", model, "--dataset", str(data), "--input_key", "question", "--output_key", "response",
        "--input_template", "User: {}\nAssistant: ", "--max_len", "128", "--max_samples", "36",
        "--train_batch_size", "8", "--micro_train_batch_size", "2", "--max_epochs", "2", "--learning_rate", "5e-3",
        "--lr_warmup_ratio", "0", "--zero_stage", "2", "--seed", "5", "--logging_steps", "1",
        "--ckpt_path", str(root / "ckpt"), "--save_path", str(root / "out"), "--max_ckpt_num", "10",
        "--save_epochs", "1", "--export_steps", "5", "--max_export_num", "2", "--load_checkpoint", *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, sft_data) -> dict:
    root = tmp_path_factory.mktemp("policies")
    ckpt = root / "ckpt"
    faults = f"step@2:signal=SIGUSR2:once={root / 'usr2'},step@7:touch={ckpt / 'save_now'}"
    first = run(sft(tiny_model_dir, sft_data, root), OPENRL_FAULT=faults)
    result = {"root": root, "first": first, "first_committed": committed(ckpt) if ckpt.exists() else [],
              "first_exports": sorted(p.name for p in (root / "out").glob("global_step*"))}
    result["first_final"] = weights(root / "out") if first.returncode == 0 else None
    result["rollback"] = run(sft(tiny_model_dir, sft_data, root, "--resume_from", "5"))
    result["again"] = run(sft(tiny_model_dir, sft_data, root, "--resume_from", "5"))
    return result


def test_epoch_cadence_save_now_and_exports(runs, capsys):
    first, root = runs["first"], runs["root"]
    assert first.returncode == 0, first.output[-4000:]
    assert runs["first_committed"] == ["global_step2", "global_step5", "global_step7", "global_step10"]
    usr2 = first.lines("save requested (SIGUSR2 on rank")
    assert len(usr2) == 1 and "at step 2/10, then training goes on" in usr2[0]
    assert len(first.lines(f"save requested ({root / 'ckpt' / 'save_now'}): saving a checkpoint at step 7/10")) == 1
    assert not (root / "ckpt" / "save_now").exists()
    assert runs["first_exports"] == ["global_step10", "global_step5"]
    assert (root / "out" / "config.json").exists(), "the final model sits beside the exports"

    # each export is what `ckpt export` writes for the checkpoint of the same step
    from openrl_ckpt.cli import ckpt
    from openrl_ckpt.cli.entry import run as run_cli

    exported = root / "exported5"
    run_cli(ckpt.main, ["export", str(root / "ckpt"), "--step", "5", "--output", str(exported)])
    export5 = root / "out" / "global_step5"
    assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in export5.iterdir())
    assert_bitwise_equal(load_file(str(exported / "model.safetensors")), load_file(str(export5 / "model.safetensors")))
    assert_bitwise_equal(weights(root / "out" / "global_step10"), runs["first_final"])


def test_rollback_sets_newer_checkpoints_aside_and_a_rerun_continues_the_branch(runs, capsys):
    root, rollback, again = runs["root"], runs["rollback"], runs["again"]
    assert rollback.returncode == 0, rollback.output[-4000:]
    assert rollback.lines("resumed from") and "step 5/10" in rollback.lines("resumed from")[0]
    assert len(rollback.lines("the newer checkpoints of the run left behind (steps 7, 10) are set aside")) == 1
    aside = sorted(p.relative_to(root / "ckpt").as_posix() for p in (root / "ckpt" / "set_aside").glob("*/*"))
    assert [a.split("/")[-1] for a in aside] == ["global_step10", "global_step7"]
    assert committed(root / "ckpt") == ["global_step2", "global_step5", "global_step10"]
    assert_bitwise_equal(weights(root / "out"), runs["first_final"])

    assert again.returncode == 0, again.output[-4000:]
    assert len(again.lines("--resume_from 5: this run already went back to step 5")) == 1
    assert "continuing its newest checkpoint, step 10" in again.output
    assert len(list((root / "ckpt" / "set_aside").iterdir())) == 1, "no second roll-back"

    from openrl_ckpt.cli import ckpt
    from openrl_ckpt.cli.entry import run as run_cli

    capsys.readouterr()
    run_cli(ckpt.main, ["list", str(root / "ckpt"), "--json"])
    listing = json.loads(capsys.readouterr().out)
    assert sorted(c["step"] for c in listing["checkpoints"]) == [2, 5, 10] and len(listing["set_aside"]) == 2
    assert all(torch.isfinite(t).all() for t in weights(root / "out").values())
