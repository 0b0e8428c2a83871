"""`python -m openrl_ckpt.cli.ckpt` and `lora_combiner` in-process: checkpoints built by the manager itself
(no process group, fake engine files), every subcommand on good and damaged input, prune's rules, the
PEFT adapter layout and LoRA merge equivalence on the tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from openrl_ckpt.checkpoint.comm import SingleProcessComm
from openrl_ckpt.checkpoint.contents import BytesFile, CheckpointContents
from openrl_ckpt.checkpoint.files import MANIFEST
from openrl_ckpt.checkpoint.inspect import BEST_KEY, EVAL_KEY, HF_DIR, best_checkpoint
from openrl_ckpt.checkpoint.manager import CheckpointManager
from openrl_ckpt.checkpoint.state import STATE_FILE, TrainState
from openrl_ckpt.cli import ckpt, lora_combiner
from openrl_ckpt.cli.entry import run


def state(step: int) -> TrainState:
    return TrainState(algorithm="sft", global_batch_size=8, world_size=1, model_fingerprint="abc",
                      global_step=step, consumed_samples=8 * step, epoch=step // 10)


def engine_writer(payload: int = 1000) -> CheckpointContents:
    return CheckpointContents([
        BytesFile("model/mp_rank_00_model_states.pt", os.urandom(payload)),
        BytesFile("model/zero_pp_rank_0_mp_rank_00_optim_states.pt", os.urandom(2 * payload)),
        BytesFile(f"{HF_DIR}/model/config.json", b"{}"),
    ])


def make_ckpt(tmp_path: Path, steps=(5, 10, 15), best: int | None = None, payload: int = 1000) -> Path:
    m = CheckpointManager(str(tmp_path / "ckpt"), SingleProcessComm(), max_ckpt_num=100, max_ckpt_mem_gb=100)
    m.prepare()
    for s in steps:
        meta = {"epoch": s // 10, "consumed_samples": 8 * s, "pretrain": "/nowhere"}
        if best is not None:  # evaluated at every step: the best has the lowest eval_loss
            meta[EVAL_KEY] = {"eval_loss": 1.0 if s == best else 2.0 + s}
            meta[BEST_KEY] = {"step": min(s, best), "metric": "eval_loss", "mode": "min"}
        m.save(state(s), engine_writer(payload), meta)
    return m.root


def cli(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a CLI main as `python -m` would: (exit code, stdout, stderr)."""
    try:
        run(main, argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def damage(folder: Path, how: str) -> str:
    """Damage one checkpoint folder; returns the file name the error must mention."""
    victim = folder / "model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if how == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    elif how == "truncate":
        victim.write_bytes(victim.read_bytes()[:10])
    elif how == "missing":
        victim.unlink()
    elif how == "no_manifest":
        (folder / MANIFEST).unlink()
        return MANIFEST
    return "model/zero_pp_rank_0_mp_rank_00_optim_states.pt"


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------- list
def test_list_shows_every_committed_checkpoint(tmp_path, capsys):
    root = make_ckpt(tmp_path)
    code, out, err = cli(ckpt.main, ["list", str(root)], capsys)
    assert code == 0, err
    rows = out.splitlines()
    assert rows[0].split()[:4] == ["step", "epoch", "samples", "size"]
    assert [r.split()[0] for r in rows[1:]] == ["5", "10", "15"]
    assert rows[2].split()[1:3] == ["1", "80"] and rows[2].rstrip().endswith("valid")

    code, out, _ = cli(ckpt.main, ["list", str(root), "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and [c["step"] for c in doc["checkpoints"]] == [5, 10, 15]
    c = doc["checkpoints"][-1]
    assert c["valid"] and c["consumed_samples"] == 120 and c["engines"] == ["model"] and c["size_bytes"] > 3000
    assert not c["best"] and not c["hf_copy"]


def test_list_marks_the_best_checkpoint(tmp_path, capsys):
    root = make_ckpt(tmp_path, best=10)
    code, out, _ = cli(ckpt.main, ["list", str(root)], capsys)
    assert code == 0
    marked = [r.split()[0] for r in out.splitlines() if "[best]" in r]
    assert marked == ["10"]


def test_best_checkpoint_by_mode(tmp_path):
    root = make_ckpt(tmp_path, best=10)  # eval_loss: 7 at step 5, 1 at 10, 17 at 15
    assert best_checkpoint(root, "eval_loss", "min") == (10, 1.0)
    assert best_checkpoint(root, "eval_loss", "max") == (15, 17.0)
    assert best_checkpoint(root, "eval_acc", "max") is None


@pytest.mark.parametrize("how", ["flip", "truncate", "missing", "no_manifest"])
def test_list_and_verify_name_the_damage(tmp_path, capsys, how):
    root = make_ckpt(tmp_path)
    name = damage(root / "global_step10", how)

    code, out, err = cli(ckpt.main, ["list", str(root)], capsys)
    if how == "no_manifest":  # not committed any more: listed apart, as resume would ignore it
        assert code == 0 and "global_step10: no manifest.json" in out
        assert [r.split()[0] for r in out.splitlines()[1:3]] == ["5", "15"]
    else:
        assert code == 1 and "DAMAGED" in out
        assert name in one_error_line(err) and "global_step10" in err

    code, out, err = cli(ckpt.main, ["verify", str(root), "--step", "10"], capsys)
    assert code != 0 and name in one_error_line(err)
    if how != "no_manifest":
        assert {"flip": "crc32 mismatch", "truncate": "size 10 != 2000", "missing": "missing"}[how] in out + err

    code, out, err = cli(ckpt.main, ["verify", str(root)], capsys)  # every committed checkpoint
    if how == "no_manifest":
        assert code == 0 and "global_step10" not in out
    else:
        assert code == 1 and "global_step5: ok" in out and "global_step15: ok" in out
        assert "1 of 3 checkpoint(s) damaged" in one_error_line(err)


def test_verify_good(tmp_path, capsys):
    root = make_ckpt(tmp_path)
    code, out, err = cli(ckpt.main, ["verify", str(root)], capsys)
    assert code == 0 and err == "" and out.count(": ok") == 3
    code, out, _ = cli(ckpt.main, ["verify", str(root / "global_step15")], capsys)  # a step folder works too
    assert code == 0 and out.startswith("global_step15: ok")


def test_a_damaged_train_state_is_damage(tmp_path, capsys):
    root = make_ckpt(tmp_path, steps=(5,))
    (root / "global_step5" / STATE_FILE).write_text("{}" + " " * 10)
    code, _, err = cli(ckpt.main, ["verify", str(root)], capsys)
    assert code == 1 and STATE_FILE in one_error_line(err)


@pytest.mark.parametrize("sub", [["list"], ["verify"], ["prune", "--max_ckpt_num", "1", "--max_ckpt_mem", "1"],
                                 ["export", "--output", "OUT"]])
def test_not_a_checkpoint_folder(tmp_path, capsys, sub):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("mine")
    argv = [sub[0], str(empty), *[a.replace("OUT", str(tmp_path / "out")) for a in sub[1:]]]
    code, _, err = cli(ckpt.main, argv, capsys)
    assert code == 2 and "not a checkpoint folder" in one_error_line(err)
    code, _, err = cli(ckpt.main, [sub[0], str(tmp_path / "nope"), *argv[2:]], capsys)
    assert code == 2 and "no such directory" in one_error_line(err)
    assert os.listdir(empty) == ["notes.txt"] and not (tmp_path / "out").exists()


def test_unknown_step(tmp_path, capsys):
    root = make_ckpt(tmp_path)
    code, _, err = cli(ckpt.main, ["verify", str(root), "--step", "7"], capsys)
    assert code == 2 and "committed steps: 15, 10, 5" in one_error_line(err)


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("how", ["flip", "truncate", "missing", "no_manifest"])
def test_export_refuses_a_damaged_checkpoint(tmp_path, capsys, how):
    root = make_ckpt(tmp_path)
    name = damage(root / "global_step15", how)
    out = tmp_path / "out"
    code, _, err = cli(ckpt.main, ["export", str(root), "--output", str(out)], capsys)
    line = one_error_line(err)
    assert code != 0 and not out.exists()
    if how == "no_manifest":  # the newest committed one is now step 10, which is intact but fake
        assert "global_step10" in line
    else:
        assert name in line and "damaged" in line


def test_export_never_overwrites(tmp_path, capsys):
    root = make_ckpt(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, _, err = cli(ckpt.main, ["export", str(root), "--output", str(out)], capsys)
    assert code == 2 and "already exists" in one_error_line(err) and (out / "mine.txt").read_text() == "keep"


def test_export_of_fake_engine_files_is_one_error_line(tmp_path, capsys):
    root = make_ckpt(tmp_path)  # valid manifest, but the engine files are random bytes
    code, _, err = cli(ckpt.main, ["export", str(root), "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and "unreadable DeepSpeed model states" in one_error_line(err)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_export_picks_an_engine(tmp_path, capsys):
    root = make_ckpt(tmp_path, steps=(5,))
    code, _, err = cli(ckpt.main, ["export", str(root), "--model", "critic", "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "--model critic: " in one_error_line(err) and "holds model" in err


# ---------------------------------------------------------------------------------------------- convert
def test_convert_errors(tmp_path, capsys):
    root = make_ckpt(tmp_path, steps=(5, 10))
    damage(root / "global_step10", "flip")
    out = tmp_path / "uni"
    code, _, err = cli(ckpt.main, ["convert", str(root), "--to", "universal", "--output", str(out)], capsys)
    assert code == 1 and "crc32 mismatch" in one_error_line(err) and not out.exists()
    code, _, err = cli(ckpt.main, ["convert", str(root), "--to", "universal", "--step", "5", "--output", str(out)],
                       capsys)  # intact manifest, fake engine files
    assert code == 2 and "DeepSpeed cannot convert it" in one_error_line(err) and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".uni")]
    code, _, err = cli(ckpt.main, ["convert", str(root), "--to", "zero3", "--output", str(out)], capsys)
    assert code == 2 and "invalid choice" in err


# ---------------------------------------------------------------------------------------------- prune
def steps_on_disk(root: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("global_step")) for p in root.iterdir() if p.name.startswith("global_step"))


def test_prune_by_count_keeps_the_newest_and_foreign_folders(tmp_path, capsys):
    root = make_ckpt(tmp_path, steps=(5, 10, 15, 20))
    (root / "my_notes").mkdir()
    (root / "global_step99").mkdir()  # uncommitted: not a candidate
    code, out, _ = cli(ckpt.main, ["prune", str(root), "--max_ckpt_num", "2", "--max_ckpt_mem", "100", "--dry_run"],
                       capsys)
    assert code == 0 and "would delete global_step5" in out and steps_on_disk(root) == [5, 10, 15, 20, 99]
    code, out, _ = cli(ckpt.main, ["prune", str(root), "--max_ckpt_num", "2", "--max_ckpt_mem", "100"], capsys)
    assert code == 0 and "deleted global_step5" in out and "deleted global_step10" in out
    assert steps_on_disk(root) == [15, 20, 99] and (root / "my_notes").is_dir()
    assert not [p for p in root.iterdir() if p.name.startswith(".del-")], "un-committed by rename, then deleted"


def test_prune_by_size_never_deletes_the_newest(tmp_path, capsys):
    root = make_ckpt(tmp_path, steps=(5, 10, 15), payload=100_000)
    one = json.loads((root / "global_step5" / MANIFEST).read_text())["total_bytes"]
    gb = 2.5 * one / 1e9  # room for two
    code, _, _ = cli(ckpt.main, ["prune", str(root), "--max_ckpt_num", "9", "--max_ckpt_mem", str(gb)], capsys)
    assert code == 0 and steps_on_disk(root) == [10, 15]
    code, _, _ = cli(ckpt.main, ["prune", str(root), "--max_ckpt_num", "1", "--max_ckpt_mem", "1e-12"], capsys)
    assert code == 0 and steps_on_disk(root) == [15]


def test_prune_keeps_the_best(tmp_path, capsys):
    root = make_ckpt(tmp_path, steps=(5, 10, 15, 20), best=5)
    code, out, _ = cli(ckpt.main, ["prune", str(root), "--max_ckpt_num", "2", "--max_ckpt_mem", "100"], capsys)
    assert code == 0 and "best checkpoint" in out
    assert steps_on_disk(root) == [5, 20]


def test_prune_keeps_the_newest_valid_when_newer_ones_are_damaged(tmp_path, capsys):
    root = make_ckpt(tmp_path, steps=(5, 10, 15))
    damage(root / "global_step15", "flip")
    code, out, _ = cli(ckpt.main, ["prune", str(root), "--max_ckpt_num", "1", "--max_ckpt_mem", "100"], capsys)
    assert code == 0 and "global_step15 is damaged" in out and "global_step10 is the newest valid" in out
    assert steps_on_disk(root) == [10, 15]


def test_prune_bad_limits(tmp_path, capsys):
    root = make_ckpt(tmp_path, steps=(5,))
    code, _, err = cli(ckpt.main, ["prune", str(root), "--max_ckpt_num", "0", "--max_ckpt_mem", "1"], capsys)
    assert code == 2 and "--max_ckpt_num" in one_error_line(err) and steps_on_disk(root) == [5]


# ---------------------------------------------------------------------------------------------- LoRA
def lora_model(pretrain: str, rank: int = 4, seed: int = 0, rm: bool = False):
    """A LoRA model whose adapters are not the identity (B is zero at init), as after some training."""
    from openrl_ckpt.models.actor import ModelConfig, apply_lora, load_causal_lm

    cfg = ModelConfig(pretrain=pretrain, lora_rank=rank, lora_alpha=8)
    if rm:
        from openrl_ckpt.models.reward import load_reward_model

        model = apply_lora(load_reward_model(ModelConfig(pretrain=pretrain), "score", require_head=False), cfg,
                           causal_lm=False, modules_to_save=["score"])
    else:
        model = load_causal_lm(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("rm", [False, True], ids=["causal_lm", "reward_model"])
def test_adapter_names_are_peft_own(tiny_model_dir, rm):
    from peft import get_peft_model_state_dict

    from openrl_ckpt.models.export import peft_adapter_state_dict

    model = lora_model(tiny_model_dir, rm=rm)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    ours, peft = peft_adapter_state_dict(trainable), get_peft_model_state_dict(model)
    assert ours.keys() == peft.keys() and all(torch.equal(ours[k], peft[k]) for k in ours)
    assert any("score" in k for k in ours) == rm


def test_lora_trains_only_adapters(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # tiny Llama, rank 4, all-linear: 7 projections x 2 layers x (A, B); embeddings and lm_head stay frozen
    assert len(trainable) == 28 and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 8192


@pytest.mark.parametrize("rm", [False, True], ids=["causal_lm", "reward_model"])
def test_adapter_save_load_and_merge_equivalence(tiny_model_dir, tmp_path, capsys, rm):
    """save_pretrained -> PEFT loads it on the base; lora_combiner's merged model gives the same outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = lora_model(tiny_model_dir, rm=rm)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    x = torch.randint(5, 400, (3, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    with torch.no_grad():
        want = model(input_ids=x, attention_mask=mask)
    merged_dir = tmp_path / "merged"
    argv = ["--base", tiny_model_dir, "--lora", str(adapter), "--output", str(merged_dir)] + (["--is_rm"] if rm else [])
    code, _, err = cli(lora_combiner.main, argv, capsys)
    assert code == 0, err
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "tokenizer_config.json").exists()
    if rm:
        from openrl_ckpt.models.actor import ModelConfig
        from openrl_ckpt.models.reward import load_reward_model

        merged = load_reward_model(ModelConfig(pretrain=str(merged_dir))).eval()
        base = load_reward_model(ModelConfig(pretrain=tiny_model_dir), "score", require_head=False)
    else:
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        plain = base.eval()(input_ids=x, attention_mask=mask)
        reloaded = PeftModel.from_pretrained(base, adapter).eval()  # injects the adapter into base
        got, again = merged(input_ids=x, attention_mask=mask), reloaded(input_ids=x, attention_mask=mask)
    if not rm:
        want, got, again, plain = want.logits, got.logits, again.logits, plain.logits
    assert torch.equal(want, again), "the adapter folder reloads exactly"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (plain - want).abs().max() > 1e-2, "the adapter changes the outputs (the test would be vacuous otherwise)"


@pytest.mark.parametrize("rm", [False, True], ids=["causal_lm", "reward_model"])
def test_hf_files_without_weights(tiny_model_dir, tiny_tokenizer_dir, tmp_path, rm):
    """What every checkpoint records in hf/<engine>/: the adapter folder minus its weights."""
    from transformers import AutoTokenizer

    from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy, StrategyConfig
    from openrl_ckpt.strategy.hf import full_state_dict, write_hf

    model, tok = lora_model(tiny_model_dir, rm=rm), AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    s = DeepspeedStrategy(StrategyConfig(zero_stage=2))
    write_hf(model, tok, tmp_path / "meta", None)
    write_hf(model, tok, tmp_path / "full", full_state_dict(s, model))
    meta = sorted(p.name for p in (tmp_path / "meta").iterdir())
    full = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert full == sorted(meta + ["adapter_model.safetensors"]) and "tokenizer.json" in meta
    for name in meta:
        assert (tmp_path / "meta" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    assert json.loads((tmp_path / "meta" / "adapter_config.json").read_text())["modules_to_save"] == (
        ["score"] if rm else None)


def test_lora_combiner_bad_input(tiny_model_dir, tmp_path, capsys):
    code, _, err = cli(lora_combiner.main, ["--base", tiny_model_dir, "--lora", str(tmp_path / "nope"), "--output",
                                            str(tmp_path / "m")], capsys)
    assert code == 2 and "--lora" in one_error_line(err)
    (tmp_path / "empty").mkdir()
    code, _, err = cli(lora_combiner.main, ["--base", tiny_model_dir, "--lora", str(tmp_path / "empty"), "--output",
                                            str(tmp_path / "m")], capsys)
    assert code == 2 and "not a PEFT adapter folder" in one_error_line(err) and not (tmp_path / "m").exists()


def test_qlora_errors_are_one_line(tiny_model_dir):
    from openrl_ckpt.errors import UserError
    from openrl_ckpt.models.actor import ModelConfig, load_causal_lm

    with pytest.raises(UserError, match="set --lora_rank > 0"):
        load_causal_lm(ModelConfig(pretrain=tiny_model_dir, load_in_4bit=True))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs bitsandbytes CUDA kernels and this machine has no GPU"):
            load_causal_lm(ModelConfig(pretrain=tiny_model_dir, load_in_4bit=True, lora_rank=4))


def test_tied_embeddings_are_written_once_as_save_pretrained_does(tiny_tokenizer_dir, tmp_path):
    """--save_path (write_hf on gathered weights) and ckpt export (write_full_model) write a tied model's
    keys as its own save_pretrained does: the embedding once, no lm_head.weight copy."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrl_ckpt.models.export import write_full_model
    from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy, StrategyConfig
    from openrl_ckpt.strategy.hf import full_state_dict, write_hf
    from openrl_ckpt.utils.tiny import build_tiny_model

    tied = build_tiny_model(str(tmp_path / "tied"), tiny_tokenizer_dir, tie_word_embeddings=True)
    model, tok = AutoModelForCausalLM.from_pretrained(tied), AutoTokenizer.from_pretrained(tied)
    reference = load_file(str(tmp_path / "tied" / "model.safetensors"))
    assert "lm_head.weight" not in reference and "model.embed_tokens.weight" in reference
    gathered = full_state_dict(DeepspeedStrategy(StrategyConfig(zero_stage=2)), model)
    assert "lm_head.weight" in gathered  # cloned: the copies no longer share memory
    write_hf(model, tok, tmp_path / "save_path", gathered)
    write_full_model(dict(gathered), tmp_path / "save_path", tmp_path / "export", torch.float32, torch.float32)
    for folder in ("save_path", "export"):
        written = load_file(str(tmp_path / folder / "model.safetensors"))
        assert sorted(written) == sorted(reference), folder
        assert all(torch.equal(written[k], reference[k]) for k in reference), folder
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
