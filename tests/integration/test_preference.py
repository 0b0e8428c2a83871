"""train_rm, train_dpo and train_kto end to end on 2 CPU ranks: each learns the shipped preference data
(chosen answers open with "Certainly!", rejected ones with "Whatever." and are scrambled), and the same
command, started in a fresh folder that holds a copy of the run's step-6 checkpoint, resumes there and ends
with the same weights to the bit. (A kill -9 of the same Trainer and Checkpointer, at every step and
inside a save, is test_sft_resume.py's and test_fault_tolerance.py's.)"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from launch import DATA, assert_bitwise_equal, committed, launch_cmd, run, weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> dict[str, Path]:
    """96 training pairs and 40 held-out ones; the same split of the unpaired KTO rows."""
    out = tmp_path_factory.mktemp("pref")
    files = {}
    for name, source in (("pairs", "preference.jsonl"), ("kto", "kto_unpaired.jsonl")):
        lines = (DATA / source).read_text().splitlines()
        files[name] = out / f"{name}_train.jsonl"
        files[name].write_text("\n".join(lines[:96]) + "\n")
        files[name + "_eval"] = out / f"{name}_eval.jsonl"
        files[name + "_eval"].write_text("\n".join(lines[-40:]) + "\n")
    return files


def common(model: str, ckpt: Path, out: Path, zero: int) -> list[str]:
    # 96 rows, global batch 8 (micro 2 x 2 ranks x 2 accumulation): 12 steps, saves at 3, 6, 9, 12
    return ["--pretrain", model, "--max_len", "128", "--train_batch_size", "8", "--micro_train_batch_size", "2",
            "--max_epochs", "1", "--learning_rate", "5e-4", "--zero_stage", str(zero), "--eval_steps", "6",
            "--save_steps", "3", "--ckpt_path", str(ckpt), "--load_checkpoint", "--save_path", str(out),
            "--seed", "5"]


def evals(output: str, name: str) -> list[float]:
    return [float(m) for m in re.findall(rf"{name} (-?[0-9.e+-]+)", output)]


def resume_from_a_copy(module: str, args_for, tmp_path: Path) -> tuple[Path, str]:
    """Uninterrupted run, then the same command in a fresh folder holding only a copy of that run's step-6
    checkpoint: it resumes there, and the weights must match."""
    ref_out, ref_ckpt = tmp_path / "ref_out", tmp_path / "ref_ckpt"
    ref = run(launch_cmd(module, args_for(ref_ckpt, ref_out)))
    assert ref.returncode == 0, ref.output[-3000:]
    assert committed(ref_ckpt) == ["global_step6", "global_step9", "global_step12"]  # --max_ckpt_num 3
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    shutil.copytree(ref_ckpt / "global_step6", ckpt / "global_step6")
    second = run(launch_cmd(module, args_for(ckpt, out)))
    assert second.returncode == 0, second.output[-3000:]
    assert "step 6/12, epoch 0, 48 samples consumed" in second.output
    assert_bitwise_equal(weights(ref_out), weights(out))
    return ref_out, ref.output


def test_rm_learns_resumes_bitwise_and_loads_back(tmp_path, tiny_dropout_model_dir, pref_data):
    def args_for(ckpt: Path, out: Path) -> list[str]:
        return [*common(tiny_dropout_model_dir, ckpt, out, zero=2), "--dataset", str(pref_data["pairs"]),
                "--eval_dataset", str(pref_data["pairs_eval"]), "--prompt_key", "prompt", "--normalize_reward"]

    out, output = resume_from_a_copy("openrl_ckpt.cli.train_rm", args_for, tmp_path)
    accuracy, gap = evals(output, "eval_acc"), evals(output, "eval_reward_gap")
    assert accuracy[-1] > 0.9 and gap[-1] > gap[0], output[-3000:]

    from openrl_ckpt.models.actor import ModelConfig, load_tokenizer
    from openrl_ckpt.models.reward import load_reward_model

    config = json.loads((out / "config.json").read_text())
    assert config["normalize_reward"] and config["value_head_prefix"] == "score" and config["std"] > 0
    model, tok = load_reward_model(ModelConfig(pretrain=str(out)), "score").eval(), load_tokenizer(str(out))
    row = json.loads(pref_data["pairs_eval"].read_text().splitlines()[0])
    texts = [row["prompt"] + row["chosen"] + tok.eos_token, row["prompt"] + row["rejected"] + tok.eos_token]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=True)
    with torch.no_grad():
        chosen, rejected = model(batch["input_ids"], batch["attention_mask"]).tolist()
    assert chosen > rejected


def test_dpo_learns_and_resumes_bitwise_under_zero3(tmp_path, tiny_dropout_model_dir, pref_data):
    def args_for(ckpt: Path, out: Path) -> list[str]:
        return [*common(tiny_dropout_model_dir, ckpt, out, zero=3), "--dataset", str(pref_data["pairs"]),
                "--eval_dataset", str(pref_data["pairs_eval"]), "--prompt_key", "prompt", "--beta", "0.1",
                "--ref_offload", "--nll_loss_coef", "0.1"]

    _, output = resume_from_a_copy("openrl_ckpt.cli.train_dpo", args_for, tmp_path)
    accuracy, margin = evals(output, "eval_reward_acc"), evals(output, "eval_reward_margin")
    assert accuracy[-1] > 0.9 and margin[-1] > margin[0] > 0, output[-3000:]


def test_kto_learns_and_resumes_bitwise(tmp_path, tiny_dropout_model_dir, pref_data):
    def args_for(ckpt: Path, out: Path) -> list[str]:
        # the raw text and beta this test is sized for (train_kto's defaults are OpenRLHF's: the
        # 'User: {}\nAssistant: ' template, whose longer prompts drop one more row, and beta 0.01)
        return [*common(tiny_dropout_model_dir, ckpt, out, zero=2), "--dataset", str(pref_data["kto"]),
                "--eval_dataset", str(pref_data["kto_eval"]), "--unpaired_preference", "--input_key", "prompt",
                "--output_key", "completion", "--label_key", "label", "--input_template", "", "--beta", "0.1"]

    _, output = resume_from_a_copy("openrl_ckpt.cli.train_kto", args_for, tmp_path)
    assert "desirable and" in output and "undesirable answers" in output
    good, bad = evals(output, "eval_desirable_logratio"), evals(output, "eval_undesirable_logratio")
    # the policy raised desirable answers above the reference and lowered undesirable ones
    assert good[-1] > 0 > bad[-1] and good[-1] > good[0], output[-3000:]
