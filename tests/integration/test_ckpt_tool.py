"""`python -m openrl_ckpt.cli.ckpt` on real checkpoints, and the checkpoint options that feed it.

One run feeds every test (a module fixture): ZeRO-3 in bf16 (the export path that consolidates the
optimizer's fp32 partitions and casts them), 12 steps with a save and an evaluation every 3,
--save_hf_ckpt, --save_best_metric eval_loss --save_best_mode max (the loss falls as the model trains,
so the best is the oldest checkpoint: it must survive rotation by --max_ckpt_num 2), and a kill -9 at
step 7 followed by a resume with the same command.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from launch import DATA, Result, committed, launch_cmd, run, weights

pytestmark = pytest.mark.slow

SFT = "openrl_ckpt.cli.train_sft"


def run_and_clean(cmd: list[str], **kwargs) -> Result:
    """``run``, then remove the shared-memory buffers DeepSpeed's CPU all-reduce leaves in /dev/shm
    (named by the master port; a killed run never removes them, 69 MB per rank)."""
    try:
        return run(cmd, **kwargs)
    finally:
        port = cmd[cmd.index("--master_port") + 1] if "--master_port" in cmd else None
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*") if port else []:
            f.unlink(missing_ok=True)


def ckpt_cli(*argv: str, capsys) -> tuple[int, str, str]:
    """The ckpt CLI in this process (as `python -m openrl_ckpt.cli.ckpt` runs it): exit code, stdout, stderr."""
    from openrl_ckpt.cli import ckpt
    from openrl_ckpt.cli.entry import run as run_cli

    capsys.readouterr()
    try:
        run_cli(ckpt.main, list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def eval_losses(result: Result) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step (\d+)/\d+ eval_loss (\S+)", result.output)}


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, tiny_model_dir, sft_data) -> dict:
    root = tmp_path_factory.mktemp("ckpt_tool")
    eval_data = root / "eval.jsonl"
    eval_data.write_text("\n".join((DATA / "sft.jsonl").read_text().splitlines()[-16:]) + "\n")
    ckpt, out = root / "ckpt", root / "out"
    args = ["--pretrain", tiny_model_dir, "--dataset", str(sft_data), "--input_key", "question",
            "--output_key", "response", "--input_template", "User: {}\nAssistant: ", "--max_len", "256",
            "--max_samples", "48", "--train_batch_size", "8", "--micro_train_batch_size", "2", "--max_epochs", "2",
            "--learning_rate", "5e-3", "--lr_warmup_ratio", "0", "--zero_stage", "3", "--bf16", "--seed", "5",
            "--eval_dataset", str(eval_data), "--eval_steps", "3", "--save_steps", "3", "--ckpt_path", str(ckpt),
            "--load_checkpoint", "--max_ckpt_num", "2", "--max_ckpt_mem", "10", "--save_hf_ckpt",
            "--save_best_metric", "eval_loss", "--save_best_mode", "max", "--save_path", str(out)]
    killed = run_and_clean(launch_cmd(SFT, args), kill_when="step 7/12")
    at_kill = committed(ckpt)
    resumed = run_and_clean(launch_cmd(SFT, args))
    return {"killed": killed, "at_kill": at_kill, "resumed": resumed, "ckpt": ckpt, "out": out, "root": root}


def test_best_checkpoint_survives_rotation_and_resume(best_run, capsys):
    r = best_run["resumed"]
    assert best_run["killed"].returncode != 0 and best_run["at_kill"] == ["global_step3", "global_step6"]
    assert r.returncode == 0, r.output[-4000:]
    assert "resumed from" in r.output and "step 6/12" in r.output
    losses = {**eval_losses(best_run["killed"]), **eval_losses(r)}
    assert sorted(losses) == [3, 6, 9, 12] and max(losses, key=losses.get) == 3, losses
    # --max_ckpt_num 2 would keep 9 and 12; the best (3, highest eval_loss) is pinned out of rotation
    ckpt = best_run["ckpt"]
    assert committed(ckpt) == ["global_step3", "global_step12"]
    state = json.loads((ckpt / "global_step12" / "train_state.json").read_text())
    assert state["extra"]["best"]["step"] == 3 and state["extra"]["best"]["metric"] == "eval_loss"
    assert abs(state["extra"]["best"]["value"] - losses[3]) < 1e-3

    code, out, err = ckpt_cli("list", str(ckpt), "--json", capsys=capsys)
    assert code == 0, err
    rows = {c["step"]: c for c in json.loads(out)["checkpoints"]}
    assert sorted(rows) == [3, 12] and rows[3]["best"] and not rows[12]["best"]
    assert all(c["valid"] and c["hf_copy"] and c["engines"] == ["model"] for c in rows.values())
    assert rows[12]["epoch"] == 2 and rows[12]["consumed_samples"] == 96
    code, out, _ = ckpt_cli("list", str(ckpt), capsys=capsys)
    assert code == 0 and [line.split()[0] for line in out.splitlines() if "[best]" in line] == ["3"]


def test_export_equals_save_path_and_the_hf_copy(best_run, tmp_path, capsys):
    """The consolidated ZeRO-3 shards, cast to bf16, are bitwise what --save_path wrote at step 12."""
    from transformers import AutoModelForCausalLM

    assert best_run["resumed"].returncode == 0
    out, ckpt = best_run["out"], best_run["ckpt"]
    exported = tmp_path / "exported"
    code, stdout, err = ckpt_cli("export", str(ckpt), "--output", str(exported), capsys=capsys)
    assert code == 0, err
    assert "global_step12/model (ZeRO-3 fp32 master weights, trained in bf16)" in stdout
    saved = weights(out)
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    for folder in (exported, ckpt / "global_step12" / "hf" / "model"):
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in out.iterdir())
        for f in out.iterdir():
            assert (folder / f.name).read_bytes() == f.read_bytes(), f"{folder}/{f.name} differs from --save_path"
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert model.dtype == torch.bfloat16 and next(model.parameters()).shape[0] > 0

    # --dtype fp32: the optimizer's fp32 master weights, which round to exactly the bf16 ones
    fp32 = tmp_path / "fp32"
    code, _, err = ckpt_cli("export", str(ckpt), "--step", "12", "--output", str(fp32), "--dtype", "fp32",
                            capsys=capsys)
    assert code == 0, err
    master = weights(fp32)
    assert master.keys() == saved.keys() and all(t.dtype == torch.float32 for t in master.values())
    assert all(torch.equal(master[k].to(torch.bfloat16), saved[k]) for k in saved)
    assert any(not torch.equal(master[k], saved[k].float()) for k in saved), "more precise than bf16"
    assert json.loads((fp32 / "config.json").read_text())["dtype"] == "float32"

    # the best checkpoint exports too, and differs (it is 9 steps older)
    old = tmp_path / "step3"
    assert ckpt_cli("export", str(ckpt / "global_step3"), "--output", str(old), capsys=capsys)[0] == 0
    assert any(not torch.equal(t, saved[k]) for k, t in weights(old).items())


def test_convert_to_universal(best_run, tmp_path, capsys):
    """Every parameter's fp32 weight in the universal form is the consolidated fp32 master weight."""
    assert best_run["resumed"].returncode == 0
    uni, fp32 = tmp_path / "universal", tmp_path / "fp32"
    code, _, err = ckpt_cli("convert", str(best_run["ckpt"]), "--to", "universal", "--output", str(uni),
                            capsys=capsys)
    assert code == 0, err
    assert (uni / "latest_universal").read_text().strip() == "model"
    assert ckpt_cli("export", str(best_run["ckpt"]), "--output", str(fp32), "--dtype", "fp32", capsys=capsys)[0] == 0
    master = weights(fp32)
    params = {p.name: p for p in (uni / "model" / "zero").iterdir()}
    assert set(master) <= set(params), sorted(set(master) - set(params))[:3]
    for name, tensor in master.items():
        converted = torch.load(params[name] / "fp32.pt", map_location="cpu", weights_only=False)
        converted = converted["param"] if isinstance(converted, dict) else converted
        assert torch.equal(converted.reshape(tensor.shape), tensor), name
        assert (params[name] / "exp_avg.pt").exists() and (params[name] / "exp_avg_sq.pt").exists()


