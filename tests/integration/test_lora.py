"""LoRA through the real CLI: checkpoints hold only the adapters and their optimizer state, a resume ends
with the same adapter to the bit, --save_path is a PEFT adapter folder, and `ckpt export` gives that same
adapter (or the merged model, equal to lora_combiner's).

Two runs of the same command on the dropout model (ZeRO-2, fp32, rank 4, 12 steps, a save every 5):
one uninterrupted, one started in a fresh folder holding a copy of the first one's step-5 checkpoint,
which resumes there (a kill -9 of the same loop and Checkpointer is test_sft_resume.py's and
test_fault_tolerance.py's). A third, with --disable_ds_ckpt under ZeRO-3, checks that the Hugging Face
copy alone is saved, exported, and that the run says resume is off.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from launch import Result, assert_bitwise_equal, committed, launch_cmd
from safetensors.torch import load_file
from test_ckpt_tool import ckpt_cli, run_and_clean

pytestmark = pytest.mark.slow

SFT = "openrl_ckpt.cli.train_sft"
RANK = 4
TRAINABLE = 8192  # tiny Llama (hidden 64, kv 32, mlp 128, 2 layers), rank 4 on all 7 linear layers per block


def lora_args(model: str, data: Path, ckpt: Path, out: Path, *extra: str, zero: int = 2) -> list[str]:
    return ["--pretrain", model, "--dataset", str(data), "--input_key", "question", "--output_key", "response",
            "--input_template", "User: {}\nAssistant: ", "--max_len", "256", "--train_batch_size", "8",
            "--micro_train_batch_size", "2", "--max_epochs", "1", "--learning_rate", "2e-3",
            "--zero_stage", str(zero), "--lora_rank", str(RANK), "--lora_alpha", "8", "--lora_dropout", "0.1",
            "--save_steps", "5", "--ckpt_path", str(ckpt), "--load_checkpoint", "--max_ckpt_num", "5",
            "--save_path", str(out), "--logging_steps", "1", "--seed", "11", *extra]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_dropout_model_dir, sft_data) -> dict:
    root = tmp_path_factory.mktemp("lora")
    ref = run_and_clean(launch_cmd(SFT, lora_args(tiny_dropout_model_dir, sft_data, root / "ref_ckpt",
                                                  root / "ref_out")))
    ref_committed = committed(root / "ref_ckpt") if (root / "ref_ckpt").exists() else []
    if "global_step5" in ref_committed:
        shutil.copytree(root / "ref_ckpt" / "global_step5", root / "ckpt" / "global_step5")
    resumed = run_and_clean(launch_cmd(SFT, lora_args(tiny_dropout_model_dir, sft_data, root / "ckpt", root / "out")))
    return {"root": root, "ref": ref, "ref_committed": ref_committed, "resumed": resumed}


def assert_ok(r: Result) -> None:
    assert r.returncode == 0, r.output[-4000:]


def test_lora_resume_is_bitwise(lora_runs):
    ref, resumed, root = lora_runs["ref"], lora_runs["resumed"], lora_runs["root"]
    assert_ok(ref)
    assert lora_runs["ref_committed"] == ["global_step5", "global_step10", "global_step12"]
    assert_ok(resumed)
    assert "resumed from" in resumed.output and "step 5/12" in resumed.output
    assert committed(root / "ckpt") == ["global_step5", "global_step10", "global_step12"]
    out = root / "out"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(("tokenizer", "chat_template"))) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"], "--save_path is a PEFT adapter folder"
    a = load_file(str(root / "ref_out" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert len(a) == 28 and sum(t.numel() for t in a.values()) == TRAINABLE
    assert_bitwise_equal(a, b)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == RANK


def engine_payload(engine_dir: Path) -> tuple[int, int, set[str]]:
    """(file bytes, tensor bytes, parameter names) of a DeepSpeed engine folder (test-only unpickling)."""
    total, tensors, names = 0, 0, set()

    def walk(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    for f in engine_dir.glob("*.pt"):
        total += f.stat().st_size
        state = torch.load(f, map_location="cpu", weights_only=False)
        tensors += walk(state)
        names |= set(state.get("module") or {})
        for shapes in state.get("param_shapes") or []:
            names |= set(shapes)
    return total, tensors, names


def test_lora_checkpoint_holds_only_adapters(lora_runs, tiny_dropout_model_dir):
    """At most 1.2 x trainable params x (4 bytes fp32 weight + 12 optimizer bytes: fp32 master copy and
    two Adam moments) of tensors; everything else is metadata. No frozen base weight is in it."""
    assert_ok(lora_runs["ref"])
    step = lora_runs["root"] / "ref_ckpt" / "global_step12"
    total, tensors, names = engine_payload(step / "model")
    bound = 1.2 * TRAINABLE * (4 + 12)
    assert tensors <= bound, f"{tensors} tensor bytes > {bound:.0f}"
    assert names and all("lora_" in n for n in names), sorted(n for n in names if "lora_" not in n)[:5]
    base_bytes = sum(f.stat().st_size for f in Path(tiny_dropout_model_dir).glob("*.safetensors"))
    whole = sum(f.stat().st_size for f in step.rglob("*") if f.is_file())
    print(f"LoRA checkpoint: {whole} bytes on disk, engine files {total} bytes of which tensors {tensors} "
          f"(bound {bound:.0f}); base model weights {base_bytes} bytes")
    assert whole < base_bytes, "the frozen base would not fit in this checkpoint"
    assert (step / "hf" / "model" / "adapter_config.json").exists()


def test_export_of_a_lora_checkpoint(lora_runs, tmp_path, tiny_dropout_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    from openrl_ckpt.cli import lora_combiner
    from openrl_ckpt.cli.entry import run as run_cli

    assert_ok(lora_runs["resumed"])
    root = lora_runs["root"]
    adapter = tmp_path / "adapter"
    code, _, err = ckpt_cli("export", str(root / "ckpt"), "--output", str(adapter), capsys=capsys)
    assert code == 0, err
    for f in (root / "out").iterdir():  # the adapter folder --save_path holds, file for file
        assert (adapter / f.name).read_bytes() == f.read_bytes(), f.name

    merged = tmp_path / "merged"
    code, _, err = ckpt_cli("export", str(root / "ckpt"), "--output", str(merged), "--merge_lora", capsys=capsys)
    assert code == 0, err
    combined = tmp_path / "combined"
    run_cli(lora_combiner.main,
            ["--base", tiny_dropout_model_dir, "--lora", str(root / "out"), "--output", str(combined)])
    a, b = load_file(str(merged / "model.safetensors")), load_file(str(combined / "model.safetensors"))
    assert_bitwise_equal(a, b)
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())

    code, _, err = ckpt_cli("export", str(root / "ckpt"), "--output", str(tmp_path / "m2"), "--merge_lora",
                            "--base", str(tmp_path / "nowhere"), capsys=capsys)
    assert code == 2 and "--base" in err and not (tmp_path / "m2").exists()


def test_disable_ds_ckpt_keeps_only_the_hf_copy(tmp_path, tiny_model_dir, sft_data, capsys):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    args = lora_args(tiny_model_dir, sft_data, ckpt, out, "--disable_ds_ckpt", "--max_samples", "40", zero=3)
    r = run_and_clean(launch_cmd(SFT, args))
    assert_ok(r)
    assert "--disable_ds_ckpt: checkpoints hold only a Hugging Face copy" in r.output
    assert "--load_checkpoint is ignored" in r.output
    assert committed(ckpt) == ["global_step5"]
    step = ckpt / "global_step5"
    assert sorted(p.name for p in step.iterdir()) == ["hf", "manifest.json", "train_state.json"]
    exported = tmp_path / "exported"
    code, stdout, err = ckpt_cli("export", str(ckpt), "--output", str(exported), capsys=capsys)
    assert code == 0 and "the Hugging Face copy" in stdout, err
    for f in out.iterdir():
        assert (exported / f.name).read_bytes() == f.read_bytes(), f.name
