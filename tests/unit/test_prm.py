"""Process reward data, collation and loss against hand-worked examples."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from openrl_ckpt.data.prm_dataset import IGNORE, PRMConfig, build_prm_dataset, prm_collate
from openrl_ckpt.errors import UserError
from openrl_ckpt.models.loss import process_reward_loss

# a word-level vocabulary: every word one token, so positions are easy to write out
VOCAB = {w: i for i, w in enumerate(["<pad>", "</s>", "a", "b", "c", "ки", "+", "-", "x"])}


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="x"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


TOK = tokenizer()
HARD = PRMConfig(input_key="input", label_key="value", placeholder_token="ки", reward_tokens=("+", "-"))


def build(rows: list[dict], cfg: PRMConfig = HARD, max_len: int = 16):
    return build_prm_dataset(datasets.Dataset.from_list(rows), TOK, cfg, max_len=max_len, source="d.jsonl")


def test_hard_labels_sit_at_the_placeholders_as_reward_token_classes() -> None:
    ds, stats = build([{"input": "a b ки c ки", "value": ["+", "-"]}])
    item = ds[0]
    assert item["input_ids"] == [2, 3, 5, 4, 5]
    assert item["step_targets"] == [IGNORE, IGNORE, 0, IGNORE, 1]  # "+" is class 0, "-" class 1
    assert item["step_probs"] is None and stats == {"rows": 1, "truncated": 0}


def test_without_reward_tokens_the_class_is_the_vocabulary_id() -> None:
    ds, _ = build([{"input": "a ки", "value": ["-"]}], PRMConfig("input", "value", "ки", None))
    assert ds[0]["step_targets"] == [IGNORE, VOCAB["-"]]


def test_soft_labels_and_truncation() -> None:
    ds, stats = build([{"input": "a ки b ки c ки", "value": [1.0, 0.25, 0.5]}], max_len=4)
    item = ds[0]
    assert item["input_ids"] == [2, 5, 3, 5]  # the third step is cut off, and its label with it
    assert item["step_targets"] == [IGNORE, 0, IGNORE, 0]
    assert item["step_probs"][1] == 1.0 and item["step_probs"][3] == 0.25 and math.isnan(item["step_probs"][0])
    assert stats["truncated"] == 1


@pytest.mark.parametrize("row, cfg, message", [
    ({"input": "a ки", "value": ["+", "-"]}, HARD, r"d.jsonl row 1: 1 --placeholder_token 'ки' steps but 2 labels"),
    ({"input": "a ки", "value": ["?"]}, HARD, r"row 1: label '\?' is not one of --reward_tokens \+ -"),
    ({"input": "a ки", "value": "+"}, HARD, r"row 1: 'value' \(--label_key\) must be a non-empty list"),
    ({"input": "a ки", "value": [1.5]}, HARD, r"probabilities in \[0, 1\]"),
    ({"input": "a ки", "value": [0.5]}, PRMConfig("input", "value", "ки", ("+",)), "exactly two --reward_tokens"),
    ({"input": "a ки", "value": ["+"]}, PRMConfig("input", "value", "a b", ("+", "-")),
     r"--placeholder_token 'a b' is 2 tokens"),
    ({"text": "a ки", "value": ["+"]}, HARD, r"no column 'input' \(--input_key\)"),
])
def test_bad_rows_are_one_line_errors(row: dict, cfg: PRMConfig, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build([row], cfg)


def test_padded_and_packed_batches_carry_the_same_targets() -> None:
    ds, _ = build([{"input": "a ки", "value": ["+"]}, {"input": "b c ки", "value": ["-"]}])
    padded = prm_collate([ds[0], ds[1]], pad_token_id=0)
    assert padded["input_ids"].tolist() == [[2, 5, 0], [3, 4, 5]]
    assert padded["step_targets"].tolist() == [[IGNORE, 0, IGNORE], [IGNORE, IGNORE, 1]]
    packed = prm_collate([ds[0], ds[1]], pad_token_id=0, packing=True)
    assert packed["input_ids"].tolist() == [[2, 5, 3, 4, 5]] and packed["position_ids"].tolist() == [[0, 1, 0, 1, 2]]
    assert packed["step_targets"].tolist() == [[IGNORE, 0, IGNORE, IGNORE, 1]]


def test_hard_loss_by_hand() -> None:
    # two placeholders; classes are reward tokens 6 ("+") and 7 ("-"); the other logits do not count
    logits = torch.zeros(1, 3, 9)
    logits[0, 1, 6], logits[0, 1, 7], logits[0, 1, 2] = 2.0, 0.0, 50.0
    logits[0, 2, 6], logits[0, 2, 7] = 1.0, 1.0
    targets = torch.tensor([[IGNORE, 0, 1]])
    losses, correct = process_reward_loss(logits, targets, [6, 7])
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-2.0)), math.log(2.0)])
    assert correct.tolist() == [True, False]  # the tie at the second step goes to class 0, not the label 1


def test_soft_loss_by_hand() -> None:
    logits = torch.zeros(1, 2, 9)
    logits[0, 1, 6], logits[0, 1, 7] = math.log(3.0), 0.0  # p(+) = 3/4
    targets, probs = torch.tensor([[IGNORE, 0]]), torch.tensor([[math.nan, 0.5]])
    losses, correct = process_reward_loss(logits, targets, [6, 7], probs)
    assert losses.tolist() == pytest.approx([-(0.5 * math.log(0.75) + 0.5 * math.log(0.25))])
    assert correct.tolist() == [True]  # p = 1/2 counts as good, and + is predicted
