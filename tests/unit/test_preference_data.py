"""Preference pairs and KTO rows: prompt/answer split, EOS, truncation, drops, bad rows, and their batches."""

from __future__ import annotations

import logging

import datasets
import pytest
import torch
from test_templates import build_tokenizer

from openrl_ckpt.data.collate import kto_collate, pair_collate
from openrl_ckpt.data.preference_dataset import (
    LabelledConfig,
    PreferenceConfig,
    PreferenceStats,
    build_labelled_dataset,
    build_preference_dataset,
    split_pairs,
)
from openrl_ckpt.errors import UserError

EOS = 2
PROMPTED = PreferenceConfig(prompt_key="p", chosen_key="c", rejected_key="r", input_template=None,
                            apply_chat_template=False)
WHOLE = PreferenceConfig(prompt_key=None, chosen_key="c", rejected_key="r", input_template=None,
                         apply_chat_template=False)
CHAT = PreferenceConfig(prompt_key=None, chosen_key="c", rejected_key="r", input_template=None,
                        apply_chat_template=True)
TOK = build_tokenizer()


def ids(text: str, bos: bool = True) -> list[int]:
    return TOK(text, add_special_tokens=bos)["input_ids"]


def pairs(rows, cfg=PROMPTED, max_len=64):
    return build_preference_dataset(datasets.Dataset.from_list(rows), TOK, cfg, max_len=max_len, source="d.jsonl")


def test_pair_shares_the_prompt_and_ends_with_eos():
    ds, stats = pairs([{"p": "Q:", "c": "yes", "r": "no", "margin": 0.5}])
    item = ds[0]
    assert item["chosen_ids"] == ids("Q:yes") + [EOS]
    assert item["rejected_ids"] == ids("Q:no") + [EOS]
    assert item["chosen_start"] == item["rejected_start"] == len(ids("Q:"))
    assert item["margin"] == 0.5 and item["index"] == 0
    assert stats == PreferenceStats(total=1, kept=1, dropped_prompt_too_long=0, dropped_identical=0, truncated=0)


def test_without_prompt_key_plain_pairs_are_whole_texts():
    item = pairs([{"c": "good", "r": "bad"}], WHOLE)[0][0]
    assert item["chosen_ids"] == ids("good") + [EOS] and item["margin"] == 0.0
    assert item["chosen_start"] == len(ids(""))  # just the BOS this tokenizer adds


def test_without_prompt_key_chat_pairs_split_at_the_last_assistant_turn():
    user = {"role": "user", "content": "hi"}
    ds, _ = pairs([{"c": [user, {"role": "assistant", "content": "hello"}],
                    "r": [user, {"role": "assistant", "content": "go away"}]}], CHAT)
    prompt = TOK.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    start = ds[0]["chosen_start"]
    assert start == ds[0]["rejected_start"] == len(ids(prompt, bos=False))
    assert ds[0]["chosen_ids"][:start] == ds[0]["rejected_ids"][:start]


def test_chat_pairs_with_different_histories_are_refused():
    a = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]
    b = [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "y"}]
    with pytest.raises(UserError, match=r"d.jsonl row 1: .* differ before .*--prompt_key"):
        pairs([{"c": a, "r": b}], CHAT)


def test_identical_pairs_are_dropped_and_counted(caplog):
    with caplog.at_level(logging.WARNING, logger="openrl_ckpt"):
        ds, stats = pairs([{"p": "q", "c": "same", "r": "same"}, {"p": "q", "c": "a", "r": "b"}])
    assert len(ds) == 1 and stats.dropped_identical == 1
    assert "1 pairs have the same chosen and rejected answer" in caplog.text


def test_long_prompts_are_dropped_long_answers_cut_keeping_eos():
    ds, stats = pairs([{"p": "x" * 20, "c": "a", "r": "b"}, {"p": "q", "c": "y" * 30, "r": "n"}], max_len=12)
    assert stats.dropped_prompt_too_long == 1 and stats.truncated == 1 and len(ds) == 1
    assert len(ds[0]["chosen_ids"]) == 12 and ds[0]["chosen_ids"][-1] == EOS
    with pytest.raises(UserError, match="all 1 pairs were dropped: 1 prompts too long for --max_len 12"):
        pairs([{"p": "x" * 20, "c": "a", "r": "b"}], max_len=12)


def test_missing_column_names_the_flag():
    with pytest.raises(UserError, match=r"d.jsonl: no column 'r' \(--rejected_key\); columns: p, c, rj"):
        pairs([{"p": "q", "c": "a", "rj": "b"}])


def test_missing_value_names_the_row_and_flag():
    with pytest.raises(UserError, match=r"d.jsonl row 2: no value for key 'c' \(--chosen_key\)"):
        pairs([{"p": "q", "c": "a", "r": "b"}, {"p": "q", "c": None, "r": "b"}])


def test_bad_margin_names_the_row():
    with pytest.raises(UserError, match=r"d.jsonl row 1: 'margin' must be a finite number"):
        pairs([{"p": "q", "c": "a", "r": "b", "margin": "high"}])


def labelled(rows, max_len=64):
    cfg = LabelledConfig(input_key="p", output_key="a", label_key="ok", input_template=None, apply_chat_template=False)
    return build_labelled_dataset(datasets.Dataset.from_list(rows), TOK, cfg, max_len=max_len, source="k.jsonl")


