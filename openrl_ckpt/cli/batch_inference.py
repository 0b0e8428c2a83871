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

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from openrl_ckpt.cli import args as A
from openrl_ckpt.cli.entry import run
from openrl_ckpt.data.loading import load_blended_dataset
from openrl_ckpt.data.preference_dataset import check_columns
from openrl_ckpt.data.templates import (TemplateConfig, apply_tokenizer_chat_template, check_input_template,
                                        render_prompt, row_text)
from openrl_ckpt.errors import UserError
from openrl_ckpt.inference import batching as B
from openrl_ckpt.inference import postprocess as P
from openrl_ckpt.inference.generation import SamplingConfig, generate
from openrl_ckpt.inference.output import check_output_path, write_jsonl_atomic
from openrl_ckpt.models.actor import ModelConfig, load_causal_lm, load_tokenizer
from openrl_ckpt.models.reward import load_reward_model
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy, StrategyConfig
from openrl_ckpt.utils.tracking import setup_logging

log = logging.getLogger("openrl_ckpt")

TASKS = ("generate", "generate_vllm", "rm")


def parse_args(argv: list[str] | None = None) -> A.argparse.Namespace:
    p = A.Parser(prog="batch_inference", description=__doc__.splitlines()[0])
    p.add_argument("--eval_task", choices=TASKS, required=True)
    p.add_argument("--output_path", required=True, help="JSON-lines file, written atomically")
    g = p.add_argument_group("model")
    g.add_argument("--pretrain", required=True, help="policy (generate) or reward model (rm) folder or hub id")
    A.bool_flag(g, "--bf16", "bfloat16 weights")
    A.bool_flag(g, "--flash_attn", "use Flash Attention 2 (needs the flash-attn package)")
    g.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    g.add_argument("--zero_stage", type=int, default=0, help="3: weights partitioned over the ranks")
    g.add_argument("--micro_batch_size", type=int, default=16, help="rows per forward / generate call per rank")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, help="comma-separated files, save_to_disk folders or hub names")
    g.add_argument("--dataset_probs", default=None, help="comma-separated mixing probabilities")
    g.add_argument("--dataset_split", default="train")
    g.add_argument("--max_samples", type=int, default=None, help="use at most this many rows")
    g.add_argument("--max_len", type=int, default=2048, help="max tokens of prompt + answer")
    g.add_argument("--input_key", default="input", help="prompt column (generate) or input column (rm)")
    g.add_argument("--output_key", default="output", help="answer column (rm)")
    g.add_argument("--input_template", default=None, help="e.g. 'User: {}\\nAssistant: '")
    A.bool_flag(g, "--apply_chat_template", "render prompts with the tokenizer's chat template")
    g.add_argument("--tokenizer_chat_template", default=None, help="a Jinja chat template, or a file holding one")
    g = p.add_argument_group("generate, generate_vllm")
    g.add_argument("--prompt_max_len", type=int, default=1024, help="longer prompts are skipped (counted)")
    g.add_argument("--max_new_tokens", type=int, default=1024)
    g.add_argument("--best_of_n", type=int, default=None, help="answers per prompt (default 1)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--top_k", type=int, default=0, help="0: off")
    A.bool_flag(g, "--greedy_sampling", "greedy decoding (one answer per prompt makes sense)")
    g.add_argument("--iter", type=int, default=None, help="use rows [iter*R, (iter+1)*R) of the data, "
                   "R = --rollout_batch_size; past the end: exit status 3")
    g.add_argument("--rollout_batch_size", type=int, default=None, help="prompts per --iter")
    g.add_argument("--tp_size", type=int, default=1, help="generate_vllm: tensor-parallel GPUs")
    A.bool_flag(g, "--enable_prefix_caching", "generate_vllm: reuse the KV cache of shared prompt prefixes")
    g.add_argument("--max_num_seqs", type=int, default=256, help="generate_vllm: sequences per vLLM step")
    g = p.add_argument_group("rm")
    g.add_argument("--value_head_prefix", "--head_prefix", dest="value_head_prefix", default="score",
                   help="name of the reward head's weights")
    A.bool_flag(g, "--normalize_reward", "apply the reward mean/std stored in the model by train_rm --normalize_reward")
    g.add_argument("--post_processor", choices=P.POST_PROCESSORS, default=None,
                   help="rs: best answer per input; ca (csft): reward written into the input; "
                   "iter_dpo: best and worst answer per input as a DPO pair")
    g.add_argument("--reward_template", default=P.DEFAULT_REWARD_TEMPLATE, help="ca: how the reward enters the input")
    A.bool_flag(g, "--ca_normalize_reward", "ca: standardise the rewards over this file before writing them in")
    return p.parse_args(argv)


