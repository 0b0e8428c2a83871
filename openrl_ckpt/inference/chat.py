"""A chat with a model, turn by turn: the history as the chat template or --input_template renders it.

``ChatSession`` holds the conversation and renders the next prompt; the caller generates and hands the
reply back. Without a chat template the history is plain text: each turn ``input_template.format(user)``
followed by the reply, turns separated by a newline, after the optional --ta_prompt preamble.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChatSession:
    tokenizer: Any
    input_template: str | None  # None: the tokenizer's chat template
    preamble: str = ""  # --ta_prompt: a system message (chat template) or text before the first turn
    suffix: str = ""  # --enable_csft: the score prompt that ends each prompt
    turns: list[tuple[str, str]] = field(default_factory=list)

    def prompt(self, user: str) -> str:
        """The text the model continues to answer ``user`` after the turns so far."""
        if self.input_template is None:
            messages = [{"role": "system", "content": self.preamble}] if self.preamble else []
            for question, answer in self.turns:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            messages.append({"role": "user", "content": user})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            past = [self.input_template.format(q) + a for q, a in self.turns]
            text = "\n".join([self.preamble] * bool(self.preamble) + past + [self.input_template.format(user)])
        return text + self.suffix

    def add(self, user: str, reply: str) -> None:
        self.turns.append((user, reply))

    def clear(self) -> None:
        self.turns.clear()