@pytest.mark.parametrize("how", ["flip", "truncate", "missing", "no_manifest"])
def test_damaged_real_checkpoint(best_run, tmp_path, capsys, how):
    assert best_run["resumed"].returncode == 0
    ckpt = tmp_path / "ckpt"
    shutil.copytree(best_run["ckpt"], ckpt)
    newest = ckpt / "global_step12"
    manifest = json.loads((newest / "manifest.json").read_text())
    victim = max((n for n in manifest["files"] if n.startswith("model/")), key=lambda n: manifest["files"][n]["size"])
    path = newest / victim
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif how == "missing":
        path.unlink()
    else:
        (newest / "manifest.json").unlink()
    before = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*"))

    code, out, err = ckpt_cli("verify", str(ckpt), capsys=capsys)
    export_code, _, export_err = ckpt_cli("export", str(ckpt), "--output", str(tmp_path / "x"), capsys=capsys)
    list_code, list_out, _ = ckpt_cli("list", str(ckpt), capsys=capsys)
    if how == "no_manifest":  # no longer committed: the tools see step 3 only, as a resume would
        assert code == 0 and "global_step3: ok" in out and "global_step12" not in out
        assert list_code == 0 and "global_step12: no manifest.json" in list_out
        assert export_code == 0  # exports the newest committed checkpoint, step 3
    else:
        assert code == 1 and victim in one_error_line(err) and "global_step3: ok" in out
        assert export_code == 1 and victim in one_error_line(export_err) and not (tmp_path / "x").exists()
        assert list_code == 1 and "DAMAGED" in list_out
    assert sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")) == before, "only prune deletes"


def test_prune_keeps_newest_and_best(best_run, tmp_path, capsys):
    assert best_run["resumed"].returncode == 0
    ckpt = tmp_path / "ckpt"
    shutil.copytree(best_run["ckpt"], ckpt)
    code, out, err = ckpt_cli("prune", str(ckpt), "--max_ckpt_num", "1", "--max_ckpt_mem", "10", capsys=capsys)
    assert code == 0, err
    assert "global_step3 is the best checkpoint" in out and "deleted" not in out
    assert committed(ckpt) == ["global_step3", "global_step12"]
