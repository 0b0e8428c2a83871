"""The Ray PPO driver: it only coordinates. It owns the prompt sampler, schedules each rollout (vLLM
engines or the actor group generate; the actor, reference, critic and reward groups score their shares
of it), turns scores into advantages, has the actor and critic groups train at the same time, sends the
actor's new weights to the engines, and keeps the train state.

Checkpoints go through the same ``Checkpointer`` as every other loop, with this process as its single
rank: at a save the actor and critic ranks stage their files (DeepSpeed's ``save_checkpoint`` into
``<staging>/actor/`` and ``<staging>/critic/``, their RNG, the EMA), write them and report them; the
driver's ``CheckpointManager`` commits them once, with the driver's train state, under one ``latest``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from openrl_ckpt.checkpoint.contents import GroupFiles, StagedWrite
from openrl_ckpt.checkpoint.files import CheckpointError, read_manifest
from openrl_ckpt.checkpoint.manager import CheckpointManager, Resumed
from openrl_ckpt.checkpoint.state import TrainState, restore_rng
from openrl_ckpt.data.padding import left_pad
from openrl_ckpt.data.sampler import ResumableDistributedSampler
from openrl_ckpt.inference.batching import batch_seed
from openrl_ckpt.inference.generation import Generation
from openrl_ckpt.strategy.deepspeed import ReduceOp
from openrl_ckpt.trainers.base import LoopConfig
from openrl_ckpt.trainers.checkpointing import Checkpointer
from openrl_ckpt.trainers.ppo.control import FixedKLController, RunningMoments
from openrl_ckpt.trainers.ppo.experience import Experience, PPOConfig, Scorer, assign_advantages, layout_rollout
from openrl_ckpt.trainers.ppo.trainer import PPOState
from openrl_ckpt.trainers.ppo_ray.cluster import Role, RoleGroup, WorkerLost, gather
from openrl_ckpt.trainers.ppo_ray.worker import select, shard_rows
from openrl_ckpt.trainers.progress import StepProgress, TrackerConfig, training_run

log = logging.getLogger("openrl_ckpt")

ALGORITHM = "ppo_ray"


class DriverRank:
    """The driver as the Checkpointer's one rank: it decides alone, so its all-reduce is the identity."""

    rank = 0
    world_size = 1

    def __init__(self, zero_stage: int, global_batch_size: int) -> None:
        self._zero_stage = zero_stage
        self._global_batch_size = global_batch_size

    @property
    def is_rank_0(self) -> bool:
        return True

    @property
    def zero_stage(self) -> int:
        return self._zero_stage

    @property
    def global_batch_size(self) -> int:
        return self._global_batch_size

    def all_reduce(self, values: dict[str, float], op: ReduceOp = ReduceOp.MEAN) -> dict[str, float]:
        return dict(values)


@dataclass
class Groups:
    """Every group of the job. ``engines``: the vLLM engines' handles (none: the actor group generates)."""

    actor: RoleGroup
    critic: RoleGroup | None
    reference: RoleGroup | None
    reward: RoleGroup | None  # none when the rewards come over HTTP (--remote_rm_url)
    engines: list[Any]

    @property
    def trained(self) -> list[RoleGroup]:
        return [g for g in (self.actor, self.critic) if g is not None]

    def sizes(self) -> dict[str, int]:
        sizes = {g.role.value: g.world_size for g in (self.actor, self.critic, self.reference, self.reward)
                 if g is not None}
        return {**sizes, "vllm_engines": len(self.engines)}


@dataclass(frozen=True)
class GroupWrite:
    """A trained group's files of a checkpoint, written by its own ranks: the item reports them."""

    path: str
    group: RoleGroup

    def write(self, folder: Path) -> list[GroupFiles]:
        try:
            reports = self.group.run("write_checkpoint", str(folder))
        except WorkerLost as e:
            raise CheckpointError(f"checkpoint {folder.name} not committed: {e}") from None
        return [GroupFiles.from_json(r) for r in reports]


@dataclass(frozen=True)
class ActorExport:
    """The actor as --save_path holds it, gathered by its group and written by its rank 0."""

    path: str
    group: RoleGroup

    def write(self, folder: Path) -> None:
        self.group.run("write_export", str(folder))


class RemotePtx:
    """The --pretrain_data position, kept by the actor ranks (rank 0 reports it; all ranks load it)."""

    def __init__(self, actor: RoleGroup) -> None:
        self.actor = actor

    def state_dict(self) -> dict[str, Any]:
        return self.actor.run("ptx_state")[0]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.run("load_ptx_state", state)


