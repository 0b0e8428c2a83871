"""The exact answer/prompt split on byte-level BPE and SentencePiece-style tokenizers."""

from __future__ import annotations

import datasets
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from openrl_ckpt.data.answer_split import common_prefix_length, first_answer_token, tokenize_with_answer_start
from openrl_ckpt.data.preference_dataset import (
    LabelledConfig,
    PreferenceConfig,
    build_labelled_dataset,
    build_preference_dataset,
)
from openrl_ckpt.data.sft_dataset import build_sft_dataset
from openrl_ckpt.data.templates import TemplateConfig

CORPUS = ["User: What is the capital of France?\nAssistant: Paris is the capital of France.",
          "User: Name a colour.\nAssistant: Blue, or red, or green.",
          "User: Say hello.\nAssistant: Hello there! Hello hello.",
          "The quick brown fox jumps over the lazy dog. Paris Paris Blue Hello"] * 20
QUESTIONS = ["What is the capital of France?", "Name a colour.", "Say hello."]
ANSWERS = ["Paris is the capital of France.", "Blue, or red, or green.", "Hello there!"]
TEMPLATES = {"space": "User: {}\nAssistant: ", "newline": "User: {}\nAssistant:\n", "nothing": "User: {}\nAssistant:"}


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False)


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2 / Llama-3 style: byte-level pre-tokenizer, a space joins the word after it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return _wrap(tok)


def sentencepiece_bpe() -> PreTrainedTokenizerFast:
    """Llama-2 / Mistral style: spaces become '▁' glued to the next word, a '▁' is prepended."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    return _wrap(tok)


class SlowView:
    """The same tokenizer seen as a slow one: no offsets, so the common-prefix rule is used."""

    is_fast = False

    def __init__(self, fast: PreTrainedTokenizerFast) -> None:
        self.fast = fast

    def __call__(self, texts, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self.fast(texts, **kwargs)

    def __getattr__(self, name: str):  # chat template, special tokens: the fast one's
        return getattr(self.fast, name)


TOKENIZERS = {"byte_level_bpe": byte_level_bpe(), "sentencepiece": sentencepiece_bpe()}


def test_first_answer_token_and_common_prefix_by_hand() -> None:
    # "ab" + "cd" tokenized as [<s>](0,0) "a"(0,1) "bc"(1,3) "d"(3,4): "bc" holds the answer's "c"
    assert first_answer_token([(0, 0), (0, 1), (1, 3), (3, 4)], prompt_chars=2) == 2
    assert first_answer_token([(0, 0), (0, 2)], prompt_chars=2) == 2  # no answer token: the length
    assert first_answer_token([(0, 0), (0, 1)], prompt_chars=0) == 1  # an added BOS is never the answer
    assert common_prefix_length([1, 5, 7, 9], [1, 5, 8]) == 2
    assert common_prefix_length([1, 5], [1, 5, 8]) == 2


@pytest.mark.parametrize("template", TEMPLATES.values(), ids=TEMPLATES.keys())
@pytest.mark.parametrize("name", TOKENIZERS)
def test_answer_tokens_hold_the_whole_answer_and_no_prompt_token(name: str, template: str) -> None:
    tok = TOKENIZERS[name]
    prompts = [template.format(q) for q in QUESTIONS]
    for add_special in (False, True):
        split = tokenize_with_answer_start(tok, prompts, ANSWERS, add_special)
        for prompt, answer, (ids, start) in zip(prompts, ANSWERS, split):
            assert ids == tok(prompt + answer, add_special_tokens=add_special)["input_ids"]
            before, after = tok.decode(ids[:start], skip_special_tokens=True), tok.decode(ids[start:])
            assert prompt.startswith(before)  # nothing of the answer is masked
            assert after.endswith(answer) and len(after) <= len(answer) + 1  # at most the joining space
        # a slow tokenizer (no offsets) splits the same way
        assert tokenize_with_answer_start(SlowView(tok), prompts, ANSWERS, add_special) == split


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_template_ending_in_a_space_puts_the_joined_token_in_the_answer(name: str) -> None:
    tok = TOKENIZERS[name]
    prompt, answer = TEMPLATES["space"].format(QUESTIONS[0]), ANSWERS[0]
    [(ids, start)] = tokenize_with_answer_start(tok, [prompt], [answer], False)
    counted = len(tok(prompt, add_special_tokens=False)["input_ids"])  # the old rule
    assert tok.decode(ids[start:start + 1]).strip().startswith("P")  # the answer's first token is trained
    assert counted > start  # the old rule counted the " Paris" token as prompt


@pytest.mark.parametrize("name", TOKENIZERS)
def test_every_job_builder_trains_the_first_answer_token(name: str) -> None:
    tok = TOKENIZERS[name]
    template = TEMPLATES["space"]
    rows = [{"q": q, "a": a, "b": "No.", "label": True} for q, a in zip(QUESTIONS, ANSWERS)]
    raw = datasets.Dataset.from_list(rows)

    def first_answer_text(ids: list[int], start: int) -> str:
        return tok.decode(ids[start:]).lstrip("▁ ")

    sft, _ = build_sft_dataset(raw, tok, TemplateConfig("q", "a", template, False), max_len=64, pretrain_mode=False,
                               source="d")
    pairs, _ = build_preference_dataset(raw, tok, PreferenceConfig("q", "a", "b", template, False), max_len=64,
                                        source="d")
    labelled, _ = build_labelled_dataset(raw, tok, LabelledConfig("q", "a", "label", template, False), max_len=64,
                                         source="d")
    for i, answer in enumerate(ANSWERS):
        assert first_answer_text(sft[i]["input_ids"], sft[i]["loss_start"]).startswith(answer)
        assert first_answer_text(pairs[i]["chosen_ids"], pairs[i]["chosen_start"]).startswith(answer)
        assert first_answer_text(pairs[i]["rejected_ids"], pairs[i]["rejected_start"]).startswith("No.")
        assert tok.decode(labelled[i]["answer_ids"]).lstrip("▁ ").startswith(answer)


def test_multiturn_trains_every_assistant_turn_and_nothing_else(tiny_tokenizer_dir) -> None:
    from transformers import AutoTokenizer

    from openrl_ckpt.data.collate import pad_collate

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)  # ChatML
    conversation = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                    {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]
    cfg = TemplateConfig("messages", None, None, True)
    raw = datasets.Dataset.from_list([{"messages": conversation}])
    for view in (tok, SlowView(tok)):
        ds, stats = build_sft_dataset(raw, view, cfg, max_len=128, pretrain_mode=False, source="d", multiturn=True)
        item = ds[0]
        trained = [tok.decode(item["input_ids"][a:b]) for a, b in item["loss_spans"]]
        assert trained == ["Blue.<|im_end|>\n", "Red.<|im_end|>\n"]
        mask = pad_collate([item], pad_token_id=0)["loss_mask"][0]
        assert tok.decode([t for t, m in zip(item["input_ids"], mask) if m]) == "Blue.<|im_end|>\nRed.<|im_end|>\n"
    # cut inside the second turn: the first stays whole, the second is trained as far as it goes
    short, stats = build_sft_dataset(raw, tok, cfg, max_len=item["loss_spans"][1][0] + 1, pretrain_mode=False,
                                     source="d", multiturn=True)
    assert stats.truncated == 1 and short[0]["loss_spans"][1][1] - short[0]["loss_spans"][1][0] == 1
