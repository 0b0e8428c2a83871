"""Batch inference: sample answers to prompts (Hugging Face generate or vLLM), or score answers with a reward model.

    deepspeed --module openrl_ckpt.cli.batch_inference --eval_task generate --pretrain SFT_DIR \
        --dataset prompts.jsonl --input_key prompt --best_of_n 4 --iter 0 --rollout_batch_size 1024 \
        --output_path gen.jsonl
    deepspeed --module openrl_ckpt.cli.batch_inference --eval_task rm --pretrain RM_DIR \
        --dataset gen.jsonl --post_processor iter_dpo --output_path pairs.jsonl

Exit status 3: --iter starts past the end of the data (nothing left to generate; the loop scripts
stop on it). Other user errors exit 2, with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import enum
import os
from collections.abc import Callable

from openrl_ckpt.cli.args import Parser, add_input_template_arg, bool_flag, check_unavailable_flags
from openrl_ckpt.cli.entry import run
from openrl_ckpt.errors import UserError
from openrl_ckpt.inference.jobs import run_generate, run_generate_vllm, run_rm, run_rm_remote, sampling_config
from openrl_ckpt.inference.postprocess import DEFAULT_REWARD_TEMPLATE, PostProcessor, check_reward_template
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy, StrategyConfig
from openrl_ckpt.utils.tracking import setup_logging


class EvalTask(str, enum.Enum):
    GENERATE = "generate"  # Hugging Face generate, any number of ranks
    GENERATE_VLLM = "generate_vllm"  # vLLM, one process
    RM = "rm"  # reward model scores, then --post_processor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="batch_inference", description=__doc__.splitlines()[0])
    p.add_argument("--eval_task", choices=[task.value for task in EvalTask], required=True)
    p.add_argument("--output_path", required=True, help="JSON-lines file, written atomically")
    g = p.add_argument_group("model")
    g.add_argument("--pretrain", default=None, help="policy (generate) or reward model (rm) folder or hub id")
    bool_flag(g, "--bf16", "bfloat16 weights")
    bool_flag(g, "--flash_attn", "use Flash Attention 2 (needs the flash-attn package)")
    g.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    g.add_argument("--zero_stage", type=int, default=0, help="3: weights partitioned over the ranks")
    g.add_argument("--micro_batch_size", type=int, default=16, help="rows per forward / generate call per rank")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    bool_flag(g, "--disable_fast_tokenizer", "load the tokenizer's slow (Python) implementation")
    bool_flag(g, "--full_determinism", "deterministic kernels everywhere (transformers' enable_full_determinism)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, help="comma-separated files, save_to_disk folders or hub names")
    g.add_argument("--dataset_probs", default=None, help="comma-separated mixing probabilities (default: equal)")
    g.add_argument("--dataset_split", default="train")
    g.add_argument("--max_samples", type=int, default=100_000_000, help="use at most this many rows")
    g.add_argument("--max_len", type=int, default=2048, help="max tokens of prompt + answer")
    g.add_argument("--input_key", default="input", help="prompt column (generate) or input column (rm)")
    g.add_argument("--output_key", default="output", help="answer column (rm)")
    add_input_template_arg(g, None)
    bool_flag(g, "--apply_chat_template", "render prompts with the tokenizer's chat template")
    bool_flag(g, "--use_ms", "load hub models and datasets from ModelScope (needs modelscope and its hub)")
    g.add_argument("--tokenizer_chat_template", default=None, help="a Jinja chat template, or a file holding one")
    g = p.add_argument_group("generate, generate_vllm")
    g.add_argument("--prompt_max_len", type=int, default=1024, help="longer prompts are skipped (counted)")
    g.add_argument("--max_new_tokens", type=int, default=1024)
    g.add_argument("--best_of_n", type=int, default=None, help="answers per prompt (default 1)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--top_k", type=int, default=0, help="0: off")
    bool_flag(g, "--greedy_sampling", "greedy decoding (one answer per prompt makes sense)")
    g.add_argument("--repetition_penalty", type=float, default=1.0, help="1.0: off; > 1 discourages repeats")
    bool_flag(g, "--enable_csft", "conditional SFT: end every prompt with --csft_prompt (the score to condition on)")
    g.add_argument("--csft_prompt", default="<rm_score>: 5.00", help="with --enable_csft")
    g.add_argument("--iter", type=int, default=None, help="use rows [iter*R, (iter+1)*R) of the data, "
                   "R = --rollout_batch_size; past the end: exit status 3")
    g.add_argument("--rollout_batch_size", type=int, default=2048, help="prompts per --iter")
    g.add_argument("--tp_size", type=int, default=1, help="generate_vllm: tensor-parallel GPUs")
    bool_flag(g, "--enable_prefix_caching", "generate_vllm: reuse the KV cache of shared prompt prefixes")
    g.add_argument("--max_num_seqs", type=int, default=256, help="generate_vllm: sequences per vLLM step")
    g = p.add_argument_group("rm")
    g.add_argument("--value_head_prefix", "--head_prefix", dest="value_head_prefix", default="score",
                   help="name of the reward head's weights")
    bool_flag(g, "--normalize_reward", "apply the reward mean/std stored in the model by train_rm --normalize_reward")
    g.add_argument("--remote_rm_url", default=None, help="URL[,URL] of reward servers (serve_rm) instead of "
                   "--pretrain; their rewards are averaged")
    g.add_argument("--remote_rm_timeout", type=float, default=60.0, help="seconds per reward request")
    g.add_argument("--remote_rm_retries", type=int, default=5, help="tries after a failed request (the pause "
                   "doubles from 1 s)")
    g.add_argument("--post_processor", choices=[processor.value for processor in PostProcessor], default=None,
                   help="rs: best answer per input; ca (csft): reward written into the input; "
                   "iter_dpo: best and worst answer per input as a DPO pair")
    g.add_argument("--reward_template", default=DEFAULT_REWARD_TEMPLATE, help="ca: how the reward enters the input")
    bool_flag(g, "--ca_normalize_reward", "ca: standardise the rewards over this file before writing them in")
    args = p.parse_args(argv)
    # converted once: the code compares members, the flags keep their spellings
    args.eval_task = EvalTask(args.eval_task)
    args.post_processor = None if args.post_processor is None else PostProcessor(args.post_processor)
    return args


def check_args(args: argparse.Namespace) -> None:
    generating = args.eval_task is not EvalTask.RM
    check_unavailable_flags(use_ms=args.use_ms)
    remote = args.remote_rm_url is not None
    if remote and args.eval_task is not EvalTask.RM:
        raise UserError(f"--remote_rm_url scores with --eval_task rm, not {args.eval_task.value}")
    if remote and args.pretrain is not None:
        raise UserError("--remote_rm_url replaces --pretrain: give one of the two")
    if not remote and args.pretrain is None:
        raise UserError("--pretrain is required (a policy for generate, a reward model for rm)")
    if remote and args.normalize_reward:
        raise UserError("--normalize_reward applies a local reward model's statistics; a reward server normalises "
                        "itself (serve_rm --normalize_reward)")
    if args.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"--zero_stage must be 0, 1, 2 or 3, got {args.zero_stage}")
    if args.micro_batch_size < 1:
        raise UserError(f"--micro_batch_size must be at least 1, got {args.micro_batch_size}")
    if args.max_len < 2:
        raise UserError(f"--max_len must be at least 2, got {args.max_len}")
    if args.best_of_n is not None and args.best_of_n < 1:
        raise UserError(f"--best_of_n must be at least 1, got {args.best_of_n}")
    if args.post_processor is PostProcessor.ITER_DPO and args.best_of_n is not None and args.best_of_n < 2:
        raise UserError(f"--post_processor iter_dpo compares several answers per input: --best_of_n {args.best_of_n} "
                        "gives one (generate with --best_of_n 2 or more)")
    if generating:
        sampling_config(args).check()
        if args.prompt_max_len < 1:
            raise UserError(f"--prompt_max_len must be at least 1, got {args.prompt_max_len}")
        if args.post_processor is not None:
            raise UserError(f"--post_processor applies to --eval_task rm, not {args.eval_task.value}")
    elif args.iter is not None:
        raise UserError("--iter selects prompts for --eval_task generate/generate_vllm, not rm")
    if args.post_processor in (PostProcessor.CA, PostProcessor.CSFT):
        check_reward_template(args.reward_template)


def inference_strategy(args: argparse.Namespace) -> DeepspeedStrategy:
    # the launcher's world size: inference has no optimizer step, so the "global batch" is one micro batch per rank
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DeepspeedStrategy(StrategyConfig(seed=args.seed, zero_stage=args.zero_stage, bf16=args.bf16,
                                            micro_train_batch_size=args.micro_batch_size,
                                            train_batch_size=args.micro_batch_size * world,
                                            full_determinism=args.full_determinism))


JOBS: dict[EvalTask, Callable[[argparse.Namespace], None]] = {
    EvalTask.GENERATE: lambda args: run_generate(args, inference_strategy(args)),
    EvalTask.GENERATE_VLLM: run_generate_vllm,  # one process and no strategy: vLLM places the model itself
    EvalTask.RM: lambda args: run_rm_remote(args) if args.remote_rm_url else run_rm(args, inference_strategy(args)),
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_args(args)
    setup_logging(int(os.environ.get("RANK", "0")))
    JOBS[args.eval_task](args)


if __name__ == "__main__":
    run(main)
