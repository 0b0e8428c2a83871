"""Where each group of Ray PPO runs: the sizes from the flags, the colocation plan (which groups share
bundles), and the creation of the groups and vLLM engines on the cluster."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from openrl_ckpt.errors import UserError
from openrl_ckpt.trainers.ppo_ray.cluster import Role, RoleGroup, Unit, gather, in_bundle, placement_group
from openrl_ckpt.trainers.ppo_ray.worker import PPOWorker, WorkerSpec

log = logging.getLogger("openrl_ckpt")

ENGINES = "vllm"  # the vLLM engines' place in a shared pool (--colocate_all_models)


@dataclass(frozen=True)
class Pool:
    """Bundles that one or more groups share (each rank of a sharing group takes a share of its bundle)."""

    name: str
    size: int
    members: tuple[str, ...]

    @property
    def share(self) -> float:
        return 1.0 / len(self.members)


@dataclass(frozen=True)
class Topology:
    sizes: dict[Role, int]  # the groups this run has, with their world sizes
    engines: int
    tensor_parallel_size: int
    pools: list[Pool] = field(default_factory=list)

    @property
    def bundles(self) -> int:
        own = 0 if self.engines_pooled else self.engines * self.tensor_parallel_size
        return sum(p.size for p in self.pools) + own

    @property
    def engines_pooled(self) -> bool:
        return any(ENGINES in p.members for p in self.pools)

    def needs(self) -> dict[str, int]:
        needs = {p.name: p.size for p in self.pools}
        if self.engines and not self.engines_pooled:
            needs["vLLM engines"] = self.engines * self.tensor_parallel_size
        return needs

    def pool_of(self, member: str) -> Pool:
        return next(p for p in self.pools if member in p.members)


def plan(args: Any, trains_critic: bool, reward_group: bool = True) -> Topology:
    """Group sizes and pools from the flags (no reward group when the rewards come over HTTP); colocated
    groups must have equal sizes (one line otherwise)."""
    sizes = {Role.ACTOR: args.actor_num_nodes * args.actor_num_gpus_per_node}
    if reward_group:
        sizes[Role.REWARD] = args.reward_num_nodes * args.reward_num_gpus_per_node
    if args.init_kl_coef > 0:
        sizes[Role.REFERENCE] = args.ref_num_nodes * args.ref_num_gpus_per_node
    if trains_critic:
        sizes[Role.CRITIC] = args.critic_num_nodes * args.critic_num_gpus_per_node
    for role, size in sizes.items():
        if size < 1:
            raise UserError(f"--{role.value}_num_nodes x --{role.value}_num_gpus_per_node must be at least 1, "
                            f"got {size}")
    engines, tp = args.vllm_num_engines, args.vllm_tensor_parallel_size
    if engines < 0 or tp < 1:
        raise UserError(f"--vllm_num_engines must be 0 or more and --vllm_tensor_parallel_size at least 1, got "
                        f"{engines} and {tp}")

    def same_size(flag: str, roles: list[Role], extra: dict[str, int] | None = None) -> None:
        found = {f"{r.value} {sizes[r]}": sizes[r] for r in roles if r in sizes}
        found.update(extra or {})
        if len(set(found.values())) > 1:
            raise UserError(f"{flag} shares one set of bundles between groups of equal size; got "
                            + ", ".join(found))

    pools: list[Pool] = []
    if args.colocate_all_models:
        extra = {f"vLLM engines {engines} x tensor parallel {tp}": engines * tp} if engines else {}
        same_size("--colocate_all_models", list(sizes), extra)
        members = tuple(r.value for r in sizes) + ((ENGINES,) if engines else ())
        pools.append(Pool("all models", sizes[Role.ACTOR], members))
        return Topology(sizes, engines, tp, pools)
    placed: set[Role] = set()
    for flag, pair, on in (("--colocate_actor_ref", [Role.ACTOR, Role.REFERENCE], args.colocate_actor_ref),
                           ("--colocate_critic_reward", [Role.CRITIC, Role.REWARD], args.colocate_critic_reward)):
        present = [r for r in pair if r in sizes]
        if on and len(present) == 2:
            same_size(flag, present)
            pools.append(Pool(" + ".join(r.value for r in present), sizes[present[0]], tuple(r.value for r in present)))
            placed.update(present)
    for role, size in sizes.items():
        if role not in placed:
            pools.append(Pool(role.value, size, (role.value,)))
    return Topology(sizes, engines, tp, pools)


def check_node_size(ray: Any, unit: Unit, tensor_parallel_size: int) -> None:
    key = "GPU" if unit.gpu else "CPU"
    largest = max((int(n["Resources"].get(key, 0)) for n in ray.nodes() if n.get("Alive")), default=0)
    if tensor_parallel_size > largest:
        raise UserError(f"--vllm_tensor_parallel_size {tensor_parallel_size} is larger than the largest node of the "
                        f"Ray cluster ({largest} {key}s): one engine's ranks must share a node")


def create_groups(ray: Any, unit: Unit, topology: Topology,
                  spec: WorkerSpec) -> tuple[dict[Role, RoleGroup], dict[str, Any], dict[str, Any]]:
    """Every group's ranks placed and set up (each group its own process group); returns the groups, the
    identities of their models and the placement groups (to remove at the end)."""
    worker_class = ray.remote(PPOWorker)
    pgs = {pool.name: placement_group(ray, unit, pool.size, f"openrl_ckpt {pool.name}") for pool in topology.pools}
    groups: dict[Role, RoleGroup] = {}
    for role, size in topology.sizes.items():
        pool = topology.pool_of(role.value)
        # two threads: a background checkpoint write (--async_save) runs beside the next training call
        handles = [worker_class.options(**unit.options(pool.share), max_concurrency=2,
                                        scheduling_strategy=in_bundle(pgs[pool.name], rank)).remote(role.value)
                   for rank in range(size)]
        groups[role] = RoleGroup(ray, role, handles)
    refs = []
    spec_ref = ray.put(spec)  # once into the object store (it may hold the --pretrain_data set), read by every rank
    for group in groups.values():  # every group joins its own process group, all at the same time
        master = gather(ray, [(group.name(0), group.handles[0].address.remote())])[0]
        per_rank = [(rank, group.world_size, master) for rank in range(group.world_size)]
        refs += group.submit("setup", spec_ref, per_rank=per_rank)
    identities: dict[str, Any] = {}
    for identity in gather(ray, refs):
        identities.update(identity)
    log.info("groups ready: %s", ", ".join(f"{g.role.value} {g.world_size} rank(s)" for g in groups.values()))
    return groups, identities, pgs


def create_engines(ray: Any, unit: Unit, topology: Topology, args: Any, pgs: dict[str, Any]) -> list[Any]:
    """``--vllm_num_engines`` vLLM engines with ``--vllm_tensor_parallel_size`` ranks each, started."""
    from openrl_ckpt.trainers.ppo_ray.rollout_engine import VLLMEngine

    if topology.engines == 0:
        return []
    engine_class = ray.remote(VLLMEngine)
    tp = topology.tensor_parallel_size
    from transformers import AutoConfig

    # prompts longer than --prompt_max_len were dropped; the model's own limit caps the rest
    limit = getattr(AutoConfig.from_pretrained(args.pretrain), "max_position_embeddings", None)
    max_len = min(args.prompt_max_len + args.generate_max_len, limit or 1 << 30)
    handles = []
    for index in range(topology.engines):
        if topology.engines_pooled:
            pool = topology.pool_of(ENGINES)
            options: dict[str, Any] = {**unit.options(pool.share * tp),
                                       "scheduling_strategy": in_bundle(pgs[pool.name], index * tp)}
        else:
            options = unit.options(float(tp))
        handles.append(engine_class.options(**options).remote(
            index, args.pretrain, args.seed, tp, max_len, bf16=args.bf16,
            enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization))
    gather(ray, [(f"vLLM engine {i}", h.ping.remote()) for i, h in enumerate(handles)])
    log.info("%d vLLM engine(s) ready (tensor parallel %d)", len(handles), tp)
    return handles
