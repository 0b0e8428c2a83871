"""Reward model training on preference pairs.

    deepspeed --module openrl_ckpt.cli.train_rm --pretrain SFT_DIR --dataset pairs.jsonl \
        --prompt_key prompt --chosen_key chosen --rejected_key rejected --save_steps 50 --load_checkpoint
"""

from __future__ import annotations

import argparse
import logging
import math
from functools import partial

from openrl_ckpt.cli import args as cli_args
from openrl_ckpt.cli.entry import run
from openrl_ckpt.data.collate import pair_collate
from openrl_ckpt.data.loading import load_datasets
from openrl_ckpt.data.preference_dataset import build_preference_dataset
from openrl_ckpt.data.sampler import steps_per_epoch
from openrl_ckpt.data.templates import apply_tokenizer_chat_template
from openrl_ckpt.errors import UserError
from openrl_ckpt.models.actor import load_tokenizer, model_fingerprint
from openrl_ckpt.models.loss import pairwise_logexp_loss, pairwise_sigmoid_loss
from openrl_ckpt.models.reward import load_reward_model, set_reward_normalization
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy
from openrl_ckpt.strategy.hf import save_model
from openrl_ckpt.trainers.base import Trainer
from openrl_ckpt.trainers.rm import RewardModelAlgorithm
from openrl_ckpt.utils.tracking import setup_logging

log = logging.getLogger("openrl_ckpt")

LOSSES = {"sigmoid": pairwise_sigmoid_loss, "logexp": pairwise_logexp_loss}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli_args.Parser(prog="train_rm", description=__doc__.splitlines()[0])
    cli_args.add_model_args(p)
    cli_args.add_data_args(p)
    cli_args.add_preference_args(p)
    cli_args.add_train_args(p)
    cli_args.add_ckpt_args(p, default_ckpt="./ckpt/checkpoints_rm")
    cli_args.add_logging_args(p)
    g = p.add_argument_group("reward model")
    g.add_argument("--value_head_prefix", "--head_prefix", dest="value_head_prefix", default="score",
                   help="name of the reward head's weights")
    g.add_argument("--loss", choices=sorted(LOSSES), default="sigmoid",
                   help="sigmoid: -log sigmoid(c - r - margin); logexp: log(1 + exp(r - c + margin))")
    cli_args.bool_flag(g, "--compute_fp32_loss", "compute the loss on fp32 rewards (with --bf16)")
    cli_args.bool_flag(g, "--normalize_reward", "store the eval set's reward mean and std in the saved model")
    cli_args.bool_flag(g, "--margin_loss", "subtract each pair's 'margin' column from the reward gap in the loss")
    p.set_defaults(max_epochs=1, learning_rate=9e-6, micro_train_batch_size=1, max_len=512)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.normalize_reward and not args.eval_dataset:
        raise UserError("--normalize_reward needs --eval_dataset: the reward mean and std are computed on it")

    # 1. strategy: process group and batch arithmetic
    strategy = DeepspeedStrategy(cli_args.strategy_config(args))
    strategy.setup_distributed()
    setup_logging(strategy.rank)

    # 2. tokenizer and pairs (before the model: bad data fails in seconds)
    tokenizer = load_tokenizer(args.pretrain, use_fast=not args.disable_fast_tokenizer)
    apply_tokenizer_chat_template(tokenizer, args.tokenizer_chat_template)
    build = partial(build_preference_dataset, tokenizer=tokenizer, cfg=cli_args.preference_config(args),
                    max_len=args.max_len)
    train_set, eval_set = load_datasets(args, build)

    # 3. model: the backbone of --pretrain with a scalar head
    strategy.before_model_load()
    model = load_reward_model(cli_args.model_config(args), args.value_head_prefix, require_head=False)
    fingerprint = model_fingerprint(model)
    engine = strategy.prepare(model, cli_args.optim_config(args),
                              steps_per_epoch(len(train_set), args.train_batch_size) * args.max_epochs)

    # 4. resume + fit
    collate = partial(pair_collate, pad_token_id=tokenizer.pad_token_id, packing=args.packing_samples)
    trainer = Trainer(
        strategy, engine, RewardModelAlgorithm(engine, strategy.device, LOSSES[args.loss], args.compute_fp32_loss,
                                               margin_loss=args.margin_loss),
        train_set, collate, cli_args.loop_config(args, "rm"), cli_args.tracker_config(args), fingerprint,
        eval_set=eval_set, eval_collate=partial(pair_collate, pad_token_id=tokenizer.pad_token_id),
        ckpt_meta={"pretrain": args.pretrain}, tokenizer=tokenizer)
    trainer.fit()

    # 5. reward statistics of the final model, then export
    if args.normalize_reward:
        stats = trainer.evaluate()
        mean = stats["eval_reward_mean"]
        std = math.sqrt(max(stats["eval_reward_sq"] - mean**2, 0.0))
        set_reward_normalization(engine.module, mean, std)
        log.info("--normalize_reward: reward mean %.4g, std %.4g on %s, stored in the model config", mean, std,
                 args.eval_dataset)
    save_model(strategy, engine, tokenizer, args.save_path)


if __name__ == "__main__":
    run(main)
