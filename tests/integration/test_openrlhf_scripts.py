"""The example scripts of OpenRLHF 0.6.x (examples/scripts/train_*_llama.sh, train_knowledge_distillation.sh,
train_prm_mistral.sh) with only the module name, the model, the data and the paths changed: every flag
and value as they pass them, on a tiny model with tied embeddings (as small Llama/Qwen models have).

--flash_attn is left out (no flash-attn kernels on CPU: a one-line error, tested in tests/unit), and
--train_batch_size (256 or 64 there) is 16 here, so that a few dozen rows make a few steps on two CPU
ranks; everything else is the scripts' own, values included. The PRM launch appends three flags for
the checks it also serves: --save_steps 1 (a checkpoint to resume from), --learning_rate 5e-3 (so bf16
weights visibly move) and --save_hf_ckpt (the tied-embedding check: --save_path, `ckpt export` and the
checkpoint's hf/ copy hold the keys save_pretrained writes)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from launch import DATA, assert_bitwise_equal, committed, launch_cmd, run, weights
from safetensors import safe_open

pytestmark = pytest.mark.slow

PLACEHOLDER = "ки"
TRAIN_BATCH = "16"  # the scripts' 256 (64 for KTO), scaled to CPU
ROWS = 16  # one optimizer step


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer with the PRM placeholder as one token, a tied student and an untied teacher, and the
    shipped data in the shapes the scripts read."""
    from transformers import AutoTokenizer

    from openrl_ckpt.utils.tiny import build_tiny_model, build_tiny_tokenizer, example_texts

    root = tmp_path_factory.mktemp("scripts")
    build_tiny_tokenizer(str(root / "tok"), example_texts(DATA))
    tok = AutoTokenizer.from_pretrained(root / "tok")
    tok.add_tokens([PLACEHOLDER])  # Mistral's tokenizer has it as one token
    tok.save_pretrained(root / "tok")
    tied = Path(build_tiny_model(str(root / "tied"), str(root / "tok"), tie_word_embeddings=True, seed=1))
    teacher = Path(build_tiny_model(str(root / "teacher"), str(root / "tok"), seed=2))

    def jsonl(name: str, rows: list[dict]) -> Path:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return root / name

    sft = jsonl("sft.jsonl", [json.loads(line) for line in (DATA / "sft.jsonl").read_text().splitlines()[:ROWS]])
    prefs = [json.loads(line) for line in (DATA / "preference.jsonl").read_text().splitlines()[:ROWS]]
    chat = jsonl("pairs_chat.jsonl", [
        {"chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]}
        for r in prefs])
    kto = jsonl("kto.jsonl", [{"instruction": r["prompt"], "response": r["completion"], "score": r["label"]}
                              for r in map(json.loads, (DATA / "kto_unpaired.jsonl").read_text().splitlines()[:ROWS])])
    rng = random.Random(0)
    steps = []
    for _ in range(48):  # three steps  # Math-Shepherd's shape: steps ending in the placeholder, a +/- label per step
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        wrong = rng.random() < 0.5
        steps.append({"input": f"What is {a} plus {b}? {a} plus {b} is {a + b + wrong} {PLACEHOLDER} "
                               f"The answer is {a + b + wrong} {PLACEHOLDER}",
                      "value": ["-" if wrong else "+"] * 2})
    prm = jsonl("prm.jsonl", steps)
    return {"root": root, "tied": tied, "teacher": teacher, "sft": sft, "chat": chat, "kto": kto, "prm": prm}


def script_run(module: str, flags: list[str]) -> None:
    res = run(launch_cmd(module, flags))
    assert res.returncode == 0, res.output[-4000:]
    assert "Traceback" not in res.output


def test_train_sft_llama_sh(assets, tmp_path):
    script_run("openrl_ckpt.cli.train_sft", [
        "--max_len", "2048", "--dataset", str(assets["sft"]), "--input_key", "question", "--output_key",
        "response", "--train_batch_size", TRAIN_BATCH, "--micro_train_batch_size", "2", "--max_samples", "500000",
        "--pretrain", str(assets["tied"]), "--save_path", str(tmp_path / "sft"), "--save_steps", "-1",
        "--logging_steps", "1", "--eval_steps", "-1", "--zero_stage", "2", "--max_epochs", "1", "--bf16",
        "--learning_rate", "5e-6", "--load_checkpoint", "--gradient_checkpointing",
        "--ckpt_path", str(tmp_path / "ckpt")])
    assert (tmp_path / "sft" / "model.safetensors").exists()


def test_train_rm_llama_sh(assets, tmp_path):
    script_run("openrl_ckpt.cli.train_rm", [
        "--save_path", str(tmp_path / "rm"), "--save_steps", "-1", "--logging_steps", "1", "--eval_steps", "-1",
        "--train_batch_size", TRAIN_BATCH, "--micro_train_batch_size", "1", "--pretrain", str(assets["tied"]), "--bf16",
        "--max_epochs", "1", "--max_len", "8192", "--zero_stage", "3", "--learning_rate", "9e-6",
        "--dataset", str(assets["chat"]), "--apply_chat_template", "--chosen_key", "chosen", "--rejected_key",
        "rejected", "--load_checkpoint", "--gradient_checkpointing", "--ckpt_path", str(tmp_path / "ckpt")])
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["value_head_prefix"] == "score"


def test_train_dpo_llama_sh(assets, tmp_path):
    script_run("openrl_ckpt.cli.train_dpo", [
        "--save_path", str(tmp_path / "dpo"), "--save_steps", "-1", "--logging_steps", "1", "--eval_steps", "-1",
        "--train_batch_size", TRAIN_BATCH, "--micro_train_batch_size", "1", "--pretrain", str(assets["tied"]), "--bf16",
        "--max_epochs", "1", "--max_len", "8192", "--zero_stage", "3", "--learning_rate", "5e-7", "--beta", "0.1",
        "--dataset", str(assets["chat"]), "--apply_chat_template", "--chosen_key", "chosen", "--rejected_key",
        "rejected", "--load_checkpoint", "--gradient_checkpointing", "--ckpt_path", str(tmp_path / "ckpt")])
    assert (tmp_path / "dpo" / "model.safetensors").exists()


def test_train_kto_llama_sh_reads_unpaired_rows(assets, tmp_path):
    script_run("openrl_ckpt.cli.train_kto", [
        "--save_path", str(tmp_path / "kto"), "--save_steps", "-1", "--logging_steps", "1", "--eval_steps", "-1",
        "--train_batch_size", TRAIN_BATCH, "--micro_train_batch_size", "1", "--pretrain", str(assets["tied"]), "--bf16",
        "--max_epochs", "1", "--max_len", "8192", "--zero_stage", "3", "--learning_rate", "5e-7",
        "--dataset", str(assets["kto"]), "--input_key", "instruction", "--output_key", "response",
        "--label_key", "score", "--beta", "0.1", "--max_samples", "1024", "--gradient_checkpointing",
        "--ckpt_path", str(tmp_path / "ckpt")])
    assert (tmp_path / "kto" / "model.safetensors").exists()


def test_train_knowledge_distillation_sh(assets, tmp_path):
    script_run("openrl_ckpt.cli.train_kd", [
        "--max_len", "2048", "--dataset", str(assets["sft"]), "--input_key", "question", "--output_key",
        "response", "--train_batch_size", TRAIN_BATCH, "--micro_train_batch_size", "2", "--max_samples", "500000",
        "--pretrain", str(assets["tied"]), "--teacher_model", str(assets["teacher"]), "--save_path",
        str(tmp_path / "kd"), "--save_steps", "-1", "--logging_steps", "1", "--eval_steps", "-1", "--zero_stage",
        "3", "--max_epochs", "1", "--bf16", "--kd_coef", "0.4", "--learning_rate", "5e-6", "--teacher_offload",
        "--gradient_checkpointing", "--ckpt_path", str(tmp_path / "ckpt")])
    assert (tmp_path / "kd" / "model.safetensors").exists()


def safetensors_keys(folder: Path) -> list[str]:
    keys: list[str] = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            keys += st.keys()
    return sorted(keys)


def prm_flags(assets, ckpt: Path, out: Path) -> list[str]:
    return ["--save_path", str(out), "--save_steps", "500", "--logging_steps", "1", "--eval_steps", "100",
            "--train_batch_size", TRAIN_BATCH, "--micro_train_batch_size", "8", "--pretrain", str(assets["tied"]),
            "--bf16", "--max_epochs", "1", "--max_len", "8192", "--zero_stage", "3", "--learning_rate", "1e-6",
            "--dataset", str(assets["prm"]), "--input_key", "input", "--label_key", "value", "--load_checkpoint",
            "--gradient_checkpointing", "--packing_samples", "--wandb_group", "prm", "--placeholder_token",
            PLACEHOLDER, "--reward_tokens", "+", "-", "--ckpt_path", str(ckpt),
            "--save_steps", "1", "--learning_rate", "5e-3", "--save_hf_ckpt"]  # appended: see the module's doc


def test_train_prm_mistral_sh_resumes_bitwise_and_writes_tied_weights_once(assets, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from openrl_ckpt.cli import ckpt
    from openrl_ckpt.cli.entry import run as run_cli

    script_run("openrl_ckpt.cli.train_prm", prm_flags(assets, tmp_path / "ckpt", tmp_path / "out"))
    assert committed(tmp_path / "ckpt") == ["global_step1", "global_step2", "global_step3"]
    final = weights(tmp_path / "out")
    start = weights(assets["tied"])
    assert any(not (final[k].float() == start[k].float()).all() for k in start), "training changed nothing"

    # resume: a fresh folder holding only step 1's checkpoint, the same command -> the same weights, bitwise
    (tmp_path / "ckpt2").mkdir()
    shutil.copytree(tmp_path / "ckpt" / "global_step1", tmp_path / "ckpt2" / "global_step1")
    res = run(launch_cmd("openrl_ckpt.cli.train_prm", prm_flags(assets, tmp_path / "ckpt2", tmp_path / "out2")))
    assert res.returncode == 0, res.output[-4000:]
    assert "global_step1" in res.output and "resum" in res.output.lower()
    assert_bitwise_equal(weights(tmp_path / "out2"), final)

    # tied embeddings: one copy everywhere, as save_pretrained writes the model
    try:
        run_cli(ckpt.main, ["export", str(tmp_path / "ckpt"), "--output", str(tmp_path / "exported")])
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    AutoModelForCausalLM.from_pretrained(tmp_path / "out").save_pretrained(tmp_path / "resaved")
    expected = safetensors_keys(tmp_path / "resaved")
    assert "lm_head.weight" not in expected
    for folder in (tmp_path / "out", tmp_path / "exported", tmp_path / "ckpt" / "global_step3" / "hf" / "model"):
        assert safetensors_keys(folder) == expected, folder
    assert_bitwise_equal(weights(tmp_path / "exported"), final)
