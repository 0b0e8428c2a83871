"""The batch-inference jobs behind ``openrl_ckpt.cli.batch_inference``: sample answers to prompts with
Hugging Face generate (any number of ranks, any ZeRO stage) or vLLM (one process), or score answers
with a reward model and post-process the scores. Each job reads its flags from the parsed arguments.

Every rank loads and checks the data before the process group starts, so bad data fails in seconds;
rank 0 alone touches the output file, and the file appears whole or not at all.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from openrl_ckpt.data.loading import load_dataset_from_flags
from openrl_ckpt.data.padding import left_pad, right_pad
from openrl_ckpt.data.preference_dataset import check_columns
from openrl_ckpt.data.prompts import tokenize_prompts
from openrl_ckpt.data.templates import TemplateConfig, apply_tokenizer_chat_template, row_text
from openrl_ckpt.errors import UserError
from openrl_ckpt.inference.batching import (
    batch_items,
    batch_seed,
    calls_per_rank,
    merge_ordered,
    num_batches,
    rank_batches,
    select_rows,
)
from openrl_ckpt.inference.generation import SamplingConfig, generate
from openrl_ckpt.inference.output import check_output_path, write_jsonl_atomic
from openrl_ckpt.inference.postprocess import (
    PostProcessor,
    conditional_sft,
    iterative_dpo_pairs,
    mean_std,
    rejection_sampling,
)
from openrl_ckpt.models.actor import ModelConfig, load_causal_lm, load_tokenizer
from openrl_ckpt.models.remote_reward import RemoteRewardClient, RemoteRewardConfig, parse_remote_urls
from openrl_ckpt.models.reward import load_reward_model, reward_token_ids, use_stored_normalization
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy

log = logging.getLogger("openrl_ckpt")


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, greedy=args.greedy_sampling, repetition_penalty=args.repetition_penalty)


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(pretrain=args.pretrain, bf16=args.bf16, flash_attn=args.flash_attn,
                       attn_implementation=args.attn_implementation)


# ---------------------------------------------------------------------------- work over ranks


@dataclass(frozen=True)
class RankWork:
    """This rank's share of the micro batches, and the forward calls it makes for them."""

    n_batches: int  # over all ranks
    mine: list[int]  # this rank's micro batches, in order
    calls: int  # len(mine), or more: the calls past len(mine) are dummies

    def progress_due(self, call: int) -> bool:
        """About 20 progress lines per run, and the last batch."""
        return (call + 1) % max(1, len(self.mine) // 20) == 0 or call + 1 == len(self.mine)


def rank_work(n_items: int, args: argparse.Namespace, strategy: DeepspeedStrategy) -> RankWork:
    n_batches = num_batches(n_items, args.micro_batch_size)
    mine = rank_batches(n_batches, strategy.world_size, strategy.rank)
    # ZeRO-3 gathers the weights in every forward pass: all ranks make the same number of forward calls
    collective = args.zero_stage == 3 and strategy.world_size > 1
    return RankWork(n_batches, mine, calls_per_rank(n_batches, strategy.world_size) if collective else len(mine))


def gather_records(strategy: DeepspeedStrategy, records: list[tuple[int, Any]], count: int,
                   n_items: int) -> tuple[list[Any], int]:
    """Every rank's (item, record) pairs in item order, on rank 0 (empty elsewhere), and the sum of ``count``."""
    if strategy.world_size == 1:
        return merge_ordered([records], n_items), count
    from openrl_ckpt.checkpoint.comm import TorchDistComm

    # a gloo group of its own: the records travel through host memory, not the accelerator
    parts = TorchDistComm(private=True).all_gather_object((records, count))
    if not strategy.is_rank_0:
        return [], 0
    return merge_ordered([r for r, _ in parts], n_items), sum(c for _, c in parts)


def on_rank_0(strategy: DeepspeedStrategy, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only (file-system work); a user error there is raised on every rank, so all
    exit with it and none waits forever for rank 0. Returns fn's result on rank 0, None elsewhere."""
    err, result = None, None
    if strategy.is_rank_0:
        try:
            result = fn()
        except UserError as e:
            err = str(e)
    err = strategy.broadcast_object(err)
    if err:
        raise UserError(err)
    return result


# ---------------------------------------------------------------------------- prompts


@dataclass
class Prompts:
    """The selected prompts that fit, as text and token ids, and the answer budget of each."""

    texts: list[str]
    ids: list[list[int]]
    max_new: list[int]  # min(--max_new_tokens, --max_len - prompt length)
    iteration: int


def load_prompts(args: argparse.Namespace, tokenizer: Any) -> Prompts:
    """The --iter window of the data as prompts; the empty and the too long ones are left out (counted)."""
    raw = load_dataset_from_flags(args)
    check_columns(raw, {"--input_key": args.input_key}, args.dataset)
    rows = select_rows(len(raw), args.iter, args.rollout_batch_size)
    template = TemplateConfig(input_key=args.input_key, output_key=None, input_template=args.input_template,
                              apply_chat_template=args.apply_chat_template)
    limit = min(args.prompt_max_len, args.max_len - 1)
    kept = tokenize_prompts(raw, rows, template, tokenizer, args.dataset, limit,
                            suffix=args.csft_prompt.strip() + " " if args.enable_csft else "")
    if len(kept) < len(rows):
        log.warning("%d of %d prompts are empty or longer than %d tokens (--prompt_max_len %d, --max_len %d) and "
                    "are skipped", len(rows) - len(kept), len(rows), limit, args.prompt_max_len, args.max_len)
    if not kept:
        raise UserError(f"{args.dataset}: all {len(rows)} selected prompts are empty or longer than {limit} tokens "
                        f"(--prompt_max_len {args.prompt_max_len}, --max_len {args.max_len})")
    log.info("prompts: rows [%d, %d) of %d%s, %d kept", rows.start, rows.stop, len(raw),
             f" (--iter {args.iter})" if args.iter is not None else "", len(kept))
    return Prompts(texts=[prompt.text for prompt in kept], ids=[prompt.ids for prompt in kept],
                   max_new=[min(args.max_new_tokens, args.max_len - len(prompt.ids)) for prompt in kept],
                   iteration=args.iter or 0)


# ---------------------------------------------------------------------------- generate


def run_generate(args: argparse.Namespace, strategy: DeepspeedStrategy) -> None:
    best_of_n = args.best_of_n or 1
    tokenizer = load_tokenizer(args.pretrain, padding_side="left", use_fast=not args.disable_fast_tokenizer)
    apply_tokenizer_chat_template(tokenizer, args.tokenizer_chat_template)
    prompts = load_prompts(args, tokenizer)  # bad data fails here, before the process group
    strategy.setup_distributed()
    on_rank_0(strategy, lambda: check_output_path(args.output_path))

    strategy.before_model_load()
    engine = strategy.prepare_frozen(load_causal_lm(model_config(args))).module
    sampling = sampling_config(args)
    n_items = len(prompts.texts) * best_of_n
    work = rank_work(n_items, args, strategy)
    log.info("generate: %d prompts x best_of_n %d = %d answers in %d micro batches of %d over %d rank(s)",
             len(prompts.texts), best_of_n, n_items, work.n_batches, args.micro_batch_size, strategy.world_size)

    records: list[tuple[int, dict[str, str]]] = []
    tokens = 0
    started = time.perf_counter()
    for call in range(work.calls):
        if call >= len(work.mine):  # a dummy call, for the collective forwards only: one token, dropped
            ids, mask = left_pad(prompts.ids[:1], tokenizer.pad_token_id)
            generate(engine, ids.to(strategy.device), mask.to(strategy.device),
                     SamplingConfig(max_new_tokens=1, greedy=True), eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, zero_stage=args.zero_stage)
            continue
        batch = work.mine[call]
        items = batch_items(batch, n_items, args.micro_batch_size)
        which = [item // best_of_n for item in items]
        ids, mask = left_pad([prompts.ids[p] for p in which], tokenizer.pad_token_id)
        budget = max(prompts.max_new[p] for p in which)
        out = generate(engine, ids.to(strategy.device), mask.to(strategy.device),
                       replace(sampling, max_new_tokens=budget), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, zero_stage=args.zero_stage,
                       seed=batch_seed(args.seed, prompts.iteration, batch))
        for row, (item, p) in enumerate(zip(items, which)):
            answer = out.response_ids(row)[: prompts.max_new[p]]  # each prompt's own --max_len budget
            tokens += len(answer)
            records.append((item, {"input": prompts.texts[p],
                                   "output": tokenizer.decode(answer, skip_special_tokens=True)}))
        if work.progress_due(call):
            log.info("generate: batch %d/%d done (rank 0's %d/%d), %d tokens so far on rank 0, %.1fs", batch + 1,
                     work.n_batches, call + 1, len(work.mine), tokens, time.perf_counter() - started)

    rows, total_tokens = gather_records(strategy, records, tokens, n_items)
    elapsed = time.perf_counter() - started
    on_rank_0(strategy, lambda: write_jsonl_atomic(args.output_path, rows))
    log.info("wrote %d answers (%d prompts x %d) to %s: %d generated tokens in %.1fs, %.1f tokens/s", len(rows),
             len(prompts.texts), best_of_n, args.output_path, total_tokens, elapsed, total_tokens / max(elapsed, 1e-9))


# ---------------------------------------------------------------------------- generate_vllm


def run_generate_vllm(args: argparse.Namespace) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--eval_task generate_vllm runs in one process (vLLM spreads the model over --tp_size GPUs "
                        "itself): launch it with python -m, not with several ranks")
    best_of_n = args.best_of_n or 1
    tokenizer = load_tokenizer(args.pretrain, padding_side="left", use_fast=not args.disable_fast_tokenizer)
    apply_tokenizer_chat_template(tokenizer, args.tokenizer_chat_template)
    prompts = load_prompts(args, tokenizer)
    check_output_path(args.output_path)
    from openrl_ckpt.inference.vllm_engine import generate_vllm

    n_items = len(prompts.texts) * best_of_n
    which = [item // best_of_n for item in range(n_items)]
    started = time.perf_counter()
    # per-answer seeds: the same file whatever vLLM's scheduling
    texts = generate_vllm(args.pretrain, [prompts.ids[p] for p in which], [prompts.max_new[p] for p in which],
                          [batch_seed(args.seed, prompts.iteration, item) for item in range(n_items)],
                          sampling_config(args), bf16=args.bf16, max_len=args.max_len, seed=args.seed,
                          tp_size=args.tp_size, enable_prefix_caching=args.enable_prefix_caching,
                          max_num_seqs=args.max_num_seqs)
    write_jsonl_atomic(args.output_path, [{"input": prompts.texts[p], "output": t} for p, t in zip(which, texts)])
    log.info("wrote %d answers (%d prompts x %d) to %s in %.1fs", n_items, len(prompts.texts), best_of_n,
             args.output_path, time.perf_counter() - started)


# ---------------------------------------------------------------------------- rm


def load_scoring_rows(args: argparse.Namespace, tokenizer: Any) -> tuple[list[tuple[str, str]], list[list[int]]]:
    """(input, output) text of every row and its token ids: input + output + EOS, cut to --max_len with
    EOS kept last (as train_rm tokenizes, since the head reads the last token)."""
    pairs = load_scoring_texts(args)
    if tokenizer.eos_token_id is None:
        raise UserError(f"--pretrain {args.pretrain}: the tokenizer has no eos_token; reward models read the EOS")
    return pairs, reward_token_ids(tokenizer, [i + o for i, o in pairs], args.max_len)


def load_scoring_texts(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(input, output) text of every row."""
    raw = load_dataset_from_flags(args)
    check_columns(raw, {"--input_key": args.input_key, "--output_key": args.output_key}, args.dataset)
    pairs = []
    for n, (i, o) in enumerate(zip(raw[args.input_key], raw[args.output_key]), start=1):
        row, where = {args.input_key: i, args.output_key: o}, f"{args.dataset} row {n}"
        pairs.append((row_text(row, args.input_key, "--input_key", where),
                      row_text(row, args.output_key, "--output_key", where)))
    return pairs


def run_rm_remote(args: argparse.Namespace) -> None:
    """--eval_task rm --remote_rm_url: the rows' rewards from the reward servers (one process, no model)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--eval_task rm --remote_rm_url runs in one process (the servers do the work): launch it "
                        "with python -m, not with several ranks")
    client = RemoteRewardClient(RemoteRewardConfig(parse_remote_urls(args.remote_rm_url),
                                                   timeout_s=args.remote_rm_timeout, retries=args.remote_rm_retries,
                                                   batch_size=args.micro_batch_size))
    check_output_path(args.output_path)
    pairs = load_scoring_texts(args)
    started = time.perf_counter()
    scores = client.rewards([i + o for i, o in pairs])
    log.info("rm: %d rows scored by %s in %.1fs", len(pairs), args.remote_rm_url, time.perf_counter() - started)
    rows = post_process(args, [{"input": i, "output": o, "reward": r} for (i, o), r in zip(pairs, scores)])
    write_jsonl_atomic(args.output_path, rows)
    log.info("wrote %d rows to %s", len(rows), args.output_path)


def run_rm(args: argparse.Namespace, strategy: DeepspeedStrategy) -> None:
    tokenizer = load_tokenizer(args.pretrain, use_fast=not args.disable_fast_tokenizer)
    apply_tokenizer_chat_template(tokenizer, args.tokenizer_chat_template)
    pairs, ids = load_scoring_rows(args, tokenizer)
    if args.post_processor is PostProcessor.ITER_DPO and len({i for i, _ in pairs}) == len(pairs):
        raise UserError(f"--post_processor iter_dpo: every input of {args.dataset} has a single output; pairs need "
                        "several (generate with --best_of_n 2 or more)")
    strategy.setup_distributed()
    on_rank_0(strategy, lambda: check_output_path(args.output_path))

    strategy.before_model_load()
    model = load_reward_model(model_config(args), args.value_head_prefix, require_head=True)
    use_stored_normalization(model, args.normalize_reward, args.pretrain)
    scorer = strategy.prepare_frozen(model)

    work = rank_work(len(ids), args, strategy)
    log.info("rm: scoring %d rows in %d micro batches of %d over %d rank(s)", len(ids), work.n_batches,
             args.micro_batch_size, strategy.world_size)
    records: list[tuple[int, float]] = []
    started = time.perf_counter()
    for call in range(work.calls):
        dummy = call >= len(work.mine)  # the collective forwards of ZeRO-3 only; the reward is dropped
        items = range(1) if dummy else batch_items(work.mine[call], len(ids), args.micro_batch_size)
        batch_ids, mask = right_pad([ids[i] for i in items], tokenizer.pad_token_id)
        rewards = scorer(input_ids=batch_ids.to(strategy.device),
                         attention_mask=mask.to(strategy.device)).float().tolist()
        if not dummy:
            records.extend(zip(items, rewards))
            if work.progress_due(call):
                log.info("rm: batch %d/%d done (rank 0's %d/%d), %.1fs", work.mine[call] + 1, work.n_batches,
                         call + 1, len(work.mine), time.perf_counter() - started)
    scores, _ = gather_records(strategy, records, 0, len(ids))
    elapsed = time.perf_counter() - started

    def make_rows() -> list[dict[str, Any]]:
        mean, std = mean_std(scores)
        log.info("rewards of %d rows: mean %.4f, std %.4f%s (%.1f rows/s)", len(scores), mean, std,
                 " (normalised with the model's stored mean/std)" if args.normalize_reward else "",
                 len(scores) / max(elapsed, 1e-9))
        return post_process(args, [{"input": i, "output": o, "reward": r} for (i, o), r in zip(pairs, scores)])

    n = on_rank_0(strategy, lambda: write_jsonl_atomic(args.output_path, make_rows()))
    log.info("wrote %d rows to %s", n, args.output_path)


def post_process(args: argparse.Namespace, scored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows --post_processor makes of the scored rows (all of them, unchanged, without one)."""
    processor: PostProcessor | None = args.post_processor
    if processor is PostProcessor.RS:
        best = rejection_sampling(scored)
        log.info("rs: the best of each input's answers: %d rows", len(best))
        return best
    if processor in (PostProcessor.CA, PostProcessor.CSFT):
        return conditional_sft(scored, args.reward_template, normalize=args.ca_normalize_reward)
    if processor is PostProcessor.ITER_DPO:
        pairs, stats = iterative_dpo_pairs(scored)
        log.info("iter_dpo: %d pairs; dropped %d inputs with a single output and %d whose outputs are all the "
                 "same or all got the same reward", stats.pairs, stats.single_output, stats.no_preference)
        if not pairs:
            raise UserError(f"--post_processor iter_dpo: no pairs from {args.dataset} (every input has a single "
                            "output, or outputs that are all the same or equally rewarded)")
        return pairs
    return scored
