"""Supervised fine-tuning.

    deepspeed --module openrl_ckpt.cli.train_sft --pretrain DIR --dataset data.jsonl \
        --input_key question --output_key response --save_steps 50 --ckpt_path ./ckpt --load_checkpoint
"""

from __future__ import annotations

import argparse
import logging
from functools import partial

from openrl_ckpt.cli import args as cli_args
from openrl_ckpt.cli.entry import run
from openrl_ckpt.data.collate import pack_collate, pad_collate
from openrl_ckpt.data.loading import load_datasets
from openrl_ckpt.data.sampler import steps_per_epoch
from openrl_ckpt.data.sft_dataset import build_sft_dataset
from openrl_ckpt.data.templates import TemplateConfig, apply_tokenizer_chat_template
from openrl_ckpt.errors import UserError
from openrl_ckpt.models.actor import load_causal_lm, load_tokenizer, model_fingerprint
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy
from openrl_ckpt.strategy.hf import save_model
from openrl_ckpt.trainers.base import Trainer
from openrl_ckpt.trainers.sft import SFTAlgorithm
from openrl_ckpt.utils.tracking import setup_logging

log = logging.getLogger("openrl_ckpt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli_args.Parser(prog="train_sft", description=__doc__.splitlines()[0])
    cli_args.add_model_args(p)
    cli_args.add_data_args(p, input_template_default=cli_args.DEFAULT_INPUT_TEMPLATE)
    cli_args.add_train_args(p)
    cli_args.add_ckpt_args(p, default_ckpt="./ckpt/checkpoints_sft")
    cli_args.add_logging_args(p)
    g = p.add_argument_group("sft")
    cli_args.bool_flag(g, "--pretrain_mode", "continued pre-training: loss on every token, --output_key optional")
    cli_args.bool_flag(g, "--multiturn", "with --apply_chat_template: train on every assistant turn of each "
                       "conversation, not only the last")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    # 1. strategy: process group and batch arithmetic
    strategy = DeepspeedStrategy(cli_args.strategy_config(args))
    strategy.setup_distributed()
    setup_logging(strategy.rank)

    # 2. tokenizer and data (before the model: bad data fails in seconds)
    tokenizer = load_tokenizer(args.pretrain, use_fast=not args.disable_fast_tokenizer)
    apply_tokenizer_chat_template(tokenizer, args.tokenizer_chat_template)
    template = TemplateConfig(input_key=args.input_key, output_key=args.output_key,
                              input_template=args.input_template, apply_chat_template=args.apply_chat_template)
    if args.multiturn and args.pretrain_mode:
        raise UserError("--multiturn trains on assistant turns; --pretrain_mode on every token: choose one")
    build = partial(build_sft_dataset, tokenizer=tokenizer, cfg=template, max_len=args.max_len,
                    pretrain_mode=args.pretrain_mode, multiturn=args.multiturn)
    train_set, eval_set = load_datasets(args, build)

    # 3. model
    strategy.before_model_load()
    model = load_causal_lm(cli_args.model_config(args))
    fingerprint = model_fingerprint(model)

    # 4. prepare: engine with optimizer and schedule over the whole run
    engine = strategy.prepare(model, cli_args.optim_config(args),
                              steps_per_epoch(len(train_set), args.train_batch_size) * args.max_epochs)

    # 5. resume + fit
    collate = pack_collate if args.packing_samples else partial(pad_collate, pad_token_id=tokenizer.pad_token_id)
    trainer = Trainer(
        strategy, engine, SFTAlgorithm(engine, strategy.device, args.aux_loss_coef), train_set, collate,
        cli_args.loop_config(args, "sft"), cli_args.tracker_config(args),
        fingerprint, eval_set=eval_set, eval_collate=partial(pad_collate, pad_token_id=tokenizer.pad_token_id),
        ckpt_meta={"pretrain": args.pretrain}, tokenizer=tokenizer)
    trainer.fit()

    # 6. export
    save_model(strategy, engine, tokenizer, args.save_path)


if __name__ == "__main__":
    run(main)
