"""PPO: an actor learns to raise the reward models' scores of its own answers, held near a reference.

    deepspeed --module openrl_ckpt.cli.train_ppo --pretrain SFT_MODEL --reward_pretrain RM --prompt_data prompts.jsonl \
        --input_key prompt --rollout_batch_size 512 --train_batch_size 128 --save_steps 20 --load_checkpoint
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from openrl_ckpt.cli import args as cli_args
from openrl_ckpt.cli.entry import run
from openrl_ckpt.data.loading import load_blended_dataset
from openrl_ckpt.data.preference_dataset import check_columns
from openrl_ckpt.data.prompts import tokenize_prompts
from openrl_ckpt.data.sft_dataset import build_sft_dataset
from openrl_ckpt.data.templates import TemplateConfig, apply_tokenizer_chat_template
from openrl_ckpt.errors import UserError
from openrl_ckpt.inference.generation import SamplingConfig
from openrl_ckpt.models.actor import load_causal_lm, load_tokenizer, model_fingerprint
from openrl_ckpt.models.loss import KLEstimator
from openrl_ckpt.models.remote_reward import (
    RemoteRewardClient,
    RemoteRewardConfig,
    RemoteRewardScorer,
    parse_remote_urls,
)
from openrl_ckpt.models.reward import load_reward_model
from openrl_ckpt.models.tokenizers import tokenizer_difference
from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy
from openrl_ckpt.strategy.hf import save_model
from openrl_ckpt.trainers.common import load_frozen, reference_identity
from openrl_ckpt.trainers.ppo.control import AdaptiveKLController, FixedKLController, RunningMoments
from openrl_ckpt.trainers.ppo.ema import EmaWeights
from openrl_ckpt.trainers.ppo.experience import AdvantageEstimator, ExperienceMaker, PPOConfig, RewardScorer
from openrl_ckpt.trainers.ppo.ptx import PtxFeed
from openrl_ckpt.trainers.ppo.trainer import PPOTrainer
from openrl_ckpt.utils.tracking import setup_logging

log = logging.getLogger("openrl_ckpt")


def parse_args(argv: list[str] | None = None) -> cli_args.argparse.Namespace:
    p = cli_args.Parser(prog="train_ppo", description=__doc__.splitlines()[0])
    add_ppo_args(p, default_ckpt="./ckpt/checkpoints_ppo")
    p.add_argument_group("generation").add_argument("--vllm_num_engines", type=int, default=0,
                                                    help="generation through vLLM: use train_ppo_ray")
    return p.parse_args(argv)


def add_ppo_args(p: cli_args.argparse.ArgumentParser, default_ckpt: str) -> None:
    """Every flag PPO takes, on one process group or over Ray."""
    cli_args.add_model_args(p)
    cli_args.add_train_args(p)
    cli_args.add_ckpt_args(p, default_ckpt=default_ckpt)
    cli_args.add_logging_args(p)
    p.set_defaults(max_epochs=1, micro_train_batch_size=4, train_batch_size=128)
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt_data", "--dataset", dest="prompt_data", required=True,
                   help="comma-separated prompt datasets (files, folders, hub names)")
    g.add_argument("--prompt_data_probs", "--dataset_probs", dest="prompt_data_probs", default=None,
                   help="comma-separated mixing probabilities (default: equal)")
    g.add_argument("--prompt_split", default="train")
    g.add_argument("--max_samples", type=int, default=1_000_000, help="use at most this many prompts")
    g.add_argument("--input_key", default="input")
    g.add_argument("--label_key", default=None, help="a column sent with each sample to --remote_rm_url (e.g. the "
                   "reference answer a rule-based reward compares with)")
    cli_args.add_input_template_arg(g, None)
    cli_args.bool_flag(g, "--apply_chat_template", "render prompts with the tokenizer's chat template")
    g.add_argument("--tokenizer_chat_template", default=None, help="a Jinja chat template, or a file holding one")
    g.add_argument("--prompt_max_len", type=int, default=1024, help="longer prompts are skipped (counted)")
    g.add_argument("--max_len", type=int, default=None, help="the --pretrain_data sequence length (default: "
                   "--prompt_max_len + --generate_max_len)")
    cli_args.bool_flag(g, "--use_ms", "load hub models and datasets from ModelScope (needs modelscope and its hub)")
    g = p.add_argument_group("models")
    g.add_argument("--reward_pretrain", default=None, help="comma-separated reward models (train_rm folders); "
                   "their scores are averaged (or --remote_rm_url)")
    g.add_argument("--remote_rm_url", default=None, help="URL[,URL] of reward servers (serve_rm's /get_reward) "
                   "instead of --reward_pretrain; their rewards are averaged")
    g.add_argument("--remote_rm_timeout", type=float, default=60.0, help="seconds per reward request")
    g.add_argument("--remote_rm_retries", type=int, default=5, help="tries after a failed reward request (the "
                   "pause doubles from 1 s), then the run stops with its last checkpoint intact")
    g.add_argument("--critic_pretrain", default=None, help="critic initialisation (default: the first reward model; "
                   "with --remote_rm_url, --pretrain with a new value head)")
    g.add_argument("--value_head_prefix", "--head_prefix", dest="value_head_prefix", default="score",
                   help="name of the reward models' and critic's head")
    cli_args.bool_flag(g, "--actor_init_on_gpu", "accepted for compatibility: models are loaded on the host and "
                       "moved to the device by DeepSpeed either way")
    cli_args.bool_flag(g, "--ref_reward_offload", "keep the reference and reward models on the CPU between uses")
    cli_args.bool_flag(g, "--allow_tokenizer_mismatch", "reward models with another tokenizer score the decoded text")
    cli_args.bool_flag(g, "--save_value_network", "also write the critic in Hugging Face format to <save_path>_critic")
    g = p.add_argument_group("generation")
    g.add_argument("--generate_max_len", type=int, default=1024, help="new tokens per answer")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--top_k", type=int, default=-1, help="-1 or 0: no top-k cut")
    g.add_argument("--n_samples_per_prompt", type=int, default=1)
    g = p.add_argument_group("PPO")
    g.add_argument("--rollout_batch_size", type=int, default=512, help="prompts per update step, all ranks")
    g.add_argument("--micro_rollout_batch_size", type=int, default=8, help="samples per generation call on a rank")
    g.add_argument("--num_episodes", type=int, default=1, help="passes over the prompt set")
    g.add_argument("--actor_learning_rate", type=float, default=1e-6)
    g.add_argument("--critic_learning_rate", type=float, default=9e-6)
    g.add_argument("--init_kl_coef", type=float, default=0.01, help="0: no reference model, no KL penalty")
    g.add_argument("--kl_target", type=float, default=None, help="adaptive KL coefficient towards this KL")
    g.add_argument("--kl_horizon", type=int, default=10000)
    g.add_argument("--kl_estimator", choices=[e.value for e in KLEstimator], default=KLEstimator.K1.value)
    cli_args.bool_flag(g, "--use_kl_loss", "the KL to the reference enters the actor's loss (GRPO) instead of the "
                       "reward (k2 or k3 recommended)")
    g.add_argument("--gamma", type=float, default=1.0)
    g.add_argument("--lambd", type=float, default=0.95)
    g.add_argument("--eps_clip", type=float, default=0.2)
    g.add_argument("--value_clip", type=float, default=0.2, help="clip range of the value loss; <= 0: unclipped")
    cli_args.bool_flag(g, "--normalize_reward", "normalise scores with their running mean and std")
    g.add_argument("--reward_clip_range", type=float, nargs=2, default=(-10.0, 10.0))
    g.add_argument("--advantage_estimator", choices=[e.value for e in AdvantageEstimator],
                   default=AdvantageEstimator.GAE.value)
    cli_args.bool_flag(g, "--no_advantage_std_norm", "whitened advantages keep their scale: the mean is taken "
                       "out, no division by the std")
    g.add_argument("--freezing_actor_steps", type=int, default=-1, help="train only the critic for this many steps")
    cli_args.bool_flag(g, "--packing_samples", "pack rollouts without padding (not supported by PPO yet: an error)")
    cli_args.bool_flag(g, "--perf", "timing figures: every step line already holds generate_s, rollout_s, train_s, "
                       "step_s (and weight_sync_s on Ray)")
    g.add_argument("--ptx_coef", type=float, default=0.05, help="weight of an SFT loss on --pretrain_data in the "
                   "actor's loss (only with --pretrain_data)")
    g.add_argument("--pretrain_data", default=None, help="comma-separated pretraining datasets for --ptx_coef")
    g.add_argument("--pretrain_data_probs", default=None)
    g.add_argument("--pretrain_split", default="train")
    g.add_argument("--pretrain_input_key", default=None, help="text column of --pretrain_data (default: --input_key)")
    cli_args.bool_flag(g, "--enable_ema", "keep an exponential moving average of the actor's weights (checkpointed); "
                "the exported actor holds it")
    g.add_argument("--ema_beta", type=float, default=0.992)


def check_args(args: cli_args.argparse.Namespace) -> None:
    """Flag checks that need no process group."""
    if args.packing_samples:
        raise UserError("--packing_samples: PPO rollouts are padded (not supported by train_ppo / train_ppo_ray yet); "
                        "drop the flag")
    if (args.reward_pretrain is None) == (args.remote_rm_url is None):
        raise UserError("give the reward as --reward_pretrain (local reward models) or --remote_rm_url (reward "
                        "servers), one of the two")
    if args.remote_rm_url is not None and args.allow_tokenizer_mismatch:
        raise UserError("--allow_tokenizer_mismatch is about --reward_pretrain's tokenizers; a reward server reads "
                        "text")
    if args.label_key is not None and args.remote_rm_url is None:
        raise UserError("--label_key sends a column to the reward server: it needs --remote_rm_url")
    if args.use_kl_loss and args.init_kl_coef == 0:
        raise UserError("--use_kl_loss needs a reference model: --init_kl_coef must be positive")
    if args.remote_rm_timeout <= 0 or args.remote_rm_retries < 0:
        raise UserError(f"--remote_rm_timeout must be positive and --remote_rm_retries 0 or more, got "
                        f"{args.remote_rm_timeout} and {args.remote_rm_retries}")
    for flag, unsupported in (("--enable_ema with --zero_stage 3", args.enable_ema and args.zero_stage == 3),
                              ("--lora_rank", args.lora_rank > 0), ("--load_in_4bit", args.load_in_4bit)):
        if unsupported:
            raise UserError(f"{flag}: not supported by train_ppo yet")
    for flag, value in (("--rollout_batch_size", args.rollout_batch_size), ("--n_samples_per_prompt",
                        args.n_samples_per_prompt), ("--micro_rollout_batch_size", args.micro_rollout_batch_size),
                        ("--num_episodes", args.num_episodes), ("--max_epochs", args.max_epochs),
                        ("--generate_max_len", args.generate_max_len), ("--prompt_max_len", args.prompt_max_len)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if AdvantageEstimator(args.advantage_estimator).compares_samples and args.n_samples_per_prompt < 2:
        raise UserError(f"--advantage_estimator {args.advantage_estimator} compares the samples of each prompt: "
                        f"it needs --n_samples_per_prompt of at least 2, got {args.n_samples_per_prompt}")
    if args.init_kl_coef < 0:
        raise UserError(f"--init_kl_coef must be 0 or positive, got {args.init_kl_coef}")
    if args.kl_target is not None and (args.kl_target <= 0 or args.kl_horizon < 1):
        raise UserError(f"--kl_target must be positive and --kl_horizon at least 1, got {args.kl_target} and "
                        f"{args.kl_horizon}")
    if args.pretrain_data is not None and not args.ptx_coef > 0:
        raise UserError(f"--ptx_coef must be positive with --pretrain_data, got {args.ptx_coef}")
    if args.enable_ema and not 0 < args.ema_beta < 1:
        raise UserError(f"--ema_beta must be in (0, 1), got {args.ema_beta}")
    lo, hi = args.reward_clip_range
    if not lo < hi:
        raise UserError(f"--reward_clip_range needs low < high, got {lo} {hi}")


def check_batches(args: cli_args.argparse.Namespace, world_size: int) -> int:
    """The rollout must split evenly over ranks, micro rollout batches and train batches; returns the
    samples per update step."""
    b, n = args.rollout_batch_size, args.n_samples_per_prompt
    samples = b * n
    if b % world_size:
        raise UserError(f"--rollout_batch_size {b} must be a multiple of the world size {world_size} "
                        "(each rank samples for its own prompts)")
    m = args.micro_rollout_batch_size
    if samples % (m * world_size):
        raise UserError(f"--rollout_batch_size {b} x --n_samples_per_prompt {n} = {samples} samples must be a multiple "
                        f"of --micro_rollout_batch_size {m} x world size {world_size} = {m * world_size}")
    if samples % args.train_batch_size:
        raise UserError(f"--rollout_batch_size {b} x --n_samples_per_prompt {n} = {samples} samples must be a multiple "
                        f"of --train_batch_size {args.train_batch_size}")
    return samples


def load_prompts(args: cli_args.argparse.Namespace, tokenizer: Any) -> list[dict[str, Any]]:
    raw = load_blended_dataset(args.prompt_data, args.prompt_data_probs, seed=args.seed, max_samples=args.max_samples,
                               split=args.prompt_split, flag="--prompt_data")
    template = TemplateConfig(input_key=args.input_key, output_key=None, input_template=args.input_template,
                              apply_chat_template=args.apply_chat_template)
    if args.label_key is not None:
        check_columns(raw, {"--label_key": args.label_key}, args.prompt_data)
    kept = tokenize_prompts(raw, range(len(raw)), template, tokenizer, args.prompt_data, args.prompt_max_len)
    if not kept:
        raise UserError(f"--prompt_data {args.prompt_data}: all {len(raw)} prompts are empty or longer than "
                        f"--prompt_max_len {args.prompt_max_len} tokens")
    log.info("prompts: %d of %d kept (%d empty or longer than --prompt_max_len %d)", len(kept), len(raw),
             len(raw) - len(kept), args.prompt_max_len)
    if args.label_key is None:
        return [{"input_ids": prompt.ids, "index": prompt.row} for prompt in kept]
    labels = raw[args.label_key]
    return [{"input_ids": prompt.ids, "index": prompt.row, "label": labels[prompt.row]} for prompt in kept]


def load_pretrain_data(args: cli_args.argparse.Namespace, tokenizer: Any) -> Any:
    raw = load_blended_dataset(args.pretrain_data, args.pretrain_data_probs, seed=args.seed, split=args.pretrain_split,
                               flag="--pretrain_data")
    template = TemplateConfig(input_key=args.pretrain_input_key or args.input_key, output_key=None,
                              input_template=None, apply_chat_template=False, input_flag="--pretrain_input_key")
    data, stats = build_sft_dataset(raw, tokenizer, template, max_len=args.max_len or args.prompt_max_len +
                                    args.generate_max_len, pretrain_mode=True, source=args.pretrain_data)
    log.info("pretraining data: %s", stats)
    return data


def check_tokenizers(args: cli_args.argparse.Namespace, tokenizer: Any, reward_paths: list[str],
                     critic_path: str) -> list[Any]:
    """The critic reads the actor's tokens; a reward model with another tokenizer needs
    --allow_tokenizer_mismatch. Returns each reward model's own tokenizer where it differs (else None)."""
    difference = tokenizer_difference(tokenizer, load_tokenizer(critic_path, use_fast=not args.disable_fast_tokenizer))
    if difference and AdvantageEstimator(args.advantage_estimator).trains_critic:
        raise UserError(f"--critic_pretrain {critic_path}: its tokenizer differs from --pretrain's ({difference}); "
                        "the critic reads the actor's tokens, so both must share one")
    reward_tokenizers = []
    for path in reward_paths:
        reward_tok = load_tokenizer(path, use_fast=not args.disable_fast_tokenizer)
        difference = tokenizer_difference(tokenizer, reward_tok)
        if difference and not args.allow_tokenizer_mismatch:
            raise UserError(f"--reward_pretrain {path}: its tokenizer differs from --pretrain's ({difference}); "
                            "pass --allow_tokenizer_mismatch to score the decoded text with the reward model's own")
        reward_tokenizers.append(reward_tok if difference else None)
    return reward_tokenizers