def test_kto_labels_accept_booleans_and_0_1():
    ds, _ = labelled([{"p": "q", "a": "x", "ok": 1}, {"p": "q", "a": "y", "ok": 0}])
    assert [ds[0]["label"], ds[1]["label"]] == [True, False] and ds.num_desirable == 1
    assert ds[0]["prompt_ids"] == ids("q") and ds[0]["answer_ids"] == ids("x", bos=False) + [EOS]
    ds, _ = labelled([{"p": "q", "a": "x", "ok": True}, {"p": "q", "a": "y", "ok": False}])
    assert ds.num_desirable == 1


@pytest.mark.parametrize("oks, row, bad", [([1, 2], 2, 2), (["yes"], 1, "yes")])
def test_kto_labels_that_are_not_boolean_name_the_row(oks, row, bad):
    with pytest.raises(UserError,
                       match=rf"k.jsonl row {row}: 'ok' \(--label_key\) must be true/false or 0/1, got {bad!r}"):
        labelled([{"p": "q", "a": "x", "ok": ok} for ok in oks])


def test_paired_data_becomes_desirable_and_undesirable_rows():
    ds, stats = split_pairs(datasets.Dataset.from_list([{"p": "q", "c": "a", "r": "b"}]), TOK, PROMPTED, max_len=64,
                            source="d.jsonl")
    assert len(ds) == 2 and stats.kept == 2
    assert (ds[0]["label"], ds[1]["label"]) == (True, False)
    assert ds[0]["prompt_ids"] == ds[1]["prompt_ids"] == ids("q")


def test_pair_batch_puts_chosen_first_and_keeps_margins():
    ds, _ = pairs([{"p": "q", "c": "aaa", "r": "b", "margin": 1.0}, {"p": "qq", "c": "c", "r": "dd"}])
    batch = pair_collate([ds[0], ds[1]], pad_token_id=0)
    assert batch["input_ids"].shape[0] == 4
    assert batch["input_ids"][0, : len(ds[0]["chosen_ids"])].tolist() == ds[0]["chosen_ids"]
    assert batch["input_ids"][2, : len(ds[0]["rejected_ids"])].tolist() == ds[0]["rejected_ids"]
    assert batch["margin"].tolist() == [1.0, 0.0] and batch["index"].tolist() == [0, 1]
    width = batch["input_ids"].shape[1]
    lengths = [len(ds[0]["chosen_ids"]), len(ds[1]["chosen_ids"]), len(ds[0]["rejected_ids"]),
               len(ds[1]["rejected_ids"])]
    assert batch["last"].tolist() == [i * width + n - 1 for i, n in enumerate(lengths)]
    assert batch["input_ids"].flatten()[batch["last"]].tolist() == [EOS] * 4


def test_kto_batch_pairs_each_prompt_with_the_next_answer():
    ds, _ = labelled([{"p": "q1", "a": "x", "ok": 1}, {"p": "q2", "a": "yyyy", "ok": 0}])
    batch = kto_collate([ds[0], ds[1]], pad_token_id=0, eos_token_id=EOS, max_len=64)
    kl = batch["kl"]
    assert kl["input_ids"][0, : len(ids("q1")) + 5].tolist() == ids("q1") + ids("yyyy", bos=False) + [EOS]
    assert kl["input_ids"][1, : len(ids("q2")) + 2].tolist() == ids("q2") + ids("x", bos=False) + [EOS]
    assert batch["label"].tolist() == [True, False]
    cut = kto_collate([ds[0], ds[1]], pad_token_id=0, eos_token_id=EOS, max_len=5)["kl"]
    assert cut["input_ids"][0].tolist()[-1] == EOS and cut["input_ids"].shape[1] <= 5


def test_packed_pair_batch_reads_the_same_last_tokens():
    ds, _ = pairs([{"p": "q", "c": "aaa", "r": "b"}, {"p": "qq", "c": "c", "r": "dd"}])
    padded = pair_collate([ds[0], ds[1]], pad_token_id=0)
    packed = pair_collate([ds[0], ds[1]], pad_token_id=0, packing=True)
    assert packed["input_ids"].shape[0] == 1
    assert torch.equal(packed["input_ids"].flatten()[packed["last"]], padded["input_ids"].flatten()[padded["last"]])


def test_kto_reads_unpaired_rows_when_the_data_has_no_pairs():
    from openrl_ckpt.data.preference_dataset import LabelledConfig, build_kto_rows

    rows = LabelledConfig(input_key="q", output_key="a", label_key="ok", input_template=None,
                          apply_chat_template=False)
    unpaired = datasets.Dataset.from_list([{"q": "Q:", "a": "yes", "ok": True}, {"q": "Q:", "a": "no", "ok": False}])
    ds, _ = build_kto_rows(unpaired, TOK, PROMPTED, rows, unpaired=False, max_len=64, source="d")  # no 'c' column
    assert [ds[i]["label"] for i in range(2)] == [True, False] and ds[0]["answer_ids"][-1] == EOS
    paired = datasets.Dataset.from_list([{"p": "Q:", "c": "yes", "r": "no"}])
    ds, _ = build_kto_rows(paired, TOK, PROMPTED, rows, unpaired=False, max_len=64, source="d")
    assert [ds[i]["label"] for i in range(2)] == [True, False]  # chosen desirable, rejected not
    no_answer = LabelledConfig(input_key="q", output_key=None, label_key="ok", input_template=None,
                               apply_chat_template=False)
    with pytest.raises(UserError, match="unpaired KTO rows need --output_key"):
        build_kto_rows(unpaired, TOK, PROMPTED, no_answer, unpaired=False, max_len=64, source="d")
