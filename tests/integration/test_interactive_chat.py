"""interactive_chat as a person uses it: in a pseudo-terminal (pexpect), typing messages, 'clear' and 'exit'."""

from __future__ import annotations

import shutil
import sys

import pexpect
import pytest
from launch import REPO, env

pytestmark = pytest.mark.slow


@pytest.fixture()
def talkative_model(tiny_model_dir, tmp_path) -> str:
    """The tiny model with a zero EOS row in its output layer: greedy replies never stop early, so each one
    fills --max_len and the turns below are known in advance."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    weights["lm_head.weight"][AutoConfig.from_pretrained(out).eos_token_id] = 0.0
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def reply(chat: pexpect.spawn) -> str:
    """The assistant's answer: everything between 'Assistant: ' and the next prompt (it may span lines)."""
    chat.expect_exact("Assistant: ")
    chat.expect_exact("\r\nUser: ")
    return chat.before


def test_a_conversation_in_a_terminal(talkative_model, tmp_path):
    (tmp_path / "system.txt").write_text("You answer questions.\n")
    chat = pexpect.spawn(sys.executable, ["-m", "openrl_ckpt.cli.interactive_chat", "--pretrain", talkative_model,
                                          "--greedy_sampling", "--max_len", "64", "--ta_prompt",
                                          str(tmp_path / "system.txt")],
                         cwd=str(REPO), env=env(), encoding="utf-8", timeout=120, dimensions=(40, 400))
    try:
        chat.expect_exact("'clear' forgets the conversation")
        chat.expect_exact("User: ")
        chat.sendline("What is the capital of France?")
        first = reply(chat)
        assert first.strip()
        chat.sendline("And of Japan?")  # the history (the first turn's 64 tokens) is part of the prompt now
        chat.expect(r"\(the conversation is (\d+) tokens, --max_len is 64: type 'clear'\)")
        assert int(chat.match.group(1)) > 64
        chat.expect_exact("User: ")
        chat.sendline("clear")
        chat.expect_exact("(history cleared)")
        chat.expect_exact("User: ")
        chat.sendline("What is the capital of France?")  # greedy, no history: the first answer again
        assert reply(chat) == first
        chat.sendline("exit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close()
    assert chat.exitstatus == 0, chat.before
