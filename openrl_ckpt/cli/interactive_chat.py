"""Chat with a trained model in the terminal: the history carries over; 'clear' forgets it, 'exit' quits.

    python -m openrl_ckpt.cli.interactive_chat --pretrain ./ckpt/model --apply_chat_template
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from openrl_ckpt.cli.args import (
    DEFAULT_INPUT_TEMPLATE,
    Parser,
    add_input_template_arg,
    add_serving_model_args,
    bool_flag,
    check_serving_model_args,
)
from openrl_ckpt.cli.entry import run
from openrl_ckpt.errors import UserError

PROMPT = "User: "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="interactive_chat", description=__doc__.splitlines()[0])
    g = p.add_argument_group("model")
    g.add_argument("--pretrain", required=True, help="a model folder (a run's --save_path) or hub id")
    add_serving_model_args(g)
    g = p.add_argument_group("sampling")
    g.add_argument("--max_len", type=int, default=4096, help="prompt (the whole history) plus answer, in tokens")
    bool_flag(g, "--greedy_sampling", "greedy decoding")
    g.add_argument("--top_p", type=float, default=0.9)
    g.add_argument("--temperature", type=float, default=0.2)
    g.add_argument("--repetition_penalty", type=float, default=1.2)
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("conversation")
    add_input_template_arg(g, DEFAULT_INPUT_TEMPLATE)
    bool_flag(g, "--apply_chat_template", "render the history with the tokenizer's chat template")
    g.add_argument("--ta_prompt", default=None, help="a file whose text opens the conversation (a system prompt)")
    bool_flag(g, "--enable_csft", "end every prompt with --csft_prompt (a model trained with conditional SFT)")
    g.add_argument("--csft_prompt", default="<rm_score>: 5.00")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_serving_model_args(args)
    if not args.apply_chat_template and args.input_template is None:
        raise UserError("--input_template '': a chat needs a template (or --apply_chat_template)")
    preamble = ""
    if args.ta_prompt:
        try:
            with open(args.ta_prompt, encoding="utf-8") as f:
                preamble = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--ta_prompt {args.ta_prompt}: cannot read it ({e})") from None
    import torch

    from openrl_ckpt.data.padding import left_pad
    from openrl_ckpt.inference.chat import ChatSession
    from openrl_ckpt.inference.generation import SamplingConfig, generate
    from openrl_ckpt.models.actor import ModelConfig, load_causal_lm, load_tokenizer
    from openrl_ckpt.utils.tracking import setup_logging

    setup_logging(0)
    sampling = SamplingConfig(max_new_tokens=args.max_len, temperature=args.temperature, top_p=args.top_p,
                              greedy=args.greedy_sampling, repetition_penalty=args.repetition_penalty)
    sampling.check()

    # 1. model and the conversation's rendering
    tokenizer = load_tokenizer(args.pretrain, padding_side="left", use_fast=not args.disable_fast_tokenizer)
    if args.apply_chat_template and not tokenizer.chat_template:
        raise UserError(f"--apply_chat_template: {args.pretrain}'s tokenizer has no chat template")
    model = load_causal_lm(ModelConfig(pretrain=args.pretrain, bf16=args.bf16, flash_attn=args.flash_attn))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device).eval()
    session = ChatSession(tokenizer, None if args.apply_chat_template else args.input_template, preamble,
                          suffix=args.csft_prompt.strip() + " " if args.enable_csft else "")
    print("Type a message; 'clear' forgets the conversation, 'exit' (or Ctrl-D) quits.", flush=True)

    # 2. the conversation
    turn = 0
    while True:
        try:
            user = input(PROMPT)
        except EOFError:
            print()
            break
        command = user.strip().lower()
        if command == "exit":
            break
        if command == "clear":
            session.clear()
            print("(history cleared)", flush=True)
            continue
        if not command:
            continue
        ids = tokenizer(session.prompt(user), add_special_tokens=not args.apply_chat_template)["input_ids"]
        if len(ids) >= args.max_len:
            print(f"(the conversation is {len(ids)} tokens, --max_len is {args.max_len}: type 'clear')", flush=True)
            continue
        batch, mask = left_pad([ids], tokenizer.pad_token_id)
        out = generate(model, batch.to(device), mask.to(device),
                       replace(sampling, max_new_tokens=args.max_len - len(ids)),
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       seed=args.seed + turn)
        reply = tokenizer.decode(out.response_ids(0), skip_special_tokens=True).strip()
        session.add(user, reply)
        turn += 1
        print(f"Assistant: {reply}", flush=True)
    print("Bye.", file=sys.stderr)


if __name__ == "__main__":
    run(main)
