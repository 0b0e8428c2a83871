"""Prompt/response rendering: plain templates, chat templates, and the errors users see."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

from openrl_ckpt.data.templates import (
    TemplateConfig,
    apply_tokenizer_chat_template,
    check_input_template,
    render_example,
    render_prompt,
)
from openrl_ckpt.errors import UserError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(*, chat_template: str | None = CHATML, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per ASCII char) with pad=0, bos=1, eos=2 and ChatML tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [chr(c) for c in range(32, 127)] + ["\n"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(SPECIALS)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


PLAIN = TemplateConfig(input_key="q", output_key="a", input_template=None, apply_chat_template=False)
CHAT = TemplateConfig(input_key="q", output_key="a", input_template=None, apply_chat_template=True)


def test_plain_without_template_returns_raw_text():
    assert render_example({"q": "2+2?", "a": "4"}, PLAIN, None, where="d row 1") == ("2+2?", "4")


def test_plain_with_input_template():
    cfg = TemplateConfig("q", "a", "User: {}\nAssistant: ", False)
    assert render_example({"q": "hi", "a": "yo"}, cfg, None, where="d row 1") == ("User: hi\nAssistant: ", "yo")
    assert render_prompt({"q": "hi"}, cfg, None, where="d row 1") == "User: hi\nAssistant: "


def test_plain_without_output_key_is_input_only():
    cfg = TemplateConfig("text", None, None, False)
    assert render_example({"text": "once upon"}, cfg, None, where="d row 1") == ("once upon", "")


def test_missing_key_names_key_row_and_columns():
    expected = r"data.jsonl row 12: no value for key 'a' \(--output_key\); keys present: q, other"
    with pytest.raises(UserError, match=expected):
        render_example({"q": "x", "other": 1, "a": None}, PLAIN, None, where="data.jsonl row 12")


def test_non_string_input_is_a_user_error():
    with pytest.raises(UserError, match=r"'q' \(--input_key\) must be text, got int"):
        render_example({"q": 3, "a": "x"}, PLAIN, None, where="d row 1")
    with pytest.raises(UserError, match="pass --apply_chat_template"):
        render_example({"q": [{"role": "user", "content": "x"}], "a": "x"}, PLAIN, None, where="d row 1")


def test_chat_with_string_input_and_output():
    prompt, response = render_example({"q": "hi", "a": "hello"}, CHAT, build_tokenizer(), where="d row 1")
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert response == "hello<|im_end|>\n"


def test_chat_with_message_list_input_and_output_list():
    row = {
        "q": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ],
        "a": [{"role": "assistant", "content": "hey"}],
    }
    prompt, response = render_example(row, CHAT, build_tokenizer(), where="d row 1")
    assert prompt == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert response == "hey<|im_end|>\n"


def test_chat_conversation_without_output_key_splits_last_assistant_turn():
    cfg = TemplateConfig("messages", None, None, True)
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d", "tool_calls": None},
        ]
    }
    prompt, response = render_example(row, cfg, build_tokenizer(), where="d row 1")
    assert prompt.endswith("<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n")
    assert response == "d<|im_end|>\n"


def test_chat_conversation_must_end_with_assistant_without_output_key():
    cfg = TemplateConfig("messages", None, None, True)
    with pytest.raises(UserError, match="d row 3: with no --output_key, 'messages' must be a conversation ending"):
        render_example({"messages": [{"role": "user", "content": "a"}]}, cfg, build_tokenizer(), where="d row 3")


def test_chat_bad_message_is_a_user_error():
    with pytest.raises(UserError, match=r"d row 1: 'q' \(--input_key\) message 0 is not a"):
        render_example({"q": [{"content": "x"}], "a": "y"}, CHAT, build_tokenizer(), where="d row 1")


def test_chat_without_tokenizer_template_suggests_flag():
    with pytest.raises(UserError, match="--tokenizer_chat_template"):
        render_example({"q": "hi", "a": "x"}, CHAT, build_tokenizer(chat_template=None), where="d row 1")


def test_chat_template_error_names_row():
    tokenizer = build_tokenizer(chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(UserError, match="d row 4: the chat template failed on this row .*roles must alternate"):
        render_example({"q": "hi", "a": "x"}, CHAT, tokenizer, where="d row 4")


def test_render_prompt_with_chat_adds_generation_prompt():
    assert render_prompt({"q": "hi"}, CHAT, build_tokenizer(), where="d row 1") == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("template", ["no placeholder", "{} and {name}", "{} {", "{0}{1}"])
def test_check_input_template_rejects(template):
    with pytest.raises(UserError, match="--input_template"):
        check_input_template(template)


def test_check_input_template_accepts():
    check_input_template(None)
    check_input_template("Q: {}\nA: {{json}}")


def test_apply_tokenizer_chat_template_from_string_and_file(tmp_path):
    tokenizer = build_tokenizer(chat_template=None)
    apply_tokenizer_chat_template(tokenizer, CHATML)
    assert tokenizer.chat_template == CHATML
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    apply_tokenizer_chat_template(tokenizer, str(path))
    assert render_prompt({"q": "hi"}, CHAT, tokenizer, where="d row 1") == "[hi]"
    apply_tokenizer_chat_template(tokenizer, None)
    assert tokenizer.chat_template == path.read_text()


def test_apply_tokenizer_chat_template_errors(tmp_path):
    tokenizer = build_tokenizer(chat_template=None)
    with pytest.raises(UserError, match="no such file: missing.jinja"):
        apply_tokenizer_chat_template(tokenizer, "missing.jinja")
    with pytest.raises(UserError, match="does not render"):
        apply_tokenizer_chat_template(tokenizer, "{% for m in messages %}")


def test_tokenize_prompts_keeps_the_rows_asked_for_that_fit():
    import datasets

    from openrl_ckpt.data.prompts import TokenizedPrompt, tokenize_prompts

    raw = datasets.Dataset.from_list([{"q": "hi"}, {"q": "skipped row"}, {"q": "far too long"}, {"q": ""}])
    plain = TemplateConfig(input_key="q", output_key=None, input_template="Q: {}", apply_chat_template=False)
    tokenizer = build_tokenizer(add_bos=False)
    kept = tokenize_prompts(raw, [0, 2], plain, tokenizer, "d", max_tokens=6)
    assert kept == [TokenizedPrompt(row=0, text="Q: hi", ids=[ord(c) - 26 for c in "Q: hi"])]  # one id per char
    assert tokenize_prompts(raw, [3], PLAIN, tokenizer, "d", max_tokens=6) == []  # no tokens at all
    # a chat-rendered prompt gets no BOS from the tokenizer: the template writes the special tokens it needs
    chat = TemplateConfig(input_key="q", output_key=None, input_template=None, apply_chat_template=True)
    [prompt] = tokenize_prompts(raw, [0], chat, build_tokenizer(add_bos=True), "d", max_tokens=100)
    assert prompt.text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" and prompt.ids[0] == 4
