"""Knowledge distillation: SFT with a frozen teacher's token distributions.

    deepspeed --module openrl_ckpt.cli.train_kd --pretrain STUDENT --teacher_model TEACHER --dataset data.jsonl \
        --input_key question --output_key response --kd_coef 0.4 --save_steps 50 --load_checkpoint
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
from openrl_ckpt.models.loss import kd_forward_loss, kd_reverse_loss
from openrl_ckpt.models.tokenizers import tokenizer_difference
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy
from openrl_ckpt.strategy.hf import save_model
from openrl_ckpt.trainers.base import Trainer
from openrl_ckpt.trainers.common import load_frozen
from openrl_ckpt.trainers.kd import KDAlgorithm
from openrl_ckpt.utils.tracking import setup_logging

log = logging.getLogger("openrl_ckpt")

KD_LOSSES = {"forward": kd_forward_loss, "reverse": kd_reverse_loss}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli_args.Parser(prog="train_kd", description=__doc__.splitlines()[0])
    cli_args.add_model_args(p)
    cli_args.add_data_args(p, input_template_default=cli_args.DEFAULT_INPUT_TEMPLATE)
    cli_args.add_train_args(p)
    cli_args.add_ckpt_args(p, default_ckpt="./ckpt/checkpoints_kd")
    cli_args.add_logging_args(p)
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher_model", required=True, help="frozen teacher (must share the student's tokenizer)")
    cli_args.bool_flag(g, "--teacher_offload", "keep the teacher on the CPU between uses")
    g.add_argument("--kd_coef", type=float, default=0.4, help="loss = (1 - kd_coef) * SFT + kd_coef * KD")
    g.add_argument("--kd_loss", choices=sorted(KD_LOSSES), default="forward",
                   help="forward: cross-entropy against the teacher's distribution; reverse: KL(student || teacher)")
    cli_args.bool_flag(g, "--pretrain_mode", "continued pre-training: loss on every token, --output_key optional")
    p.set_defaults(max_epochs=1, output_key="output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not 0 <= args.kd_coef <= 1:
        raise UserError(f"--kd_coef must be in [0, 1], got {args.kd_coef}")

    # 1. strategy: process group and batch arithmetic
    strategy = DeepspeedStrategy(cli_args.strategy_config(args))
    strategy.setup_distributed()
    setup_logging(strategy.rank)

    # 2. tokenizers (one, shared by student and teacher) and data
    tokenizer = load_tokenizer(args.pretrain, use_fast=not args.disable_fast_tokenizer)
    difference = tokenizer_difference(tokenizer, load_tokenizer(args.teacher_model))
    if difference:
        raise UserError(f"--teacher_model {args.teacher_model}: its tokenizer differs from --pretrain's "
                        f"({difference}); distillation compares token distributions, so both must share one")
    apply_tokenizer_chat_template(tokenizer, args.tokenizer_chat_template)
    template = TemplateConfig(input_key=args.input_key, output_key=args.output_key,
                              input_template=args.input_template, apply_chat_template=args.apply_chat_template)
    build = partial(build_sft_dataset, tokenizer=tokenizer, cfg=template, max_len=args.max_len,
                    pretrain_mode=args.pretrain_mode)
    train_set, eval_set = load_datasets(args, build)

    # 3. student and frozen teacher (not checkpointed: reloaded from --teacher_model, checked on resume)
    strategy.before_model_load()
    model = load_causal_lm(cli_args.model_config(args))
    fingerprint = model_fingerprint(model)
    teacher, teacher_id = load_frozen(cli_args.model_config(args, pretrain=args.teacher_model), strategy,
                                      offload=args.teacher_offload)
    engine = strategy.prepare(model, cli_args.optim_config(args),
                              steps_per_epoch(len(train_set), args.train_batch_size) * args.max_epochs)

    # 4. resume + fit
    collate = pack_collate if args.packing_samples else partial(pad_collate, pad_token_id=tokenizer.pad_token_id)
    algo = KDAlgorithm(engine, teacher, strategy.device, KD_LOSSES[args.kd_loss], args.kd_coef, teacher_id)
    trainer = Trainer(strategy, engine, algo, train_set, collate, cli_args.loop_config(args, "kd"),
                      cli_args.tracker_config(args), fingerprint, eval_set=eval_set,
                      eval_collate=partial(pad_collate, pad_token_id=tokenizer.pad_token_id),
                      ckpt_meta={"pretrain": args.pretrain, "teacher_model": teacher_id["path"]}, tokenizer=tokenizer)
    trainer.fit()

    # 5. export
    save_model(strategy, engine, tokenizer, args.save_path)


if __name__ == "__main__":
    run(main)