class WeightSync:
    """The actor's weights into every vLLM engine: over a process group (rank 0 of the actor group and the
    engines) or the object store. ``check`` compares what the engines received with what was sent."""

    def __init__(self, ray: Any, groups: Groups, how: dict[str, Any]) -> None:
        self.ray = ray
        self.groups = groups
        self.how = how
        self.seconds = 0.0
        if how["kind"] == "group":
            world = how["world"]
            refs = groups.actor.submit("open_sender", how)
            refs += [(f"vLLM engine {i}", e.join_weight_group.remote(how["host"], how["port"], world, how["backend"]))
                     for i, e in enumerate(groups.engines)]
            gather(ray, refs)
            self.specs = groups.actor.run("weight_specs")[0]
        else:
            groups.actor.run("open_sender", how)

    def __call__(self, check: bool = False) -> None:
        started = time.perf_counter()
        engines = [(f"vLLM engine {i}", e) for i, e in enumerate(self.groups.engines)]
        if self.how["kind"] == "group":
            refs = self.groups.actor.submit("sync_weights", check)
            refs += [(name, e.receive_weights.remote(self.specs, check)) for name, e in engines]
            results = gather(self.ray, refs)
            sent, received = results[0], results[self.groups.actor.world_size:]
        else:
            sent = self.groups.actor.run("sync_weights", check)[0]
            received = gather(self.ray, [(name, e.receive_weights_object.remote(sent["boxed"], check))
                                         for name, e in engines])
        self.seconds = time.perf_counter() - started
        if check:
            wrong = [name for (name, _), digest in zip(engines, received) if digest != sent["digest"]]
            if wrong:
                raise WorkerLost(f"{', '.join(wrong)}: the weights received differ from the actor's (digest "
                                 f"{sent['digest'][:12]})")
            log.info("vLLM engines hold the actor's weights (digest %s, %d engine(s), %.2fs)", sent["digest"][:12],
                     len(engines), self.seconds)


class RayEngineStore:
    """The trained groups as the Checkpointer's engines: staged and written by their own ranks, loaded by
    them; the commit (and everything else of the checkpoint contract) is the driver's manager's."""

    def __init__(self, ray: Any, groups: Groups, sync: WeightSync | None) -> None:
        self.ray = ray
        self.groups = groups
        self.sync = sync

    def open_manager(self, ckpt_path: str, max_ckpt_num: int, max_ckpt_mem_gb: float,
                     background: bool) -> CheckpointManager:
        manager = CheckpointManager.single_process(ckpt_path, max_ckpt_num=max_ckpt_num,
                                                   max_ckpt_mem_gb=max_ckpt_mem_gb, background=background)
        # every rank writes into the driver's folder: it must see it (shared storage on a multi-node cluster)
        probe = Path(ckpt_path) / f".probe-{time.time_ns()}"
        probe.write_text("probe")
        try:
            for group in self.groups.trained:
                seen = group.run("sees", str(probe))
                if not all(seen):
                    missing = [group.name(r) for r, ok in enumerate(seen) if not ok]
                    raise CheckpointError(f"--ckpt_path {ckpt_path} is not visible to {', '.join(missing)}: Ray PPO "
                                          "writes each checkpoint from every trained rank into one folder, so it "
                                          "must be on storage every node shares")
        finally:
            probe.unlink(missing_ok=True)
        return manager

    def stage(self, staging: Path, *, host_copy: bool, engine_files: bool, hf_weights: bool) -> list[StagedWrite]:
        refs = []
        for group in self.groups.trained:
            refs += group.submit("stage_checkpoint", str(staging), host_copy, engine_files, hf_weights)
        try:
            gather(self.ray, refs)
        except WorkerLost as e:
            raise CheckpointError(f"checkpoint not committed: {e}") from None
        return [GroupWrite(g.role.value, g) for g in self.groups.trained]

    def stage_export(self) -> StagedWrite | None:
        self.groups.actor.run("stage_export")
        return ActorExport(".", self.groups.actor)

    def load(self, resumed: Resumed) -> None:
        meta = read_manifest(resumed.path).get("meta", {})
        saved_sizes = meta.get("groups", {})
        refs = []
        for group in self.groups.trained:
            saved = int(saved_sizes.get(group.role.value, group.world_size))
            if saved != group.world_size:
                log.warning("%s was saved with %d %s rank(s), this run has %d: its engine goes through DeepSpeed's "
                            "universal format and its ranks' RNG starts from the seed", resumed.path, saved,
                            group.role.value, group.world_size)
            refs += group.submit("load_checkpoint", str(resumed.path), resumed.step, saved, meta.get("zero_stage"))
        gather(self.ray, refs)
        if resumed.state.rng:
            restore_rng(resumed.state.rng[0])
        if self.sync is not None:  # the engines roll out with the loaded weights, checked, from the first step
            self.sync(check=True)