def check_args(args: A.argparse.Namespace) -> None:
    generating = args.eval_task != "rm"
    check_input_template(args.input_template)
    if args.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"--zero_stage must be 0, 1, 2 or 3, got {args.zero_stage}")
    if args.micro_batch_size < 1:
        raise UserError(f"--micro_batch_size must be at least 1, got {args.micro_batch_size}")
    if args.max_len < 2:
        raise UserError(f"--max_len must be at least 2, got {args.max_len}")
    if args.best_of_n is not None and args.best_of_n < 1:
        raise UserError(f"--best_of_n must be at least 1, got {args.best_of_n}")
    if args.post_processor == "iter_dpo" and args.best_of_n is not None and args.best_of_n < 2:
        raise UserError(f"--post_processor iter_dpo compares several answers per input: --best_of_n {args.best_of_n} "
                        "gives one (generate with --best_of_n 2 or more)")
    if generating:
        sampling_config(args).check()
        if args.prompt_max_len < 1:
            raise UserError(f"--prompt_max_len must be at least 1, got {args.prompt_max_len}")
        if args.post_processor is not None:
            raise UserError(f"--post_processor applies to --eval_task rm, not {args.eval_task}")
    elif args.iter is not None or args.rollout_batch_size is not None:
        raise UserError("--iter and --rollout_batch_size select prompts for --eval_task generate/generate_vllm, not rm")
    if args.post_processor in ("ca", "csft"):
        P.check_reward_template(args.reward_template)


def sampling_config(args: A.argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, greedy=args.greedy_sampling)


def model_config(args: A.argparse.Namespace) -> ModelConfig:
    return ModelConfig(pretrain=args.pretrain, bf16=args.bf16, flash_attn=args.flash_attn,
                       attn_implementation=args.attn_implementation)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_args(args)
    setup_logging(int(os.environ.get("RANK", "0")))
    if args.eval_task == "generate_vllm":
        run_generate_vllm(args)
        return
    # the launcher's world size: inference has no optimizer step, so the "global batch" is one micro batch per rank
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = DeepspeedStrategy(StrategyConfig(seed=args.seed, zero_stage=args.zero_stage, bf16=args.bf16,
                                                micro_train_batch_size=args.micro_batch_size,
                                                train_batch_size=args.micro_batch_size * world))
    if args.eval_task == "generate":
        run_generate(args, strategy)
    else:
        run_rm(args, strategy)


# ---------------------------------------------------------------------------- prompts


@dataclass
class Prompts:
    """The selected prompts that fit, as text and token ids, and the answer budget of each."""

    texts: list[str]
    ids: list[list[int]]
    max_new: list[int]  # min(--max_new_tokens, --max_len - prompt length)
    iteration: int


def load_prompts(args: A.argparse.Namespace, tokenizer: Any) -> Prompts:
    raw = load_blended_dataset(args.dataset, args.dataset_probs, seed=args.seed, max_samples=args.max_samples,
                               split=args.dataset_split)
    check_columns(raw, {"--input_key": args.input_key}, args.dataset)
    rows = B.select_rows(len(raw), args.iter, args.rollout_batch_size)
    template = TemplateConfig(input_key=args.input_key, output_key=None, input_template=args.input_template,
                              apply_chat_template=args.apply_chat_template)
    texts = [render_prompt(raw[i], template, tokenizer, where=f"{args.dataset} row {i + 1}") for i in rows]
    ids = tokenizer(texts, add_special_tokens=not args.apply_chat_template, return_attention_mask=False)["input_ids"]
    limit = min(args.prompt_max_len, args.max_len - 1)
    keep = [i for i, x in enumerate(ids) if 0 < len(x) <= limit]
    if len(keep) < len(ids):
        log.warning("%d of %d prompts are empty or longer than %d tokens (--prompt_max_len %d, --max_len %d) and "
                    "are skipped", len(ids) - len(keep), len(ids), limit, args.prompt_max_len, args.max_len)
    if not keep:
        raise UserError(f"{args.dataset}: all {len(ids)} selected prompts are empty or longer than {limit} tokens "
                        f"(--prompt_max_len {args.prompt_max_len}, --max_len {args.max_len})")
    log.info("prompts: rows [%d, %d) of %d%s, %d kept", rows.start, rows.stop, len(raw),
             f" (--iter {args.iter})" if args.iter is not None else "", len(keep))
    return Prompts(texts=[texts[i] for i in keep], ids=[ids[i] for i in keep],
                   max_new=[min(args.max_new_tokens, args.max_len - len(ids[i])) for i in keep],
                   iteration=args.iter or 0)


