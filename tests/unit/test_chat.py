"""The chat's history as each rendering writes it."""

from __future__ import annotations

from openrl_ckpt.inference.chat import ChatSession


def test_plain_template_history_and_clear(tiny_tokenizer_dir) -> None:
    from transformers import AutoTokenizer

    session = ChatSession(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), "User: {}\nAssistant: ", "Be brief.")
    assert session.prompt("Hi") == "Be brief.\nUser: Hi\nAssistant: "
    session.add("Hi", "Hello.")
    assert session.prompt("Bye") == "Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant: "
    session.clear()
    assert session.prompt("Bye") == "Be brief.\nUser: Bye\nAssistant: "


def test_chat_template_history_with_system_and_csft(tiny_tokenizer_dir) -> None:
    from transformers import AutoTokenizer

    session = ChatSession(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), None, "Be brief.",
                          suffix="<rm_score>: 5.00 ")
    session.add("Hi", "Hello.")
    assert session.prompt("Bye") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello."
        "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n<rm_score>: 5.00 ")
