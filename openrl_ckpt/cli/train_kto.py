"""Kahneman-Tversky optimisation on paired or unpaired (--unpaired_preference) feedback.

    deepspeed --module openrl_ckpt.cli.train_kto --pretrain SFT_DIR --dataset feedback.jsonl --unpaired_preference \
        --input_key prompt --output_key completion --label_key label --beta 0.1 --save_steps 50 --load_checkpoint
"""

from __future__ import annotations

import argparse
import logging
from functools import partial

from openrl_ckpt.cli import args as cli_args
from openrl_ckpt.cli.entry import run
from openrl_ckpt.data.collate import kto_collate, pair_collate
from openrl_ckpt.data.loading import load_datasets
from openrl_ckpt.data.preference_dataset import LabelledConfig, build_kto_rows, build_preference_dataset
from openrl_ckpt.data.sampler import steps_per_epoch
from openrl_ckpt.data.templates import apply_tokenizer_chat_template
from openrl_ckpt.errors import UserError
from openrl_ckpt.models.actor import load_causal_lm, load_tokenizer, model_fingerprint
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy
from openrl_ckpt.strategy.hf import save_model
from openrl_ckpt.trainers.base import Trainer
from openrl_ckpt.trainers.common import load_frozen
from openrl_ckpt.trainers.kto import KTOAlgorithm
from openrl_ckpt.utils.tracking import setup_logging

log = logging.getLogger("openrl_ckpt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli_args.Parser(prog="train_kto", description=__doc__.splitlines()[0])
    cli_args.add_model_args(p)
    cli_args.add_data_args(p, input_template_default=cli_args.DEFAULT_INPUT_TEMPLATE)
    cli_args.add_preference_args(p)
    cli_args.add_train_args(p)
    cli_args.add_ckpt_args(p, default_ckpt="./ckpt/checkpoints_kto")
    cli_args.add_logging_args(p)
    cli_args.add_reference_args(p)
    g = p.add_argument_group("kto")
    cli_args.bool_flag(g, "--unpaired_preference", "rows of (--input_key, --output_key, --label_key) instead of "
                       "pairs; implied by --output_key or by data without a --chosen_key column")
    g.add_argument("--label_key", default="label", help="true/1: desirable answer, false/0: undesirable")
    cli_args.bool_flag(g, "--vanilla_loss", "paired batches: each side's reference point is the other side's KL")
    g.add_argument("--desirable_loss_weight", type=float, default=1.0)
    g.add_argument("--undesirable_loss_weight", type=float, default=1.0)
    p.set_defaults(max_epochs=1, learning_rate=1e-5, beta=0.01)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.beta <= 0:
        raise UserError(f"--beta must be positive, got {args.beta}")
    unpaired = args.unpaired_preference or args.output_key is not None
    if unpaired and args.vanilla_loss:
        raise UserError("--vanilla_loss needs paired data (chosen and rejected answers); drop "
                        f"{'--unpaired_preference' if args.unpaired_preference else '--output_key'}")
    if args.unpaired_preference and args.output_key is None:
        raise UserError("--unpaired_preference needs --output_key (the answer) and --label_key")

    # 1. strategy: process group and batch arithmetic
    strategy = DeepspeedStrategy(cli_args.strategy_config(args))
    strategy.setup_distributed()
    setup_logging(strategy.rank)
    if not args.vanilla_loss and args.micro_train_batch_size == 1:
        log.warning("--micro_train_batch_size 1: each prompt's KL estimate pairs it with its own answer; "
                    "2 or more give a mismatched pair")

    # 2. tokenizer and rows (before the models: bad data fails in seconds)
    tokenizer = load_tokenizer(args.pretrain, use_fast=not args.disable_fast_tokenizer)
    apply_tokenizer_chat_template(tokenizer, args.tokenizer_chat_template)
    if args.vanilla_loss:  # pairs: B desirable and B undesirable answers in every batch
        build = partial(build_preference_dataset, tokenizer=tokenizer, cfg=cli_args.preference_config(args),
                        max_len=args.max_len)
        collate = partial(pair_collate, pad_token_id=tokenizer.pad_token_id, packing=args.packing_samples)
    else:
        rows = LabelledConfig(input_key=args.input_key, output_key=args.output_key, label_key=args.label_key,
                              input_template=args.input_template, apply_chat_template=args.apply_chat_template)
        build = partial(build_kto_rows, tokenizer=tokenizer, pairs=cli_args.preference_config(args), rows=rows,
                        unpaired=unpaired, max_len=args.max_len)
        collate = partial(kto_collate, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          max_len=args.max_len, packing=args.packing_samples)
    train_set, eval_set = load_datasets(args, build)
    if not args.vanilla_loss:
        log.info("train data: %d desirable and %d undesirable answers", train_set.num_desirable,
                 len(train_set) - train_set.num_desirable)

    # 3. policy and frozen reference (not checkpointed: reloaded from --ref_pretrain, checked on resume)
    strategy.before_model_load()
    model = load_causal_lm(cli_args.model_config(args))
    fingerprint = model_fingerprint(model)
    reference, reference_id = load_frozen(cli_args.model_config(args, pretrain=args.ref_pretrain or args.pretrain),
                                             strategy, offload=args.ref_offload)
    engine = strategy.prepare(model, cli_args.optim_config(args),
                              steps_per_epoch(len(train_set), args.train_batch_size) * args.max_epochs)

    # 4. resume + fit
    algo = KTOAlgorithm(engine, reference, strategy.device, beta=args.beta,
                        desirable_weight=args.desirable_loss_weight, undesirable_weight=args.undesirable_loss_weight,
                        vanilla=args.vanilla_loss, mean_over_ranks=lambda v: strategy.all_reduce({"v": v})["v"],
                        reference_identity=reference_id)
    trainer = Trainer(strategy, engine, algo, train_set, collate, cli_args.loop_config(args, "kto"),
                      cli_args.tracker_config(args), fingerprint, eval_set=eval_set,
                      eval_collate=partial(collate, packing=False),
                      ckpt_meta={"pretrain": args.pretrain, "ref_pretrain": reference_id["path"]}, tokenizer=tokenizer)
    trainer.fit()

    # 5. export
    save_model(strategy, engine, tokenizer, args.save_path)


if __name__ == "__main__":
    run(main)
