"""batch_inference end to end. generate: 2 ranks under ZeRO-3 with an uneven share of micro batches
(one rank runs a dummy batch) write every selected prompt exactly best_of_n times, in order, and the
very same file as one process without ZeRO. rm: rewards match the reward model run here, and each
post-processor picks what it should. Bad inputs are one-line errors with their exit status. And
generate() on a ZeRO-3 training engine (the PPO use) samples what one process samples.

Runs of 2 ranks are real ``deepspeed`` launches; one-process runs are ``python -m`` forked from this
process (forked.py: the same run, without paying the imports each time)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from forked import run_module
from launch import DATA, launch_cmd, run

pytestmark = pytest.mark.slow

MODULE = "openrl_ckpt.cli.batch_inference"
TEMPLATE = "User: {}\nAssistant: "


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    """The same randomly initialised reward model twice: raw, and with a stored mean 0.05 and std 0.02."""
    from openrl_ckpt.utils.tiny import build_reward_model

    out = tmp_path_factory.mktemp("reward_models")
    return {"raw": build_reward_model(str(out / "raw"), tiny_model_dir, seed=1),
            "normalized": build_reward_model(str(out / "normalized"), tiny_model_dir, seed=1, mean=0.05, std=0.02)}


def test_generate_on_two_ranks_zero3_gives_the_file_contract_and_the_one_process_file(tmp_path, tiny_model_dir):
    # rows [5, 10) of the prompts; 5 prompts x 3 answers = 15 items in 5 micro batches of 3: rank 0 runs
    # batches 0, 2 and 4, rank 1 batches 1 and 3, then a dummy one (ZeRO-3 forwards are collective)
    common = ["--eval_task", "generate", "--pretrain", tiny_model_dir, "--dataset", str(DATA / "prompts.jsonl"),
              "--input_key", "prompt", "--input_template", TEMPLATE, "--best_of_n", "3", "--iter", "1",
              "--rollout_batch_size", "5", "--max_new_tokens", "10", "--micro_batch_size", "3", "--seed", "7"]
    two = run(launch_cmd(MODULE, [*common, "--zero_stage", "3",
                                  "--output_path", str(tmp_path / "two.jsonl")]))
    assert two.returncode == 0, two.output[-3000:]
    assert "5 micro batches of 3 over 2 rank(s)" in two.output
    rows = read_jsonl(tmp_path / "two.jsonl")
    prompts = [json.loads(line)["prompt"] for line in (DATA / "prompts.jsonl").read_text().splitlines()[5:10]]
    # every selected prompt exactly best_of_n times, prompt after prompt, in dataset order
    assert [r["input"] for r in rows] == [TEMPLATE.format(p) for p in prompts for _ in range(3)]
    assert all(isinstance(r["output"], str) and set(r) == {"input", "output"} for r in rows)
    assert all(len({r["output"] for r in rows[i:i + 3]}) > 1 for i in range(0, 15, 3))  # sampled, not copied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.jsonl"]  # no temp or shard files left

    # the same seed in one process without ZeRO: the same micro batches with the same seeds, the same file
    one = run_module(MODULE, [*common, "--output_path", str(tmp_path / "one.jsonl")])
    assert one.returncode == 0, one.output[-3000:]
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> Path:
    """15 {"input", "output"} rows: 4 inputs with 3 different answers, one input with a single answer,
    one with the same answer twice (no preference)."""
    sft = [json.loads(line) for line in (DATA / "sft.jsonl").read_text().splitlines()[:20]]
    rows = []
    for i in range(4):
        rows += [{"input": TEMPLATE.format(sft[i]["question"]), "output": sft[4 + 3 * i + k]["response"]}
                 for k in range(3)]
    rows.append({"input": TEMPLATE.format(sft[16]["question"]), "output": sft[16]["response"]})
    rows += [{"input": TEMPLATE.format(sft[17]["question"]), "output": sft[17]["response"]}] * 2
    path = tmp_path_factory.mktemp("answers") / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def expected_rewards(model_dir: str, rows: list[dict]) -> list[float]:
    """Each row scored alone by the reward model here: input + output + EOS, reward at the last token."""
    from openrl_ckpt.models.actor import ModelConfig, load_tokenizer
    from openrl_ckpt.models.reward import load_reward_model

    model, tok = load_reward_model(ModelConfig(pretrain=model_dir), "score").eval(), load_tokenizer(model_dir)
    model.config.normalize_reward = False
    out = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([tok(r["input"] + r["output"])["input_ids"] + [tok.eos_token_id]])
            out.append(model(ids, torch.ones_like(ids)).item())
    return out


def test_rm_scores_and_each_post_processor(tmp_path, reward_models, answers):
    rows = read_jsonl(answers)
    raw = expected_rewards(reward_models["raw"], rows)

    def args(model: str, out: str, *extra: str) -> list[str]:
        return ["--eval_task", "rm", "--pretrain", model, "--dataset", str(answers), "--micro_batch_size", "3",
                "--output_path", str(tmp_path / out), *extra]

    # rs on 2 ranks under ZeRO-3: 15 rows in 5 micro batches, so rank 1 runs a dummy forward
    rs = run(launch_cmd(MODULE, args(reward_models["raw"], "rs.jsonl", "--post_processor", "rs", "--zero_stage", "3")))
    assert rs.returncode == 0, rs.output[-3000:]
    mean, std = (float(x) for x in re.search(r"rewards of 15 rows: mean (\S+), std (\S+)", rs.output).groups())
    assert mean == pytest.approx(sum(raw) / 15, abs=1e-4)
    assert std == pytest.approx(torch.tensor(raw).std(unbiased=False).item(), abs=1e-4)
    best = read_jsonl(tmp_path / "rs.jsonl")
    groups = [range(0, 3), range(3, 6), range(6, 9), range(9, 12), range(12, 13), range(13, 15)]
    picks = [max(g, key=lambda i: raw[i]) for g in groups]  # max() keeps the first of equal rewards
    assert [(b["input"], b["output"]) for b in best] == [(rows[i]["input"], rows[i]["output"]) for i in picks]
    assert [b["reward"] for b in best] == pytest.approx([raw[i] for i in picks], abs=1e-5)

    # ca (csft) in one process: every row, its reward written into the input by the template
    ca = run_module(MODULE, args(reward_models["raw"], "ca.jsonl", "--post_processor", "csft",
                                 "--reward_template", "{input}[score {reward:.3f}] "))
    assert ca.returncode == 0, ca.output[-3000:]
    conditioned = read_jsonl(tmp_path / "ca.jsonl")
    assert [c["reward"] for c in conditioned] == pytest.approx(raw, abs=1e-5)
    assert [c["input"] for c in conditioned] == [f"{r['input']}[score {c['reward']:.3f}] "
                                                  for r, c in zip(rows, conditioned)]
    assert [c["output"] for c in conditioned] == [r["output"] for r in rows]

    # iter_dpo with the model's stored mean/std applied: best against worst, two inputs dropped
    dpo = run_module(MODULE, args(reward_models["normalized"], "pairs.jsonl", "--post_processor", "iter_dpo",
                                  "--normalize_reward"))
    assert dpo.returncode == 0, dpo.output[-3000:]
    assert "4 pairs; dropped 1 inputs with a single output and 1 whose outputs are all the same" in dpo.output
    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    worst = [min(g, key=lambda i: raw[i]) for g in groups[:4]]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        (rows[b]["input"], rows[b]["output"], rows[w]["output"]) for b, w in zip(picks, worst)]
    normalized = [(r - 0.05) / 0.02 for r in raw]
    assert [p["chosen_reward"] for p in pairs] == pytest.approx([normalized[i] for i in picks[:4]], abs=1e-3)
    assert [p["rejected_reward"] for p in pairs] == pytest.approx([normalized[i] for i in worst], abs=1e-3)


def one_error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    return errors[0]


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_model_dir, reward_models, answers):
    out = tmp_path / "out.jsonl"
    rm = ["--eval_task", "rm", "--output_path", str(out)]

    # --iter past the end of the data: its own exit status, which the loop scripts stop on
    past = run_module(MODULE, ["--eval_task", "generate", "--pretrain", tiny_model_dir, "--dataset",
                               str(DATA / "prompts.jsonl"), "--input_key", "prompt", "--iter", "4",
                               "--rollout_batch_size", "50", "--output_path", str(out)])
    assert past.returncode == 3
    assert "--iter 4 is past the end of the data: it starts at row 200" in one_error_line(past.output)

    # a causal LM is not a reward model
    no_head = run_module(MODULE, [*rm, "--pretrain", tiny_model_dir, "--dataset", str(answers)])
    assert no_head.returncode == 2
    assert "holds no reward head (no 'score.weight')" in one_error_line(no_head.output)

    # answers without their "output"
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"input": "a", "response": "b"}) + "\n")
    missing = run_module(MODULE, [*rm, "--pretrain", reward_models["raw"], "--dataset", str(bare)])
    assert missing.returncode == 2
    assert "no column 'output' (--output_key); columns: input, response" in one_error_line(missing.output)

    # iter_dpo needs several answers per input: refused before anything is loaded
    single = run_module(MODULE, [*rm, "--pretrain", reward_models["raw"], "--dataset", str(answers),
                                 "--post_processor", "iter_dpo", "--best_of_n", "1"])
    assert single.returncode == 2
    assert "iter_dpo compares several answers per input: --best_of_n 1" in one_error_line(single.output)
    assert not out.exists()


ENGINE_SCRIPT = '''
import json, sys
from openrl_ckpt.inference.generation import SamplingConfig, generate
from openrl_ckpt.models.actor import ModelConfig, load_causal_lm, load_tokenizer
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy, OptimConfig, StrategyConfig

model_dir, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
strategy = DeepspeedStrategy(StrategyConfig(zero_stage=3, micro_train_batch_size=1, train_batch_size=2))
strategy.setup_distributed()
strategy.before_model_load()
engine = strategy.prepare(load_causal_lm(ModelConfig(pretrain=model_dir, gradient_checkpointing=True)),
                          OptimConfig(learning_rate=1e-3), total_steps=4)
engine.train()
tok = load_tokenizer(model_dir, padding_side="left")
texts, new_tokens = PROMPTS[strategy.rank], NEW_TOKENS[strategy.rank]
batch = tok(texts, return_tensors="pt", padding=True)
result = generate(engine, batch["input_ids"], batch["attention_mask"], SamplingConfig(max_new_tokens=new_tokens),
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, zero_stage=3, seed=100 + strategy.rank)
assert engine.module.training
seq = result.sequences[:1]
engine.backward(engine(input_ids=seq, labels=seq).loss)  # the engine trains on after generating
engine.step()
with open(f"{out}.{strategy.rank}", "w") as f:
    json.dump(result.sequences.tolist(), f)
'''
PROMPTS = [["User: hi\nAssistant: ", "Sort 3, 1, 2 please", "What is 2+2?"], ["Name a colour."]]
NEW_TOKENS = [5, 9]


def test_generate_on_a_zero3_training_engine_with_uneven_ranks_gives_the_one_process_samples(tmp_path, tiny_model_dir):
    """The PPO use: generate() on a ZeRO-3 training engine (activation checkpointing, train mode), rank 0
    with 3 prompts and 5 new tokens, rank 1 with 1 prompt and 9; each rank's samples are those of a
    plain model in one process with the same seed, and the engine still trains afterwards."""
    from launch import DEEPSPEED, free_port

    from openrl_ckpt.inference.generation import SamplingConfig, generate
    from openrl_ckpt.models.actor import ModelConfig, load_causal_lm, load_tokenizer

    script = tmp_path / "engine_generate.py"
    script.write_text(f"PROMPTS = {PROMPTS!r}\nNEW_TOKENS = {NEW_TOKENS!r}\n{ENGINE_SCRIPT}")
    res = run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(script), tiny_model_dir,
               str(tmp_path / "out")])
    assert res.returncode == 0, res.output[-3000:]
    model = load_causal_lm(ModelConfig(pretrain=tiny_model_dir))
    tok = load_tokenizer(tiny_model_dir, padding_side="left")
    for rank in (0, 1):
        batch = tok(PROMPTS[rank], return_tensors="pt", padding=True)
        alone = generate(model, batch["input_ids"], batch["attention_mask"],
                         SamplingConfig(max_new_tokens=NEW_TOKENS[rank]), eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, seed=100 + rank)
        assert json.loads((tmp_path / f"out.{rank}").read_text()) == alone.sequences.tolist()
