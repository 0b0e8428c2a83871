"""The Ray side of Ray PPO: joining a cluster, placing each model's group of ranks (placement groups,
colocation), and calling a group so that a dead rank ends the job with its name instead of a hang.

On a machine without GPUs one "GPU" of the flags (``--actor_num_gpus_per_node`` ...) is one bundle of one
CPU: a rank of a CPU process group, as ``deepspeed --num_gpus`` counts them on CPU.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from openrl_ckpt.checkpoint.files import CheckpointError
from openrl_ckpt.errors import UserError

log = logging.getLogger("openrl_ckpt")

# The environment every Ray actor of the job gets from the driver (offline flags, test fault points,
# thread counts, the source tree under test): Ray starts workers from the cluster's environment.
FORWARDED_ENV = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "PYTHONHASHSEED",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM",
                 "WANDB_MODE", "OPENRL_FAULT", "TORCH_EXTENSIONS_DIR", "VLLM_CPU_KVCACHE_SPACE",
                 "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_RPC_BASE_PATH", "VLLM_CACHE_ROOT", "VLLM_CPU_OMP_THREADS_BIND",
                 "TMPDIR")
PLACEMENT_TIMEOUT_S = 120.0  # a placement group that cannot be placed in this time never will be


class Role(str, enum.Enum):
    ACTOR = "actor"
    CRITIC = "critic"
    REFERENCE = "ref"
    REWARD = "reward"

    @property
    def trained(self) -> bool:
        return self in (Role.ACTOR, Role.CRITIC)


class WorkerLost(Exception):
    """A rank of a group (or a vLLM engine) died or failed: the job ends with this one line."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("train_ppo_ray needs Ray: pip install 'openrl_ckpt[ray]' (scripts/setup.sh installs it)") \
            from None
    return ray


def connect(bundles_needed: int) -> Any:
    """Join the cluster named by RAY_ADDRESS (set by ``ray job submit``, or by hand), else start a local one
    for this job with at least as many CPUs as the job's bundles (CPU ranks share the cores, as they do
    under ``deepspeed --num_gpus`` on CPU)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime_env = {"env_vars": env_vars}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        log.info("joined the Ray cluster at %s", address)
    else:
        cpus = max(os.cpu_count() or 1, bundles_needed)
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True,
                 object_store_memory=int(os.environ.get("OPENRL_RAY_OBJECT_STORE_MB", "512")) * 2**20)
        log.info("started a local Ray cluster with %d CPUs (set RAY_ADDRESS to join a running one)", cpus)
    return ray


@dataclass(frozen=True)
class Unit:
    """What one rank ("GPU" in the flags) is on this cluster: a GPU, or a CPU bundle."""

    gpu: bool

    def bundle(self) -> dict[str, float]:
        return {"GPU": 1.0, "CPU": 1.0} if self.gpu else {"CPU": 1.0}

    def options(self, share: float) -> dict[str, float]:
        """A rank's resources inside its bundle: ``share`` of it (colocated groups split a bundle)."""
        return {"num_gpus": share, "num_cpus": 0.0} if self.gpu else {"num_cpus": share}


def cluster_unit(ray: Any) -> Unit:
    return Unit(gpu=ray.cluster_resources().get("GPU", 0) > 0)


def check_resources(ray: Any, unit: Unit, needs: dict[str, int]) -> None:
    """One line naming what the job needs and what the cluster has, before anything waits to be placed."""
    total = sum(needs.values())
    key = "GPU" if unit.gpu else "CPU"
    have = int(ray.cluster_resources().get(key, 0))
    if total > have:
        detail = " + ".join(f"{name} {n}" for name, n in needs.items() if n)
        raise UserError(f"this job needs {total} {key} bundles ({detail}) and the Ray cluster has {have} {key}s: "
                        "lower the --*_num_gpus_per_node / --vllm_num_engines flags, colocate groups "
                        "(--colocate_all_models, --colocate_actor_ref, --colocate_critic_reward) or add nodes")


def placement_group(ray: Any, unit: Unit, size: int, name: str) -> Any:
    """``size`` bundles packed onto as few nodes as possible, ready (or a one-line error)."""
    from ray.util.placement_group import placement_group as make

    pg = make([unit.bundle() for _ in range(size)], strategy="PACK", name=name)
    ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        raise UserError(f"Ray could not place {name} ({size} x {unit.bundle()}) within {PLACEMENT_TIMEOUT_S:.0f}s: "
                        f"the cluster has {ray.available_resources()} free")
    return pg


def in_bundle(pg: Any, index: int) -> Any:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index,
                                            placement_group_capture_child_tasks=True)


def gather(ray: Any, named_refs: Sequence[tuple[str, Any]]) -> list[Any]:
    """The results of remote calls, in order. The first failure ends the wait at once: a dead rank is
    ``WorkerLost`` naming it (its peers may be blocked in a collective with it forever), and a user or
    checkpoint error raised remotely comes back as itself."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    names = {ref: name for name, ref in named_refs}
    pending = [ref for _, ref in named_refs]
    results: dict[Any, Any] = {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ref = ready[0]
        try:
            results[ref] = ray.get(ref)
        except RayTaskError as e:
            cause = e.cause
            if isinstance(cause, (UserError, CheckpointError)):
                raise cause from None
            raise WorkerLost(f"{names[ref]} failed: {type(cause).__name__}: {_first_line(cause)}") from None
        except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
            raise WorkerLost(f"{names[ref]} died ({_first_line(e)})") from None
    return [results[ref] for _, ref in named_refs]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


class RoleGroup:
    """The ranks of one role, each a Ray actor; calls go to every rank and are gathered."""

    def __init__(self, ray: Any, role: Role, handles: list[Any]) -> None:
        self.ray = ray
        self.role = role
        self.handles = handles

    @property
    def world_size(self) -> int:
        return len(self.handles)

    def name(self, rank: int) -> str:
        return f"{self.role.value} rank {rank}"

    def submit(self, method: str, *args: Any, per_rank: Sequence[Sequence[Any]] | None = None) -> list[tuple[str, Any]]:
        """Start ``method`` on every rank (``per_rank[r]``: rank r's own leading arguments)."""
        refs = []
        for rank, handle in enumerate(self.handles):
            own = tuple(per_rank[rank]) if per_rank is not None else ()
            refs.append((self.name(rank), getattr(handle, method).remote(*own, *args)))
        return refs

    def run(self, method: str, *args: Any, per_rank: Sequence[Sequence[Any]] | None = None) -> list[Any]:
        return gather(self.ray, self.submit(method, *args, per_rank=per_rank))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