def left_pad(seqs: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s):] = 1
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------- generate


def run_generate(args: A.argparse.Namespace, strategy: DeepspeedStrategy) -> None:
    best_of_n = args.best_of_n or 1
    tokenizer = load_tokenizer(args.pretrain, padding_side="left")
    apply_tokenizer_chat_template(tokenizer, args.tokenizer_chat_template)
    prompts = load_prompts(args, tokenizer)  # bad data fails here, before the process group
    strategy.setup_distributed()
    on_rank_0(strategy, lambda: check_output_path(args.output_path))

    strategy.before_model_load()
    engine = strategy.prepare_frozen(load_causal_lm(model_config(args))).module
    sampling = sampling_config(args)
    n_items = len(prompts.texts) * best_of_n
    n_batches = B.num_batches(n_items, args.micro_batch_size)
    mine = B.rank_batches(n_batches, strategy.world_size, strategy.rank)
    # ZeRO-3 gathers the weights in every forward pass: all ranks make the same number of generate calls
    collective = args.zero_stage == 3 and strategy.world_size > 1
    calls = B.calls_per_rank(n_batches, strategy.world_size) if collective else len(mine)
    log.info("generate: %d prompts x best_of_n %d = %d answers in %d micro batches of %d over %d rank(s)",
             len(prompts.texts), best_of_n, n_items, n_batches, args.micro_batch_size, strategy.world_size)

    records: list[tuple[int, dict[str, str]]] = []
    tokens = 0
    started = time.perf_counter()
    for call in range(calls):
        if call >= len(mine):  # a dummy call, for the collective forwards only: one token, dropped
            ids, mask = left_pad(prompts.ids[:1], tokenizer.pad_token_id, strategy.device)
            generate(engine, ids, mask, SamplingConfig(max_new_tokens=1, greedy=True),
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     zero_stage=args.zero_stage)
            continue
        batch = mine[call]
        items = B.batch_items(batch, n_items, args.micro_batch_size)
        which = [item // best_of_n for item in items]
        ids, mask = left_pad([prompts.ids[p] for p in which], tokenizer.pad_token_id, strategy.device)
        budget = max(prompts.max_new[p] for p in which)
        out = generate(engine, ids, mask, replace(sampling, max_new_tokens=budget),
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       zero_stage=args.zero_stage, seed=B.batch_seed(args.seed, prompts.iteration, batch))
        for row, (item, p) in enumerate(zip(items, which)):
            answer = out.response_ids(row)[: prompts.max_new[p]]  # each prompt's own --max_len budget
            tokens += len(answer)
            records.append((item, {"input": prompts.texts[p],
                                   "output": tokenizer.decode(answer, skip_special_tokens=True)}))
        if progress_due(call, len(mine)):
            log.info("generate: batch %d/%d done (rank 0's %d/%d), %d tokens so far on rank 0, %.1fs", batch + 1,
                     n_batches, call + 1, len(mine), tokens, time.perf_counter() - started)

    rows, total_tokens = gather_records(strategy, records, tokens, n_items)
    elapsed = time.perf_counter() - started
    on_rank_0(strategy, lambda: write_jsonl_atomic(args.output_path, rows))
    log.info("wrote %d answers (%d prompts x %d) to %s: %d generated tokens in %.1fs, %.1f tokens/s", len(rows),
             len(prompts.texts), best_of_n, args.output_path, total_tokens, elapsed, total_tokens / max(elapsed, 1e-9))


def progress_due(call: int, calls: int) -> bool:
    """About 20 progress lines per run, and the last batch."""
    return (call + 1) % max(1, calls // 20) == 0 or call + 1 == calls


def gather_records(strategy: DeepspeedStrategy, records: list[tuple[int, Any]], count: int,
                   n_items: int) -> tuple[list[Any], int]:
    """Every rank's (item, record) pairs in item order, on rank 0 (empty elsewhere), and the sum of ``count``."""
    if strategy.world_size == 1:
        return B.merge_ordered([records], n_items), count
    from openrl_ckpt.checkpoint.comm import TorchDistComm

    # a gloo group of its own: the records travel through host memory, not the accelerator
    parts = TorchDistComm(private=True).all_gather_object((records, count))
    if not strategy.is_rank_0:
        return [], 0
    return B.merge_ordered([r for r, _ in parts], n_items), sum(c for _, c in parts)


def on_rank_0(strategy: DeepspeedStrategy, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only (file-system work); a user error there is raised on every rank, so all
    exit with it and none waits forever for rank 0. Returns fn's result on rank 0, None elsewhere."""
    err, result = None, None
    if strategy.is_rank_0:
        try:
            result = fn()
        except UserError as e:
            err = str(e)
    if strategy.world_size > 1:
        from openrl_ckpt.checkpoint.comm import TorchDistComm

        err = TorchDistComm().broadcast_object(err)
    if err:
        raise UserError(err)
    return result


# ---------------------------------------------------------------------------- generate_vllm


def run_generate_vllm(args: A.argparse.Namespace) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--eval_task generate_vllm runs in one process (vLLM spreads the model over --tp_size GPUs "
                        "itself): launch it with python -m, not with several ranks")
    best_of_n = args.best_of_n or 1
    tokenizer = load_tokenizer(args.pretrain, padding_side="left")
    apply_tokenizer_chat_template(tokenizer, args.tokenizer_chat_template)
    prompts = load_prompts(args, tokenizer)
    check_output_path(args.output_path)
    from openrl_ckpt.inference.vllm_engine import generate_vllm

    n_items = len(prompts.texts) * best_of_n
    which = [item // best_of_n for item in range(n_items)]
    started = time.perf_counter()
    # per-answer seeds: the same file whatever vLLM's scheduling
    texts = generate_vllm(args.pretrain, [prompts.ids[p] for p in which], [prompts.max_new[p] for p in which],
                          [B.batch_seed(args.seed, prompts.iteration, item) for item in range(n_items)],
                          sampling_config(args), bf16=args.bf16, max_len=args.max_len, seed=args.seed,
                          tp_size=args.tp_size, enable_prefix_caching=args.enable_prefix_caching,
                          max_num_seqs=args.max_num_seqs)
    write_jsonl_atomic(args.output_path, [{"input": prompts.texts[p], "output": t} for p, t in zip(which, texts)])
    log.info("wrote %d answers (%d prompts x %d) to %s in %.1fs", n_items, len(prompts.texts), best_of_n,
             args.output_path, time.perf_counter() - started)


# ---------------------------------------------------------------------------- rm


def load_scoring_rows(args: A.argparse.Namespace, tokenizer: Any) -> tuple[list[tuple[str, str]], list[list[int]]]:
    """(input, output) text of every row and its token ids: input + output + EOS, cut to --max_len with
    EOS kept last (as train_rm tokenizes, since the head reads the last token)."""
    raw = load_blended_dataset(args.dataset, args.dataset_probs, seed=args.seed, max_samples=args.max_samples,
                               split=args.dataset_split)
    check_columns(raw, {"--input_key": args.input_key, "--output_key": args.output_key}, args.dataset)
    pairs = []
    for n, (i, o) in enumerate(zip(raw[args.input_key], raw[args.output_key]), start=1):
        row, where = {args.input_key: i, args.output_key: o}, f"{args.dataset} row {n}"
        pairs.append((row_text(row, args.input_key, "--input_key", where),
                      row_text(row, args.output_key, "--output_key", where)))
    if tokenizer.eos_token_id is None:
        raise UserError(f"--pretrain {args.pretrain}: the tokenizer has no eos_token; reward models read the EOS")
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    ids = []
    for x in tokenizer([i + o for i, o in pairs], return_attention_mask=False)["input_ids"]:
        if bos is not None and len(x) > 1 and x[0] == x[1] == bos:
            x = x[1:]  # a chat-rendered input already starts with BOS, and the tokenizer added one
        x = [*x, eos] if not x or x[-1] != eos else x
        ids.append(x if len(x) <= args.max_len else [*x[: args.max_len - 1], eos])
    return pairs, ids


def run_rm(args: A.argparse.Namespace, strategy: DeepspeedStrategy) -> None:
    tokenizer = load_tokenizer(args.pretrain)
    apply_tokenizer_chat_template(tokenizer, args.tokenizer_chat_template)
    pairs, ids = load_scoring_rows(args, tokenizer)
    if args.post_processor == "iter_dpo" and len({i for i, _ in pairs}) == len(pairs):
        raise UserError(f"--post_processor iter_dpo: every input of {args.dataset} has a single output; pairs need "
                        "several (generate with --best_of_n 2 or more)")
    strategy.setup_distributed()
    on_rank_0(strategy, lambda: check_output_path(args.output_path))

    strategy.before_model_load()
    model = load_reward_model(model_config(args), args.value_head_prefix, require_head=True)
    stored = bool(getattr(model.config, "normalize_reward", False))
    if args.normalize_reward and not stored:
        raise UserError(f"--normalize_reward: {args.pretrain} stores no reward mean/std (train_rm --normalize_reward "
                        "stores them); drop the flag to write raw rewards")
    model.config.normalize_reward = args.normalize_reward  # raw rewards unless asked for
    scorer = strategy.prepare_frozen(model)

    n_batches = B.num_batches(len(ids), args.micro_batch_size)
    mine = B.rank_batches(n_batches, strategy.world_size, strategy.rank)
    collective = args.zero_stage == 3 and strategy.world_size > 1
    calls = B.calls_per_rank(n_batches, strategy.world_size) if collective else len(mine)
    log.info("rm: scoring %d rows in %d micro batches of %d over %d rank(s)", len(ids), n_batches,
             args.micro_batch_size, strategy.world_size)
    records: list[tuple[int, float]] = []
    started = time.perf_counter()
    for call in range(calls):
        dummy = call >= len(mine)  # the collective forwards of ZeRO-3 only; the reward is dropped
        items = range(1) if dummy else B.batch_items(mine[call], len(ids), args.micro_batch_size)
        batch_ids, mask = right_pad([ids[i] for i in items], tokenizer.pad_token_id, strategy.device)
        rewards = scorer(input_ids=batch_ids, attention_mask=mask).float().tolist()
        if not dummy:
            records.extend(zip(items, rewards))
            if progress_due(call, len(mine)):
                log.info("rm: batch %d/%d done (rank 0's %d/%d), %.1fs", mine[call] + 1, n_batches, call + 1,
                         len(mine), time.perf_counter() - started)
    rewards, _ = gather_records(strategy, records, 0, len(ids))
    elapsed = time.perf_counter() - started

    def make_rows() -> list[dict[str, Any]]:
        mean, std = P.mean_std(rewards)
        log.info("rewards of %d rows: mean %.4f, std %.4f%s (%.1f rows/s)", len(rewards), mean, std,
                 " (normalised with the model's stored mean/std)" if args.normalize_reward else "",
                 len(rewards) / max(elapsed, 1e-9))
        return post_process(args, [{"input": i, "output": o, "reward": r} for (i, o), r in zip(pairs, rewards)])

    n = on_rank_0(strategy, lambda: write_jsonl_atomic(args.output_path, make_rows()))
    log.info("wrote %d rows to %s", n, args.output_path)


def post_process(args: A.argparse.Namespace, scored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if args.post_processor == "rs":
        best = P.rejection_sampling(scored)
        log.info("rs: the best of each input's answers: %d rows", len(best))
        return best
    if args.post_processor in ("ca", "csft"):
        return P.conditional_sft(scored, args.reward_template, normalize=args.ca_normalize_reward)
    if args.post_processor == "iter_dpo":
        pairs, stats = P.iterative_dpo_pairs(scored)
        log.info("iter_dpo: %d pairs; dropped %d inputs with a single output and %d whose outputs are all the "
                 "same or all got the same reward", stats.pairs, stats.single_output, stats.no_preference)
        if not pairs:
            raise UserError(f"--post_processor iter_dpo: no pairs from {args.dataset} (every input has a single "
                            "output, or outputs that are all the same or equally rewarded)")
        return pairs
    return scored


def right_pad(seqs: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids.to(device), mask.to(device)


if __name__ == "__main__":
    run(main)
