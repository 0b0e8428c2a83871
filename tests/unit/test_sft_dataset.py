"""Tokenized SFT examples: loss start, EOS, truncation, drops and their counts."""

from __future__ import annotations

import datasets
import pytest
from test_templates import build_tokenizer

from openrl_ckpt.data.sft_dataset import TokenizedStats, build_sft_dataset
from openrl_ckpt.data.templates import TemplateConfig
from openrl_ckpt.errors import UserError

PLAIN = TemplateConfig(input_key="q", output_key="a", input_template=None, apply_chat_template=False)
BOS, EOS = 1, 2


def build(rows, cfg=PLAIN, *, max_len=64, pretrain_mode=False, tokenizer=None):
    return build_sft_dataset(
        datasets.Dataset.from_list(rows),
        tokenizer or build_tokenizer(),
        cfg,
        max_len=max_len,
        pretrain_mode=pretrain_mode,
        source="d.jsonl",
    )


def test_prompt_tokens_are_not_targets_and_eos_is_appended():
    tokenizer = build_tokenizer()
    ds, stats = build([{"q": "ab", "a": "cd"}], tokenizer=tokenizer)
    item = ds[0]
    assert item["input_ids"] == [BOS, *tokenizer("abcd", add_special_tokens=False)["input_ids"], EOS]
    assert item["loss_start"] == 3  # BOS + 2 prompt chars
    assert item["index"] == 0
    assert stats == TokenizedStats(total=1, kept=1, dropped_prompt_too_long=0, dropped_empty_response=0, truncated=0)


def test_eos_is_not_doubled():
    ds, _ = build([{"q": "ab", "a": "cd</s>"}])
    assert ds[0]["input_ids"][-2:] != [EOS, EOS]
    assert ds[0]["input_ids"].count(EOS) == 1


def test_input_template_counts_in_prompt():
    cfg = TemplateConfig("q", "a", "Q:{}A:", False)
    ds, _ = build([{"q": "x", "a": "y"}], cfg)
    assert ds[0]["loss_start"] == 1 + len("Q:xA:")
    assert len(ds[0]["input_ids"]) == 1 + len("Q:xA:y") + 1


def test_truncation_and_drop_counts():
    rows = [
        {"q": "a", "a": "b"},  # kept whole: BOS a b EOS = 4 tokens
        {"q": "a", "a": "bcdefgh"},  # truncated to 6
        {"q": "abcdefgh", "a": "x"},  # prompt (9 tokens with BOS) >= 6: dropped
        {"q": "abcd", "a": "x"},  # prompt 5 tokens < 6: kept, then EOS cut by truncation
        {"q": "a", "a": ""},  # empty response
    ]
    ds, stats = build(rows, max_len=6)
    assert stats == TokenizedStats(total=5, kept=3, dropped_prompt_too_long=1, dropped_empty_response=1, truncated=2)
    assert [len(ds[i]["input_ids"]) for i in range(len(ds))] == [4, 6, 6]
    assert [ds[i]["loss_start"] for i in range(len(ds))] == [2, 2, 5]
    assert ds[0]["input_ids"][-1] == EOS and ds[1]["input_ids"][-1] != EOS


def test_all_dropped_is_a_user_error_with_counts():
    rows = [{"q": "abcdefgh", "a": "x"}, {"q": "a", "a": ""}, {"q": "abcdefghij", "a": "y"}]
    with pytest.raises(
        UserError,
        match=r"d.jsonl: all 3 rows were dropped: 2 prompts longer than --max_len 5, 1 empty responses",
    ):
        build(rows, max_len=5)


def test_pretrain_mode_trains_on_all_tokens_after_the_first():
    cfg = TemplateConfig("text", None, "ignored {}", False)
    rows = [{"text": "hello"}, {"text": ""}, {"text": "a much longer text"}]
    ds, stats = build(rows, cfg, max_len=8, pretrain_mode=True)
    assert stats.kept == 2 and stats.dropped_empty_response == 1 and stats.truncated == 1
    assert ds[0]["loss_start"] == 1
    assert ds[0]["input_ids"] == [BOS, *[ord(c) - 32 + 6 for c in "hello"], EOS]


def test_sft_without_output_key_is_refused():
    with pytest.raises(UserError, match="--output_key is required"):
        build([{"q": "a"}], TemplateConfig("q", None, None, False))


def test_chat_template_rows_skip_added_bos():
    cfg = TemplateConfig("q", "a", None, True)
    tokenizer = build_tokenizer()
    ds, _ = build([{"q": "hi", "a": "yo"}], cfg, max_len=128, tokenizer=tokenizer)
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = ds[0]["input_ids"]
    assert ids[0] != BOS
    assert ds[0]["loss_start"] == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert tokenizer.decode(ids[ds[0]["loss_start"] :]) == "yo<|im_end|>\n</s>"


def test_missing_key_names_the_row():
    with pytest.raises(UserError, match=r"d.jsonl row 2: no value for key 'a'"):
        build([{"q": "a", "a": "b"}, {"q": "c", "a": None}])


def test_indexing_is_deterministic_and_bounded():
    rows = [{"q": f"q{i}", "a": f"a{i}"} for i in range(10)]
    first, _ = build(rows)
    second, _ = build(rows)
    assert len(first) == 10
    assert [first[i] for i in range(10)] == [second[i] for i in range(10)]
    with pytest.raises(IndexError):
        first[10]


def test_batched_tokenization_matches_row_by_row():
    n = 2_000  # enough rows to span several tokenizer batches
    rows = {"q": [f"question number {i}?" for i in range(n)], "a": [f"answer {i}" for i in range(n)]}
    tok = build_tokenizer()
    ds, stats = build_sft_dataset(datasets.Dataset.from_dict(rows), tok, PLAIN, max_len=64, pretrain_mode=False,
                                  source="big")
    assert stats.kept == n and len(ds) == n
    for i in (0, 777, n - 1):
        one, _ = build_sft_dataset(datasets.Dataset.from_dict({"q": [rows["q"][i]], "a": [rows["a"][i]]}), tok,
                                   PLAIN, max_len=64, pretrain_mode=False, source="one")
        assert ds[i]["input_ids"] == one[0]["input_ids"] and ds[i]["loss_start"] == one[0]["loss_start"]
