"""Ray PPO's plan from the flags, without a cluster: group sizes, colocation pools and their one-line
errors, the bundles a job needs against what a cluster has, and the shares of a rollout per rank."""

from __future__ import annotations

import argparse
import sys

import pytest

from openrl_ckpt.errors import UserError
from openrl_ckpt.trainers.ppo_ray.cluster import Role, Unit, check_resources, import_ray
from openrl_ckpt.trainers.ppo_ray.topology import plan
from openrl_ckpt.trainers.ppo_ray.worker import shard_rows


def flags(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {f"{r}_{k}": v for r in ("actor", "critic", "ref", "reward")
                                 for k, v in (("num_nodes", 1), ("num_gpus_per_node", 2))}
    values.update(init_kl_coef=0.01, vllm_num_engines=2, vllm_tensor_parallel_size=1, colocate_all_models=False,
                  colocate_actor_ref=False, colocate_critic_reward=False)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_each_group_its_own_bundles_by_default() -> None:
    topology = plan(flags(), trains_critic=True)
    assert topology.sizes == {Role.ACTOR: 2, Role.REWARD: 2, Role.REFERENCE: 2, Role.CRITIC: 2}
    assert topology.needs() == {"actor": 2, "reward": 2, "ref": 2, "critic": 2, "vLLM engines": 2}
    assert topology.bundles == 10


def test_colocated_pairs_share_their_bundles() -> None:
    topology = plan(flags(colocate_actor_ref=True, colocate_critic_reward=True, reward_num_nodes=1), True)
    assert topology.needs() == {"actor + ref": 2, "critic + reward": 2, "vLLM engines": 2}
    assert topology.pool_of("ref").share == 0.5


def test_colocate_all_models_puts_engines_on_the_actors_bundles() -> None:
    topology = plan(flags(colocate_all_models=True), trains_critic=True)
    assert topology.needs() == {"all models": 2} and topology.bundles == 2
    assert topology.pool_of("vllm").share == pytest.approx(0.2)  # actor, reward, ref, critic, engines


def test_no_reference_or_critic_when_the_flags_say_so() -> None:
    topology = plan(flags(init_kl_coef=0.0, vllm_num_engines=0), trains_critic=False)
    assert topology.sizes == {Role.ACTOR: 2, Role.REWARD: 2} and topology.bundles == 4


@pytest.mark.parametrize("overrides, needle", [
    ({"colocate_actor_ref": True, "ref_num_gpus_per_node": 1}, "--colocate_actor_ref shares one set of bundles "
                                                               "between groups of equal size; got actor 2, ref 1"),
    ({"colocate_all_models": True, "vllm_num_engines": 1}, "vLLM engines 1 x tensor parallel 1"),
    ({"actor_num_gpus_per_node": 0}, "--actor_num_nodes x --actor_num_gpus_per_node must be at least 1"),
    ({"vllm_tensor_parallel_size": 0}, "--vllm_tensor_parallel_size at least 1"),
])
def test_unequal_or_empty_groups_are_one_line(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        plan(flags(**overrides), trains_critic=True)


class FakeRay:
    def __init__(self, resources: dict[str, float]) -> None:
        self.resources = resources

    def cluster_resources(self) -> dict[str, float]:
        return self.resources


def test_a_job_larger_than_the_cluster_says_what_it_needs() -> None:
    needs = plan(flags(), trains_critic=True).needs()
    with pytest.raises(UserError, match=r"needs 10 CPU bundles \(actor 2 \+ reward 2 \+ ref 2 \+ critic 2 \+ vLLM "
                                        r"engines 2\) and the Ray cluster has 4 CPUs"):
        check_resources(FakeRay({"CPU": 4.0}), Unit(gpu=False), needs)
    check_resources(FakeRay({"CPU": 10.0}), Unit(gpu=False), needs)  # enough: no error
    with pytest.raises(UserError, match="has 8 GPUs"):
        check_resources(FakeRay({"CPU": 64.0, "GPU": 8.0}), Unit(gpu=True), needs)


def test_without_ray_installed_the_job_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(UserError, match="train_ppo_ray needs Ray"):
        import_ray()


def test_each_rank_gets_a_contiguous_equal_share() -> None:
    assert [shard_rows(12, 3, r) for r in range(3)] == [slice(0, 4), slice(4, 8), slice(8, 12)]
