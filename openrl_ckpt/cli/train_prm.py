"""Process reward model: at each step placeholder, the model learns to predict the step's label token.

    deepspeed --module openrl_ckpt.cli.train_prm --pretrain DIR --dataset steps.jsonl --input_key input \
        --label_key value --placeholder_token ки --reward_tokens + - --save_steps 50 --load_checkpoint
"""

from __future__ import annotations

import argparse
import logging
from functools import partial

from openrl_ckpt.cli import args as cli_args
from openrl_ckpt.cli.entry import run
from openrl_ckpt.data.loading import load_datasets
from openrl_ckpt.data.prm_dataset import PRMConfig, build_prm_dataset, prm_collate, single_token_id
from openrl_ckpt.data.sampler import steps_per_epoch
from openrl_ckpt.errors import UserError
from openrl_ckpt.models.actor import load_causal_lm, load_tokenizer, model_fingerprint
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy
from openrl_ckpt.strategy.hf import save_model
from openrl_ckpt.trainers.base import Trainer
from openrl_ckpt.trainers.prm import PRMAlgorithm
from openrl_ckpt.utils.tracking import setup_logging

log = logging.getLogger("openrl_ckpt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli_args.Parser(prog="train_prm", description=__doc__.splitlines()[0])
    cli_args.add_model_args(p)
    cli_args.add_data_args(p)
    cli_args.add_train_args(p)
    cli_args.add_ckpt_args(p, default_ckpt="./ckpt/checkpoints_prm")
    cli_args.add_logging_args(p)
    g = p.add_argument_group("process reward")
    g.add_argument("--label_key", default="label", help="per row, a list of step labels: reward tokens, or the "
                   "probability that each step is good")
    g.add_argument("--placeholder_token", required=True, help="the token that ends each step in --input_key's text")
    g.add_argument("--reward_tokens", nargs="*", default=None, help="the label tokens the loss is over (e.g. + -); "
                   "without them, the whole vocabulary")
    p.set_defaults(max_epochs=1, learning_rate=1e-6, micro_train_batch_size=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for flag, given in (("--output_key", args.output_key is not None), ("--input_template", args.input_template),
                        ("--apply_chat_template", args.apply_chat_template)):
        if given:
            raise UserError(f"{flag}: train_prm reads --input_key's text as it is (steps ending in "
                            "--placeholder_token); drop the flag")

    # 1. strategy: process group and batch arithmetic
    strategy = DeepspeedStrategy(cli_args.strategy_config(args))
    strategy.setup_distributed()
    setup_logging(strategy.rank)

    # 2. tokenizer and rows (before the model: bad data fails in seconds)
    tokenizer = load_tokenizer(args.pretrain, use_fast=not args.disable_fast_tokenizer)
    cfg = PRMConfig(input_key=args.input_key, label_key=args.label_key, placeholder_token=args.placeholder_token,
                    reward_tokens=tuple(args.reward_tokens) if args.reward_tokens else None)
    train_set, eval_set = load_datasets(args, partial(build_prm_dataset, tokenizer=tokenizer, cfg=cfg,
                                                      max_len=args.max_len))
    reward_ids = [single_token_id(tokenizer, t, "--reward_tokens") for t in cfg.reward_tokens or ()] or None

    # 3. model: a causal LM whose next-token logits at the placeholders are the step scores
    strategy.before_model_load()
    model = load_causal_lm(cli_args.model_config(args))
    fingerprint = model_fingerprint(model)
    engine = strategy.prepare(model, cli_args.optim_config(args),
                              steps_per_epoch(len(train_set), args.train_batch_size) * args.max_epochs)

    # 4. resume + fit
    collate = partial(prm_collate, pad_token_id=tokenizer.pad_token_id, packing=args.packing_samples)
    trainer = Trainer(strategy, engine, PRMAlgorithm(engine, strategy.device, reward_ids), train_set, collate,
                      cli_args.loop_config(args, "prm"), cli_args.tracker_config(args), fingerprint,
                      eval_set=eval_set, eval_collate=partial(prm_collate, pad_token_id=tokenizer.pad_token_id),
                      ckpt_meta={"pretrain": args.pretrain, "placeholder_token": args.placeholder_token,
                                 "reward_tokens": args.reward_tokens}, tokenizer=tokenizer)
    trainer.fit()

    # 5. export
    save_model(strategy, engine, tokenizer, args.save_path)


if __name__ == "__main__":
    run(main)