def count_optimizer_steps(args: cli_args.argparse.Namespace, prompts: int, samples: int) -> int:
    """Optimizer steps of the whole run (the LR schedule's length): updates x steps per update."""
    updates = -(-prompts // args.rollout_batch_size) * args.num_episodes
    return updates * samples // args.train_batch_size * args.max_epochs


def kl_controller(args: cli_args.argparse.Namespace) -> FixedKLController:
    return (AdaptiveKLController(args.init_kl_coef, args.kl_target, args.kl_horizon) if args.kl_target
            else FixedKLController(args.init_kl_coef))


def ppo_config(args: cli_args.argparse.Namespace, sampling: SamplingConfig) -> PPOConfig:
    return PPOConfig(rollout_batch_size=args.rollout_batch_size, micro_rollout_batch_size=args.micro_rollout_batch_size,
                    n_samples_per_prompt=args.n_samples_per_prompt, micro_train_batch_size=args.micro_train_batch_size,
                    max_epochs=args.max_epochs, num_episodes=args.num_episodes, sampling=sampling,
                    kl_estimator=KLEstimator(args.kl_estimator), gamma=args.gamma, lambd=args.lambd,
                    eps_clip=args.eps_clip,
                    value_clip=args.value_clip if args.value_clip > 0 else None,
                    normalize_reward=args.normalize_reward, reward_clip_range=tuple(args.reward_clip_range),
                    advantage_estimator=AdvantageEstimator(args.advantage_estimator),
                    freezing_actor_steps=args.freezing_actor_steps, seed=args.seed, use_kl_loss=args.use_kl_loss,
                    advantage_std_norm=not args.no_advantage_std_norm)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_args(args)
    if args.vllm_num_engines > 0:
        raise UserError("--vllm_num_engines: train_ppo generates with Hugging Face generate on its one process "
                        "group; vLLM rollout engines run under train_ppo_ray (the same flags plus the Ray ones)")
    sampling = SamplingConfig(max_new_tokens=args.generate_max_len, temperature=args.temperature, top_p=args.top_p,
                              top_k=max(args.top_k, 0))
    sampling.check()
    remote = RemoteRewardConfig(parse_remote_urls(args.remote_rm_url), timeout_s=args.remote_rm_timeout,
                                retries=args.remote_rm_retries) if args.remote_rm_url else None
    reward_paths = [x for x in (args.reward_pretrain or "").split(",") if x]
    critic_path = args.critic_pretrain or (reward_paths[0] if reward_paths else args.pretrain)

    # 1. strategy: process group and batch arithmetic
    strategy = DeepspeedStrategy(cli_args.strategy_config(args))
    strategy.setup_distributed()
    setup_logging(strategy.rank)
    samples = check_batches(args, strategy.world_size)

    # 2. tokenizers (the critic reads the actor's tokens; reward models may differ with a flag) and prompts
    tokenizer = load_tokenizer(args.pretrain, padding_side="left", use_fast=not args.disable_fast_tokenizer)
    apply_tokenizer_chat_template(tokenizer, args.tokenizer_chat_template)
    estimator = AdvantageEstimator(args.advantage_estimator)
    reward_tokenizers = check_tokenizers(args, tokenizer, reward_paths, critic_path)
    prompts = load_prompts(args, tokenizer)
    pretrain_data = load_pretrain_data(args, tokenizer) if args.pretrain_data else None

    # 3. models: actor and critic trained; reference and reward models frozen (reloaded, checked on resume)
    strategy.before_model_load()
    actor_model = load_causal_lm(cli_args.model_config(args))
    fingerprint = model_fingerprint(actor_model)
    frozen: dict[str, list[dict[str, Any]]] = {"--reward_pretrain": []}
    ref = None
    if args.init_kl_coef > 0:
        ref, ref_id = load_frozen(cli_args.model_config(args), strategy, offload=args.ref_reward_offload)
        frozen["--pretrain (reference)"] = [ref_id]
    reward_models = []
    for path, reward_tok in zip(reward_paths, reward_tokenizers):
        model = load_reward_model(replace(cli_args.model_config(args, pretrain=path), gradient_checkpointing=False),
                                  args.value_head_prefix, require_head=True)
        frozen["--reward_pretrain"].append(reference_identity(path, model))
        reward_models.append((strategy.prepare_frozen(model, args.ref_reward_offload), reward_tok))
    optimizer_steps = count_optimizer_steps(args, len(prompts), samples)
    actor = strategy.prepare(actor_model, cli_args.optim_config(args, args.actor_learning_rate), optimizer_steps)
    critic = None
    if estimator.trains_critic:
        # a critic started from the policy (no reward model to start from) gets a new value head
        critic_model = load_reward_model(cli_args.model_config(args, pretrain=critic_path), args.value_head_prefix,
                                         require_head=critic_path != args.pretrain)
        critic = strategy.prepare(critic_model, cli_args.optim_config(args, args.critic_learning_rate), optimizer_steps)
    elif args.save_value_network or args.critic_pretrain:
        raise UserError(f"--advantage_estimator {args.advantage_estimator} trains no critic; drop "
                        f"{'--save_value_network' if args.save_value_network else '--critic_pretrain'}")

    # 4. experience, resume + fit
    kl_ctl = kl_controller(args)
    ppo = ppo_config(args, sampling)
    # the reward hook: local reward models, or the reward servers over HTTP
    scorer = (RemoteRewardScorer(RemoteRewardClient(remote), tokenizer, strategy.device) if remote is not None
              else RewardScorer(reward_models, strategy.device, tokenizer))
    maker = ExperienceMaker(strategy, actor, critic, ref, scorer, ppo, kl_ctl, RunningMoments(),
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    trainer = PPOTrainer(strategy, actor, critic, maker, prompts, ppo, cli_args.loop_config(args, "ppo"),
                         cli_args.tracker_config(args), fingerprint, frozen, tokenizer=tokenizer,
                         ckpt_meta={"pretrain": args.pretrain, "reward_pretrain": reward_paths,
                                    "remote_rm_url": list(remote.urls) if remote is not None else None,
                                    "critic_pretrain": critic_path if critic is not None else None},
                         ptx=PtxFeed(strategy, pretrain_data, args.micro_train_batch_size, tokenizer.pad_token_id,
                                     args.seed) if pretrain_data is not None else None, ptx_coef=args.ptx_coef,
                         ema=EmaWeights(actor.module, args.ema_beta) if args.enable_ema else None)
    trainer.fit()

    # 5. export (with --enable_ema the actor's averaged weights)
    if trainer.ema is not None:
        trainer.ema.copy_to(actor.module)
    save_model(strategy, actor, tokenizer, args.save_path)
    if args.save_value_network and critic is not None:
        save_model(strategy, critic, tokenizer, args.save_path.rstrip("/") + "_critic")


if __name__ == "__main__":
    run(main)