def per_rank_shares(exp: Experience, group: RoleGroup) -> list[tuple[Experience]]:
    """Each rank's contiguous rows of the rollout, as the leading argument of its call."""
    return [(select(exp, shard_rows(len(exp), group.world_size, r)),) for r in range(group.world_size)]


class RolloutMaker:
    """One rollout over the groups: generate, score each share, then advantages on the driver."""

    def __init__(self, ray: Any, groups: Groups, ppo: PPOConfig, kl_ctl: FixedKLController, moments: RunningMoments,
                 *, eos_token_id: int, pad_token_id: int, remote_scorer: Scorer | None = None) -> None:
        self.ray = ray
        self.groups = groups
        self.remote_scorer = remote_scorer  # --remote_rm_url: the driver asks the reward servers itself
        self.ppo = ppo
        self.kl_ctl = kl_ctl
        self.moments = moments
        self.eos = eos_token_id
        self.pad = pad_token_id

    @torch.no_grad()
    def make(self, prompts: list[list[int]], step: int,
             labels: list[Any] | None = None) -> tuple[Experience, dict[str, float]]:
        """``labels``: one per prompt (--label_key), for the reward servers."""
        ppo = self.ppo
        samples = [p for p in prompts for _ in range(ppo.n_samples_per_prompt)]
        started = time.perf_counter()
        gens = self._generate_vllm(samples, step) if self.groups.engines else self._generate_hf(samples, step)
        generate_s = time.perf_counter() - started
        exp = layout_rollout(gens, self.pad, torch.device("cpu"))
        roles = [g for g in (self.groups.actor, self.groups.reference, self.groups.critic, self.groups.reward)
                 if g is not None]
        refs, spans = [], []
        for group in roles:
            shares = per_rank_shares(exp, group)
            spans.append((group.role, len(refs), len(refs) + group.world_size))
            refs += group.submit("forward", per_rank=shares)
        score = None
        if self.remote_scorer is not None:  # while the groups compute their shares
            per_prompt = labels or [None] * len(prompts)
            sample_labels = [label for label in per_prompt for _ in range(ppo.n_samples_per_prompt)]
            score = self.remote_scorer(exp.inputs(torch.arange(len(exp))), sample_labels, exp.prompt_len)
        results = gather(self.ray, refs)
        out = {role: torch.cat(results[a:b]) for role, a, b in spans}
        exp.old_logp = out[Role.ACTOR]
        metrics = assign_advantages(exp, out[Role.REWARD] if score is None else score, out.get(Role.REFERENCE),
                                    out.get(Role.CRITIC), ppo, self.kl_ctl, self.moments, totals=dict)
        answer_tokens = int(exp.action_mask.sum())
        metrics.update(generate_s=generate_s, rollout_s=time.perf_counter() - started,
                       rollout_tokens_per_s=answer_tokens / max(generate_s, 1e-9))
        return exp, metrics

    def _generate_hf(self, samples: list[list[int]], step: int) -> list[tuple[Generation, Any]]:
        actor = self.groups.actor
        shares = [(samples[shard_rows(len(samples), actor.world_size, r)],) for r in range(actor.world_size)]
        parts = actor.run("generate", step, self.ppo.sampling, per_rank=shares)
        return [gen for part in parts for gen in part]

    def _generate_vllm(self, samples: list[list[int]], step: int) -> list[tuple[Generation, Any]]:
        """The engines answer contiguous shares of the samples, each sample with a seed of its own index, so
        the answers do not depend on how many engines there are or how they batch."""
        engines = self.groups.engines
        seeds = [batch_seed(self.ppo.seed, step, i) for i in range(len(samples))]
        per = -(-len(samples) // len(engines))
        refs = [(f"vLLM engine {i}", e.generate.remote(samples[i * per:(i + 1) * per], seeds[i * per:(i + 1) * per],
                                                       self.ppo.sampling))
                for i, e in enumerate(engines) if samples[i * per:(i + 1) * per]]
        answers = [a for part in gather(self.ray, refs) for a in part]
        m = self.ppo.micro_rollout_batch_size
        return [self._as_generation(samples[i:i + m], answers[i:i + m]) for i in range(0, len(samples), m)]

    def _as_generation(self, prompts: list[list[int]], answers: list[list[int]]) -> tuple[Generation, Any]:
        """vLLM's token ids in the layout Hugging Face generate returns: prompts left-padded, answers
        right-padded, the mask over each answer's own tokens."""
        ids, mask = left_pad(prompts, self.pad)
        width = max(1, max(len(a) for a in answers))
        responses = torch.full((len(answers), width), self.pad, dtype=torch.long)
        response_mask = torch.zeros((len(answers), width), dtype=torch.bool)
        for row, answer in enumerate(answers):
            responses[row, :len(answer)] = torch.tensor(answer, dtype=torch.long)
            response_mask[row, :len(answer)] = True
        ends = [bool(a) and a[-1] == self.eos for a in answers]
        return Generation(torch.cat([ids, responses], 1), response_mask, ids.shape[1], ends), mask


class RayPPOTrainer:
    def __init__(self, ray: Any, groups: Groups, maker: RolloutMaker, sync: WeightSync | None, prompts: Dataset,
                 ppo: PPOConfig, cfg: LoopConfig, tracker_cfg: TrackerConfig, model_fingerprint: str,
                 frozen: dict[str, list[dict[str, Any]]], *, zero_stage: int, ckpt_meta: dict[str, Any],
                 has_ptx: bool) -> None:
        self.ray = ray
        self.groups = groups
        self.maker = maker
        self.sync = sync
        self.ppo = ppo
        self.cfg = cfg
        self.tracker_cfg = tracker_cfg
        # the driver samples every prompt of a rollout (a world of one); the groups get their shares
        self.sampler = ResumableDistributedSampler(len(prompts), ppo.rollout_batch_size, 1, 0,  # type: ignore[arg-type]
                                                   seed=cfg.seed, shuffle=cfg.shuffle)
        self.loader = DataLoader(prompts, batch_size=ppo.rollout_batch_size, sampler=self.sampler, collate_fn=list,
                                 num_workers=0, drop_last=False, generator=torch.Generator())
        self.total_steps = self.sampler.steps_per_epoch * ppo.num_episodes
        self.driver = DriverRank(zero_stage, ppo.rollout_batch_size)
        self.state = TrainState(algorithm=ALGORITHM, global_batch_size=ppo.rollout_batch_size, world_size=1,
                                model_fingerprint=model_fingerprint, zero_stage=zero_stage)
        self.store = RayEngineStore(ray, groups, sync)
        self.checkpointer = Checkpointer(
            cfg.checkpoint, self.driver, self.store, algorithm=ALGORITHM,
            algorithm_state=PPOState(maker.kl_ctl, maker.moments, frozen, RemotePtx(groups.actor) if has_ptx else None),
            total_steps=self.total_steps, meta={**ckpt_meta, "groups": groups.sizes()})

    def fit(self) -> TrainState:
        """Train to the end; raises ``Preempted`` once a stop request is handled (checkpoint committed)."""
        with training_run(self.checkpointer, self.driver, self.tracker_cfg, self.state,  # type: ignore[arg-type]
                          total_steps=self.total_steps, epoch_positions=self.sampler.epoch_positions,
                          logging_steps=self.cfg.logging_steps, desc=ALGORITHM) as progress:
            self.state = progress.state
            if self.sync is not None and self.state.global_step == 0:
                # a fresh start: the engines get the actor's weights the way a resume gives them (checked),
                # so the first rollout of both comes from weights that reached them the same way
                self.sync(check=True)
            self.checkpointer.finish(self.state, self._loop(progress))
        return self.state

    def _loop(self, progress: StepProgress) -> str | None:
        state, ppo = self.state, self.ppo
        stopped_by = None
        while not progress.done and stopped_by is None:
            self.sampler.set_consumed(state.consumed_samples)
            for rows in self.loader:
                started = time.perf_counter()
                step = state.global_step
                exp, metrics = self.maker.make([r["input_ids"] for r in rows], step, [r.get("label") for r in rows])
                metrics.update(self.update(exp, step))
                self.maker.kl_ctl.update(metrics["kl"], ppo.rollout_batch_size * ppo.n_samples_per_prompt)
                if self.sync is not None:
                    self.sync()
                    metrics["weight_sync_s"] = self.sync.seconds
                progress.end_step(len(rows))
                if progress.log_due:
                    metrics.update(step_s=time.perf_counter() - started, episode=state.epoch)
                    progress.log(metrics)
                stopped_by = self.checkpointer.after_step(state, epoch_end=progress.epoch_end)
                if stopped_by is not None or progress.done:
                    break
        return stopped_by

    def update(self, exp: Experience, step: int) -> dict[str, float]:
        """The actor and critic groups train on their shares of the rollout at the same time."""
        refs, spans = [], []
        for group in self.groups.trained:
            shares = per_rank_shares(exp, group)
            spans.append((len(refs), len(refs) + group.world_size))
            refs += group.submit("train", step, self.maker.kl_ctl.value, per_rank=shares)
        started = time.perf_counter()
        results = gather(self.ray, refs)
        metrics: dict[str, float] = {"train_s": time.perf_counter() - started}
        for a, b in spans:
            for key in results[a]:
                metrics[key] = sum(r[key] for r in results[a:b]) / (b - a)
        return metrics
