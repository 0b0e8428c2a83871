"""Direct preference optimisation (DPO; IPO with --ipo, cDPO with --label_smoothing).

    deepspeed --module openrl_ckpt.cli.train_dpo --pretrain SFT_DIR --dataset pairs.jsonl \
        --prompt_key prompt --chosen_key chosen --rejected_key rejected --beta 0.1 --save_steps 50 --load_checkpoint
"""

from __future__ import annotations

import argparse
import logging
from functools import partial

from openrl_ckpt.cli import args as cli_args
from openrl_ckpt.cli.entry import run
from openrl_ckpt.data.collate import pair_collate
from openrl_ckpt.data.loading import load_datasets
from openrl_ckpt.data.preference_dataset import build_preference_dataset
from openrl_ckpt.data.sampler import steps_per_epoch
from openrl_ckpt.data.templates import apply_tokenizer_chat_template
from openrl_ckpt.errors import UserError
from openrl_ckpt.models.actor import load_causal_lm, load_tokenizer, model_fingerprint
from openrl_ckpt.models.loss import dpo_loss, ipo_loss
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy
from openrl_ckpt.strategy.hf import save_model
from openrl_ckpt.trainers.base import Trainer
from openrl_ckpt.trainers.common import load_frozen
from openrl_ckpt.trainers.dpo import DPOAlgorithm
from openrl_ckpt.utils.tracking import setup_logging

log = logging.getLogger("openrl_ckpt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli_args.Parser(prog="train_dpo", description=__doc__.splitlines()[0])
    cli_args.add_model_args(p)
    cli_args.add_data_args(p)
    cli_args.add_preference_args(p)
    cli_args.add_train_args(p)
    cli_args.add_ckpt_args(p, default_ckpt="./ckpt/checkpoints_dpo")
    cli_args.add_logging_args(p)
    cli_args.add_reference_args(p)
    g = p.add_argument_group("dpo")
    cli_args.bool_flag(g, "--ipo", "IPO loss: (h - 1/(2 beta))^2 on per-token average log-probabilities")
    g.add_argument("--label_smoothing", type=float, default=0.0, help="cDPO: assumed rate of flipped labels")
    g.add_argument("--nll_loss_coef", type=float, default=0.0, help="weight of an NLL loss on chosen answers")
    p.set_defaults(max_epochs=1, learning_rate=1e-5, max_len=512)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.beta <= 0:
        raise UserError(f"--beta must be positive, got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        raise UserError(f"--label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.ipo and args.label_smoothing:
        raise UserError("--label_smoothing (cDPO) applies to the sigmoid DPO loss, not to --ipo")
    loss = partial(ipo_loss, beta=args.beta) if args.ipo else partial(
        dpo_loss, beta=args.beta, label_smoothing=args.label_smoothing)

    # 1. strategy: process group and batch arithmetic
    strategy = DeepspeedStrategy(cli_args.strategy_config(args))
    strategy.setup_distributed()
    setup_logging(strategy.rank)

    # 2. tokenizer and pairs (before the models: bad data fails in seconds)
    tokenizer = load_tokenizer(args.pretrain, use_fast=not args.disable_fast_tokenizer)
    apply_tokenizer_chat_template(tokenizer, args.tokenizer_chat_template)
    build = partial(build_preference_dataset, tokenizer=tokenizer, cfg=cli_args.preference_config(args),
                    max_len=args.max_len)
    train_set, eval_set = load_datasets(args, build)

    # 3. policy and frozen reference (not checkpointed: reloaded from --ref_pretrain, checked on resume)
    strategy.before_model_load()
    model = load_causal_lm(cli_args.model_config(args))
    fingerprint = model_fingerprint(model)
    reference, reference_id = load_frozen(cli_args.model_config(args, pretrain=args.ref_pretrain or args.pretrain),
                                             strategy, offload=args.ref_offload)
    engine = strategy.prepare(model, cli_args.optim_config(args),
                              steps_per_epoch(len(train_set), args.train_batch_size) * args.max_epochs)

    # 4. resume + fit
    algo = DPOAlgorithm(engine, reference, strategy.device, loss, beta=args.beta, average_logps=args.ipo,
                        nll_loss_coef=args.nll_loss_coef, reference_identity=reference_id)
    trainer = Trainer(
        strategy, engine, algo, train_set,
        partial(pair_collate, pad_token_id=tokenizer.pad_token_id, packing=args.packing_samples),
        cli_args.loop_config(args, "dpo"), cli_args.tracker_config(args), fingerprint,
        eval_set=eval_set, eval_collate=partial(pair_collate, pad_token_id=tokenizer.pad_token_id),
        ckpt_meta={"pretrain": args.pretrain, "ref_pretrain": reference_id["path"]}, tokenizer=tokenizer)
    trainer.fit()

    # 5. export
    save_model(strategy, engine, tokenizer, args.save_path)


if __name__ == "__main__":
    run(main)
