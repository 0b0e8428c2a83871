"""Turn one dataset row into (prompt, response) text, the way OpenRLHF does.

Without ``--apply_chat_template`` the prompt is ``input_template.format(row[input_key])`` (or the raw
input) and the response is ``row[output_key]``. With it, the prompt is the tokenizer's chat template
with a generation prompt, and the response is whatever the template adds once the answer is appended.
Every bad row is a ``UserError`` naming the row, the key and the columns that do exist.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import jinja2

from openrl_ckpt.errors import UserError


@dataclass(frozen=True)
class TemplateConfig:
    """The data flags that shape text: ``--input_key --output_key --input_template --apply_chat_template``.

    ``output_key=None`` means: the input alone is the text (pretraining), or, with a chat template,
    the input is a conversation whose last assistant turn is the response.
    """

    input_key: str
    output_key: str | None
    input_template: str | None
    apply_chat_template: bool
    input_flag: str = "--input_key"  # the flags that name the keys, for error messages
    output_flag: str = "--output_key"


def check_input_template(template: str | None) -> None:
    """Fail at startup, not at row 1 of a million, on a template ``str.format`` cannot fill."""
    if template is None:
        return
    if "{}" not in template:
        raise UserError(f"--input_template must contain '{{}}' where the input goes, got {template!r}")
    try:
        template.format("")
    except (IndexError, KeyError, ValueError):
        raise UserError(
            f"--input_template {template!r}: write literal braces as '{{{{' and '}}}}'; only '{{}}' is filled in"
        ) from None


def apply_tokenizer_chat_template(tokenizer, template_arg: str | None) -> None:
    """Set ``tokenizer.chat_template`` from ``--tokenizer_chat_template`` (a Jinja string or a file holding one)."""
    if template_arg is None:
        return
    if os.path.isfile(template_arg):
        try:
            with open(template_arg, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--tokenizer_chat_template: cannot read {template_arg} ({exc})") from None
    elif "{" not in template_arg:
        raise UserError(f"--tokenizer_chat_template: no such file: {template_arg} (nor is it a Jinja template)")
    else:
        template = template_arg
    tokenizer.chat_template = template
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as exc:
        raise UserError(f"--tokenizer_chat_template: the template does not render ({exc})") from None


def render_example(row: Mapping, cfg: TemplateConfig, tokenizer, *, where: str) -> tuple[str, str]:
    """Return (prompt, response) text for one row; ``where`` names the row in errors ("data.jsonl row 12").

    For preference data call it once per answer with ``dataclasses.replace(cfg, output_key=...)``.
    """
    if not cfg.apply_chat_template:
        prompt = _text(row, cfg.input_key, cfg.input_flag, where, chat_hint=True)
        if cfg.input_template is not None:
            prompt = cfg.input_template.format(prompt)
        response = "" if cfg.output_key is None else _text(row, cfg.output_key, cfg.output_flag, where, chat_hint=True)
        return prompt, response

    _require_chat_template(tokenizer)
    messages = _messages(row, cfg.input_key, cfg.input_flag, "user", where)
    if cfg.output_key is None:
        if messages[-1]["role"] != "assistant":
            raise UserError(
                f"{where}: with no {cfg.output_flag}, '{cfg.input_key}' must be a conversation ending with an "
                f"assistant turn (its last role is '{messages[-1]['role']}')"
            )
        messages, answer = messages[:-1], messages[-1:]
        if not messages:
            raise UserError(f"{where}: '{cfg.input_key}' holds only an assistant turn; there is no prompt")
    else:
        answer = _messages(row, cfg.output_key, cfg.output_flag, "assistant", where)
    prompt = _chat(tokenizer, messages, True, where)
    full = _chat(tokenizer, messages + answer, False, where)
    if not full.startswith(prompt):
        raise UserError(
            f"{where}: the chat template renders the prompt differently once the answer is appended, "
            "so prompt and response cannot be split"
        )
    return prompt, full[len(prompt) :]


def render_conversation(row: Mapping, cfg: TemplateConfig, tokenizer, *,
                        where: str) -> tuple[str, list[tuple[int, int]]]:
    """--multiturn: the whole conversation (``--output_key``'s answer appended when given) rendered with the
    chat template, and the character span of every assistant turn (each one a response to train on)."""
    if not cfg.apply_chat_template:
        raise UserError("--multiturn trains on every assistant turn of a conversation: it needs --apply_chat_template")
    _require_chat_template(tokenizer)
    messages = _messages(row, cfg.input_key, cfg.input_flag, "user", where)
    if cfg.output_key is not None:
        messages += _messages(row, cfg.output_key, cfg.output_flag, "assistant", where)
    full = _chat(tokenizer, messages, False, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _chat(tokenizer, messages[:i], True, where) if i else ""
        through = _chat(tokenizer, messages[: i + 1], False, where)
        if not (through.startswith(before) and full.startswith(through)):
            raise UserError(f"{where}: the chat template renders turn {i} differently once later turns follow, "
                            "so its response cannot be located")
        spans.append((len(before), len(through)))
    return full, spans


def render_prompt(row: Mapping, cfg: TemplateConfig, tokenizer, *, where: str) -> str:
    """Return the prompt text alone (PPO, generation): a conversation gets the generation prompt."""
    if not cfg.apply_chat_template:
        prompt = _text(row, cfg.input_key, cfg.input_flag, where, chat_hint=True)
        return prompt if cfg.input_template is None else cfg.input_template.format(prompt)
    _require_chat_template(tokenizer)
    return _chat(tokenizer, _messages(row, cfg.input_key, cfg.input_flag, "user", where), True, where)


def row_text(row: Mapping, key: str, flag: str, where: str) -> str:
    """The text under ``key``; a missing key or a non-text value is a ``UserError`` naming the row and flag."""
    return _text(row, key, flag, where, chat_hint=True)


def _require_chat_template(tokenizer) -> None:
    if not tokenizer.chat_template:
        raise UserError(
            "--apply_chat_template: the tokenizer has no chat template; "
            "pass --tokenizer_chat_template (a Jinja string or a file holding one)"
        )


def _value(row: Mapping, key: str, flag: str, where: str) -> object:
    value = row.get(key)
    if value is None:
        present = ", ".join(k for k, v in row.items() if v is not None) or "none"
        raise UserError(f"{where}: no value for key '{key}' ({flag}); keys present: {present}")
    return value


def _text(row: Mapping, key: str, flag: str, where: str, *, chat_hint: bool) -> str:
    value = _value(row, key, flag, where)
    if isinstance(value, str):
        return value
    hint = "; pass --apply_chat_template for chat messages" if chat_hint and isinstance(value, list) else ""
    raise UserError(f"{where}: '{key}' ({flag}) must be text, got {type(value).__name__}{hint}")


def _messages(row: Mapping, key: str, flag: str, role_for_text: str, where: str) -> list[dict]:
    """A text value becomes one message; a list must hold {"role", "content"} messages."""
    value = _value(row, key, flag, where)
    if isinstance(value, str):
        return [{"role": role_for_text, "content": value}]
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: '{key}' ({flag}) must be text or a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or "content" not in message:
            raise UserError(f"{where}: '{key}' ({flag}) message {i} is not a {{'role': ..., 'content': ...}} object")
        # Arrow fills keys that other rows have with None; templates test "is defined", so drop them.
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as exc:
        raise UserError(f"{where}: the chat template failed on this row ({exc})") from None
