"""Merge a LoRA adapter into its base model: a plain Hugging Face folder that loads without PEFT.

    python -m openrl_ckpt.cli.lora_combiner --base BASE_DIR --lora ADAPTER_DIR --output OUT_DIR [--is_rm]

The adapter is what a LoRA run writes to --save_path (or `ckpt export` of a LoRA checkpoint). The merge
is done in fp32 and the result is saved in --dtype (default: the base model's dtype).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from openrl_ckpt.cli.args import Parser
from openrl_ckpt.cli.entry import run
from openrl_ckpt.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="lora_combiner", description=__doc__.splitlines()[0])
    p.add_argument("--base", "--model_path", dest="base", required=True, help="the base model folder (the run's "
                   "--pretrain)")
    p.add_argument("--lora", "--lora_path", dest="lora", required=True, help="the PEFT adapter folder")
    p.add_argument("--output", "--output_path", dest="output", required=True, help="a new folder for the merged model")
    p.add_argument("--is_rm", action="store_true", help="the base and adapter are a reward model's")
    p.add_argument("--value_head_prefix", default="score", help="the reward model's head (with --is_rm)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: the base model's")
    p.add_argument("--bf16", action="store_const", const="bf16", dest="dtype", help="the same as --dtype bf16")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from openrl_ckpt.models.export import atomic_output, merge_lora, quiet_progress_bars
    from openrl_ckpt.strategy.hf import DTYPES

    quiet_progress_bars()

    lora = Path(args.lora)
    if not lora.is_dir():
        raise UserError(f"--lora {lora}: no such directory")
    with atomic_output(args.output) as tmp:
        merge_lora(args.base, lora, tmp, dtype=DTYPES[args.dtype] if args.dtype else None, is_rm=args.is_rm,
                   head_prefix=args.value_head_prefix)
    print(f"wrote the merged model to {args.output}")


if __name__ == "__main__":
    run(main)
