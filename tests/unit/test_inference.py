"""Batch inference pieces without a process group: row selection by --iter, micro batches over ranks,
the ordered merge, the post-processors, atomic output files, and the generation function on a tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from openrl_ckpt.errors import UserError
from openrl_ckpt.inference import batching, postprocess
from openrl_ckpt.inference.output import check_output_path, write_jsonl_atomic

# ---------------------------------------------------------------------------- --iter


def test_select_rows_slices_and_stops_past_the_end_with_its_own_exit_status():
    assert batching.select_rows(10, None, None) == range(10)
    assert batching.select_rows(10, 0, 4) == range(0, 4)
    assert batching.select_rows(10, 2, 4) == range(8, 10)  # the last slice is shorter
    with pytest.raises(UserError, match=r"--iter 3 is past the end .* row 12 .* has 10 rows") as e:
        batching.select_rows(10, 3, 4)
    assert e.value.exit_code == batching.EXIT_DATA_EXHAUSTED == 3
    with pytest.raises(UserError, match="needs --rollout_batch_size") as e:
        batching.select_rows(10, 0, None)
    assert e.value.exit_code == 2
    with pytest.raises(UserError, match="--iter must be 0 or more"):
        batching.select_rows(10, -1, 4)


# ---------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("n_items,micro,world", [(15, 3, 2), (15, 4, 2), (1, 8, 4), (7, 1, 3), (16, 4, 4), (5, 2, 8)])
def test_every_item_is_done_exactly_once_and_calls_match_across_ranks(n_items, micro, world):
    n = batching.num_batches(n_items, micro)
    done = []
    for rank in range(world):
        mine = batching.rank_batches(n, world, rank)
        assert len(mine) <= batching.calls_per_rank(n, world)  # the rest of a rank's calls are dummies
        done += [item for b in mine for item in batching.batch_items(b, n_items, micro)]
    assert sorted(done) == list(range(n_items))
    assert max(len(batching.rank_batches(n, world, r)) for r in range(world)) == batching.calls_per_rank(n, world)


def test_batches_and_their_seeds_do_not_depend_on_the_number_of_ranks():
    # batch b holds the same items and gets the same seed whichever rank runs it
    one = {b: (list(batching.batch_items(b, 15, 4)), batching.batch_seed(7, 0, b))
           for b in batching.rank_batches(4, 1, 0)}
    two = {b: (list(batching.batch_items(b, 15, 4)), batching.batch_seed(7, 0, b))
           for r in (0, 1) for b in batching.rank_batches(4, 2, r)}
    assert one == two
    seeds = {batching.batch_seed(s, it, b) for s in (1, 2) for it in (0, 1) for b in range(50)}
    assert len(seeds) == 200 and all(0 <= x < 2**63 for x in seeds)


def test_merge_puts_every_ranks_items_in_order_and_refuses_gaps_or_repeats():
    rank0, rank1 = [(0, "a"), (1, "b"), (4, "e")], [(2, "c"), (3, "d")]
    assert batching.merge_ordered([rank1, rank0], 5) == ["a", "b", "c", "d", "e"]
    with pytest.raises(RuntimeError, match="twice"):
        batching.merge_ordered([rank0, [(1, "x")]], 5)
    with pytest.raises(RuntimeError, match="lost 2 of 5"):
        batching.merge_ordered([rank0], 5)


# ---------------------------------------------------------------------------- post-processors


def scored(*rows: tuple[str, str, float]) -> list[dict]:
    return [{"input": i, "output": o, "reward": r} for i, o, r in rows]


ROWS = scored(("p1", "a", 0.5), ("p2", "x", 1.0), ("p1", "b", 2.0), ("p1", "c", 2.0), ("p2", "y", -1.0),
              ("p3", "only", 0.0), ("p4", "s", 0.3), ("p4", "t", 0.3), ("p5", "same", 0.1), ("p5", "same", 0.1000001))


def test_rs_keeps_the_best_output_of_each_input_first_on_ties_inputs_in_file_order():
    assert postprocess.rejection_sampling(ROWS) == scored(("p1", "b", 2.0), ("p2", "x", 1.0), ("p3", "only", 0.0),
                                                          ("p4", "s", 0.3), ("p5", "same", 0.1000001))


def test_iter_dpo_pairs_max_against_min_and_counts_what_it_drops():
    pairs, stats = postprocess.iterative_dpo_pairs(ROWS)
    assert pairs == [
        {"prompt": "p1", "chosen": "b", "chosen_reward": 2.0, "rejected": "a", "rejected_reward": 0.5},
        {"prompt": "p2", "chosen": "x", "chosen_reward": 1.0, "rejected": "y", "rejected_reward": -1.0},
    ]
    # p4: equal rewards; p5: one answer twice (scored in two micro batches, the rewards differ in the last bits)
    assert stats == postprocess.PairStats(pairs=2, single_output=1, no_preference=2)


def test_ca_writes_the_reward_into_the_input_with_the_template():
    out = postprocess.conditional_sft(scored(("Q: hi", "A", 1.23456), ("Q: yo", "B", -2.0)))
    assert out == [{"input": "Q: hi <rm_score>: 1.23 ", "output": "A", "reward": 1.23456},
                   {"input": "Q: yo <rm_score>: -2.00 ", "output": "B", "reward": -2.0}]
    custom = postprocess.conditional_sft(scored(("{x}", "A", 2.0)), "[{reward:.1f}] {input}")
    assert custom[0]["input"] == "[2.0] {x}"  # braces in the data are data, not template fields


def test_ca_normalisation_standardises_over_the_file():
    out = postprocess.conditional_sft(scored(("a", "1", 1.0), ("b", "2", 3.0)), "{input}|{reward:.1f}", normalize=True)
    assert [r["input"] for r in out] == ["a|-1.0", "b|1.0"] and [r["reward"] for r in out] == [-1.0, 1.0]
    same = postprocess.conditional_sft(scored(("a", "1", 5.0), ("b", "2", 5.0)), "{input}|{reward:.1f}", normalize=True)
    assert [r["reward"] for r in same] == [0.0, 0.0]  # zero spread: centred, not divided by zero


@pytest.mark.parametrize("template,message", [("{input} only", "must contain"), ("{reward}", "must contain"),
                                              ("{input} {reward} {other}", "and no other fields"),
                                              ("{input} {reward:.2q}", "cannot be filled"),
                                              ("{input {reward}", "cannot be filled")])
def test_reward_template_errors(template, message):
    with pytest.raises(UserError, match=message):
        postprocess.check_reward_template(template)
    postprocess.check_reward_template(postprocess.DEFAULT_REWARD_TEMPLATE)


def test_mean_std_is_the_population_std():
    assert postprocess.mean_std([1.0, 3.0]) == (2.0, 1.0)


# ---------------------------------------------------------------------------- output files


def test_atomic_write_replaces_the_whole_file_or_leaves_the_old_one(tmp_path: Path):
    out = tmp_path / "sub" / "out.jsonl"
    check_output_path(str(out))  # makes the folder
    assert write_jsonl_atomic(str(out), [{"input": "é", "output": "x"}, {"input": "b", "output": "y"}]) == 2
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [
        {"input": "é", "output": "x"}, {"input": "b", "output": "y"}]
    before = out.read_bytes()

    def failing_rows():
        yield {"input": "new"}
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="cannot write the output .No space left on device"):
        write_jsonl_atomic(str(out), failing_rows())
    assert out.read_bytes() == before
    assert os.listdir(out.parent) == ["out.jsonl"]  # no temp file left behind


def test_output_path_checks_and_stale_temp_files(tmp_path: Path):
    with pytest.raises(UserError, match="is a directory"):
        check_output_path(str(tmp_path))
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="cannot write there"):
        check_output_path(str(tmp_path / "f" / "out.jsonl"))
    (tmp_path / ".out.jsonl.tmp-1234abcd").write_text("half a file from a killed run")
    (tmp_path / ".other.jsonl.tmp-1234abcd").write_text("another job's")
    check_output_path(str(tmp_path / "out.jsonl"))
    assert sorted(os.listdir(tmp_path)) == [".other.jsonl.tmp-1234abcd", "f"]


# ---------------------------------------------------------------------------- generation


def test_response_mask_ends_at_the_first_eos():
    from openrl_ckpt.inference.generation import response_mask

    mask, has_eos = response_mask(torch.tensor([[5, 2, 2, 0], [5, 6, 7, 8], [2, 9, 2, 9]]), eos_token_id=2)
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert has_eos == [True, False, True]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from openrl_ckpt.models.actor import ModelConfig, load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_model_dir, padding_side="left")
    batch = tok(["User: hello\nAssistant: ", "Sort 3, 1, 2"], return_tensors="pt", padding=True)
    return load_causal_lm(ModelConfig(pretrain=tiny_model_dir)), tok, batch


def test_generate_same_seed_same_samples_and_the_callers_rng_untouched(lm):
    from openrl_ckpt.inference.generation import SamplingConfig, generate

    model, tok, batch = lm
    model.train()

    def run(seed: int | None):
        return generate(model, batch["input_ids"], batch["attention_mask"],
                        SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=50),
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=seed)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(torch.get_rng_state(), state)  # seeded calls do not draw from the caller's stream
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    assert torch.equal(a.sequences[:, : a.prompt_len], batch["input_ids"])
    assert a.responses.shape == (2, 6) and model.training  # the caller's mode is back
    unseeded = run(None)
    assert not torch.equal(torch.get_rng_state(), state)  # seed=None samples from the global RNG
    assert unseeded.sequences.shape[0] == 2


def test_generate_answers_stop_at_eos_and_greedy_is_deterministic(lm):
    from openrl_ckpt.inference.generation import SamplingConfig, generate

    model, tok, batch = lm
    greedy = SamplingConfig(max_new_tokens=4, greedy=True)
    first = generate(model, batch["input_ids"], batch["attention_mask"], greedy, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    # make the first greedy token of row 0 the EOS: its answer is then empty, its mask one token long
    eos_now = first.responses[0, 0].item()
    again = generate(model, batch["input_ids"], batch["attention_mask"], greedy, eos_token_id=eos_now,
                     pad_token_id=tok.pad_token_id)
    assert again.response_ids(0) == [] and again.response_ids(0, keep_eos=True) == [eos_now]
    assert again.ends_with_eos[0] and again.response_mask[0].sum() == 1
    assert first.response_ids(1) == generate(model, batch["input_ids"], batch["attention_mask"], greedy,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
                                             ).response_ids(1)


@pytest.mark.parametrize("kwargs,message", [({"max_new_tokens": 0}, "--max_new_tokens"),
                                            ({"max_new_tokens": 4, "temperature": 0.0}, "--temperature"),
                                            ({"max_new_tokens": 4, "top_p": 1.5}, "--top_p"),
                                            ({"max_new_tokens": 4, "top_k": -1}, "--top_k")])
def test_sampling_config_errors(kwargs, message):
    from openrl_ckpt.inference.generation import SamplingConfig

    with pytest.raises(UserError, match=message):
        SamplingConfig(**kwargs).check()
    SamplingConfig(max_new_tokens=4, temperature=0.0, greedy=True).check()


def test_generate_vllm_without_vllm_is_a_one_line_error(tiny_model_dir, example_data_dir, tmp_path):
    """The vLLM task imports vllm only when it runs; it starts no process group, so it runs in-process."""
    import importlib.util

    from openrl_ckpt.cli import batch_inference

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(UserError, match=r"generate_vllm needs the vllm package \(pip install 'openrl_ckpt\[vllm\]'"):
        batch_inference.main(["--eval_task", "generate_vllm", "--pretrain", tiny_model_dir, "--dataset",
                              str(example_data_dir / "prompts.jsonl"), "--input_key", "prompt", "--max_samples", "2",
                              "--output_path", str(tmp_path / "out.jsonl")])
    assert not (tmp_path / "out.jsonl").exists()
