"""One rank of one model's process group in Ray PPO, as a Ray actor.

Each role is its own torch.distributed world running DeepSpeed: the actor and critic train (ZeRO 0-3),
the reference and reward models are frozen. The driver sends each rank its share of a rollout and
gathers what it computed; checkpoint files are written by the ranks that hold them, straight into the
driver's staging folder, and reported back for the one commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from openrl_ckpt.checkpoint.contents import BytesFile, CheckpointContents, StagedWrite
from openrl_ckpt.checkpoint.faults import fault_point
from openrl_ckpt.checkpoint.manager import Resumed
from openrl_ckpt.checkpoint.state import TrainState, capture_rng, restore_rng
from openrl_ckpt.data.padding import left_pad
from openrl_ckpt.inference.batching import batch_seed
from openrl_ckpt.inference.generation import Generation, SamplingConfig, generate
from openrl_ckpt.models.actor import ModelConfig
from openrl_ckpt.strategy.deepspeed import OptimConfig, StrategyConfig
from openrl_ckpt.trainers.ppo.experience import Experience, PPOConfig, RewardScorer, action_logprobs, critic_values
from openrl_ckpt.trainers.ppo_ray.cluster import Role

log = logging.getLogger("openrl_ckpt")

RNG_FILE = "rng_rank{rank}.json"  # inside each trained role's folder: the RNG of that rank (JSON)


def shard_rows(total: int, world_size: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous share of ``total`` rows (``total`` is a multiple of ``world_size``)."""
    per = total // world_size
    return slice(rank * per, (rank + 1) * per)


def select(exp: Experience, rows: slice) -> Experience:
    """The rows of a rollout, as a rollout of its own (what one rank receives)."""
    def part(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[rows].contiguous()

    return Experience(exp.sequences[rows].contiguous(), exp.attention_mask[rows].contiguous(),
                      exp.position_ids[rows].contiguous(), exp.prompt_len, exp.action_mask[rows].contiguous(),
                      exp.old_logp[rows].contiguous(), exp.advantages[rows].contiguous(), part(exp.values),
                      part(exp.returns), part(exp.ref_logp))


@dataclass(frozen=True)
class WorkerSpec:
    """What every rank builds its part from (the driver makes it from the flags)."""

    strategy: StrategyConfig
    ppo: PPOConfig
    actor: ModelConfig  # also the reference model and the tokenizer
    actor_optim: OptimConfig
    critic: ModelConfig | None
    critic_optim: OptimConfig
    rewards: list[tuple[ModelConfig, bool]]  # each reward model, and whether it reads its own tokenizer
    value_head_prefix: str
    ref_reward_offload: bool
    optimizer_steps: int  # the learning-rate schedule's length
    ema_beta: float | None = None  # --enable_ema
    ptx_data: Any = None  # the tokenized --pretrain_data (--ptx_coef)
    ptx_coef: float = 0.0
    chat_template: str | None = None  # --tokenizer_chat_template: the tokenizer the checkpoints and export hold
    use_fast_tokenizer: bool = True  # --disable_fast_tokenizer

    @property
    def reward_paths(self) -> list[str]:
        return [cfg.pretrain for cfg, _ in self.rewards]


class PPOWorker:
    """A rank of the ``role`` group. ``setup`` joins the group's process group and loads its model(s)."""

    def __init__(self, role: str) -> None:
        self.role = Role(role)
        self.engine: Any = None  # the trained DeepSpeed engine (actor, critic)
        self.frozen: Any = None  # reference model, or the reward scorer
        self.ema: Any = None
        self.ptx: Any = None
        self._staged: list[StagedWrite] = []
        self._export: StagedWrite | None = None

    # ------------------------------------------------------------------ set-up
    def address(self) -> tuple[str, int]:
        """Where this rank (rank 0 of its group) can host the group's rendezvous."""
        import ray

        from openrl_ckpt.trainers.ppo_ray.cluster import free_port

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, rank: int, world_size: int, master: tuple[str, int], spec: WorkerSpec) -> dict[str, Any]:
        """Join the group (RANK/WORLD_SIZE/MASTER_* as a launcher sets them), load this role's model(s);
        returns their identities for the train state."""
        from openrl_ckpt.data.templates import apply_tokenizer_chat_template
        from openrl_ckpt.models.actor import load_causal_lm, load_tokenizer, model_fingerprint
        from openrl_ckpt.models.reward import load_reward_model
        from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy
        from openrl_ckpt.trainers.common import load_frozen, reference_identity
        from openrl_ckpt.utils.tracking import setup_logging

        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        self.spec, self.ppo = spec, spec.ppo
        self.strategy = strategy = DeepspeedStrategy(spec.strategy)
        strategy.setup_distributed()
        setup_logging(strategy.rank)
        self.tokenizer = tokenizer = load_tokenizer(spec.actor.pretrain, padding_side="left",
                                                    use_fast=spec.use_fast_tokenizer)
        apply_tokenizer_chat_template(tokenizer, spec.chat_template)
        strategy.before_model_load()
        identity: dict[str, Any] = {}
        if self.role is Role.ACTOR:
            model = load_causal_lm(spec.actor)
            identity["fingerprint"] = model_fingerprint(model)
            self.engine = strategy.prepare(model, spec.actor_optim, spec.optimizer_steps)
            if spec.ema_beta is not None:
                from openrl_ckpt.trainers.ppo.ema import EmaWeights

                self.ema = EmaWeights(self.engine.module, spec.ema_beta)
            if spec.ptx_data is not None:
                from openrl_ckpt.trainers.ppo.ptx import PtxFeed

                self.ptx = PtxFeed(strategy, spec.ptx_data, spec.strategy.micro_train_batch_size,
                                   tokenizer.pad_token_id, spec.strategy.seed)
        elif self.role is Role.CRITIC:
            assert spec.critic is not None
            model = load_reward_model(spec.critic, spec.value_head_prefix, require_head=True)
            self.engine = strategy.prepare(model, spec.critic_optim, spec.optimizer_steps)
        elif self.role is Role.REFERENCE:
            self.frozen, identity["--pretrain (reference)"] = load_frozen(spec.actor, strategy,
                                                                          offload=spec.ref_reward_offload)
        else:
            models, ids = [], []
            for cfg, own_tokenizer in spec.rewards:
                model = load_reward_model(replace(cfg, gradient_checkpointing=False), spec.value_head_prefix,
                                          require_head=True)
                ids.append(reference_identity(cfg.pretrain, model))
                models.append((strategy.prepare_frozen(model, spec.ref_reward_offload),
                               load_tokenizer(cfg.pretrain, use_fast=spec.use_fast_tokenizer) if own_tokenizer
                               else None))
            self.frozen = RewardScorer(models, strategy.device, tokenizer)
            identity["--reward_pretrain"] = ids
        return identity

    # ------------------------------------------------------------------ a rollout
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], step: int, sampling: SamplingConfig) -> list[tuple[Generation, Any]]:
        """The actor's answers to this rank's samples with Hugging Face generate (--vllm_num_engines 0), in
        micro batches; each call's seed names this rank's i-th call of the step."""
        strategy, ppo = self.strategy, self.ppo
        m = ppo.micro_rollout_batch_size
        chunks = [prompts[i:i + m] for i in range(0, len(prompts), m)]
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        out = []
        self.engine.eval()
        for i, chunk in enumerate(chunks):
            ids, mask = left_pad(chunk, pad)
            gen = generate(self.engine, ids.to(strategy.device), mask.to(strategy.device), sampling,
                           eos_token_id=eos, pad_token_id=pad, zero_stage=strategy.cfg.zero_stage,
                           seed=batch_seed(ppo.seed, step, strategy.rank * len(chunks) + i))
            out.append((Generation(gen.sequences.cpu(), gen.response_mask.cpu(), gen.prompt_len, gen.ends_with_eos),
                        mask))
        self.engine.train()
        return out

    @torch.no_grad()
    def forward(self, exp: Experience) -> torch.Tensor:
        """This role's numbers for its rows of the rollout: the actor's and the reference's log-probabilities
        of the answer tokens, the critic's values, or the reward models' mean score."""
        fault_point(f"{self.role.value}_forward")
        dev = self.strategy.device
        m = self.ppo.micro_rollout_batch_size
        model = self.engine if self.engine is not None else self.frozen
        if self.engine is not None:
            self.engine.eval()
        parts = []
        for start in range(0, len(exp), m):
            rows = torch.arange(start, min(start + m, len(exp)))
            inputs = {k: v.to(dev) for k, v in exp.inputs(rows).items()}
            if self.role in (Role.ACTOR, Role.REFERENCE):
                parts.append(action_logprobs(model, inputs, exp.prompt_len))
            elif self.role is Role.CRITIC:
                parts.append(critic_values(model, inputs, exp.prompt_len))
            else:
                parts.append(self.frozen(inputs))
        if self.engine is not None:
            self.engine.train()
        return torch.cat(parts).float().cpu()

    def train(self, exp: Experience, step: int, kl_coef: float) -> dict[str, float]:
        """The PPO epochs of this rank's rows (actor or critic), stepping with its group; ``kl_coef``: the KL
        controller's value, for --use_kl_loss."""
        from openrl_ckpt.trainers.ppo.update import train_actor, train_critic

        fault_point(f"{self.role.value}_train", step)
        exp = _to_device(exp, self.strategy.device)
        if self.role is Role.ACTOR:
            metrics = train_actor(self.strategy, self.engine, exp, self.ppo, step, kl_coef=kl_coef, ptx=self.ptx,
                                  ptx_coef=self.spec.ptx_coef, ema=self.ema)
            metrics["actor_lr"] = float(self.engine.get_lr()[0])
            return metrics
        return train_critic(self.strategy, self.engine, exp, self.ppo, step)

    # ------------------------------------------------------------------ weights to the rollout engines
    def weight_specs(self) -> list[tuple[str, list[int], str]]:
        """Name, full shape and dtype of every weight, in the order they are sent."""
        return [(name, list(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
                for name, p in self.engine.module.named_parameters()]

    def open_sender(self, how: dict[str, Any]) -> None:
        """Rank 0 joins the weight-sync group with every engine (or uses the object store)."""
        from openrl_ckpt.trainers.ppo_ray.rollout_engine import WeightSender

        self._sender = WeightSender(how) if self.strategy.is_rank_0 else None

    def sync_weights(self, check: bool) -> dict[str, Any] | None:
        """Every weight of the actor, gathered (ZeRO-3: a parameter at a time, all ranks together) and sent
        by rank 0; returns (rank 0) the digest of what it sent (with ``check``) and, over the object store,
        the boxed ref."""
        from openrl_ckpt.trainers.ppo_ray.rollout_engine import add_to_digest, iter_full_weights

        sender = self._sender
        digest = hashlib.sha256() if check and sender is not None else None
        for name, tensor in iter_full_weights(self.strategy, self.engine):
            if sender is not None:
                sender.send(name, tensor)
                if digest is not None:
                    add_to_digest(digest, name, tensor)
        if sender is None:
            return None
        sender.close()
        return {"digest": digest.hexdigest() if digest is not None else None,
                "boxed": [sender.ref] if sender.ref is not None else None}

    # ------------------------------------------------------------------ checkpoints
    def stage_checkpoint(self, staging: str, host_copy: bool, engine_files: bool, hf_weights: bool) -> None:
        """Queue this rank's files of a checkpoint (DeepSpeed's ``save_checkpoint`` runs now, into
        ``staging/<role>/``, its writes held back; the Hugging Face folder, the EMA and this rank's RNG)."""
        from openrl_ckpt.checkpoint.contents import TensorFile
        from openrl_ckpt.strategy.engine_checkpoint import stage_engines
        from openrl_ckpt.strategy.hf import stage_hf_folders
        from openrl_ckpt.trainers.ppo.ema import EMA_FILE

        engines = {self.role.value: self.engine}
        items: list[StagedWrite] = []
        if engine_files:
            items += stage_engines(engines, Path(staging), host_copy)
            rng = json.dumps(capture_rng()).encode()
            items.append(BytesFile(f"{self.role.value}/{RNG_FILE.format(rank=self.strategy.rank)}", rng))
        items += stage_hf_folders(self.strategy, engines, self.tokenizer, hf_weights)
        if self.ema is not None and self.strategy.is_rank_0:
            items.append(TensorFile(EMA_FILE, self.ema.snapshot()))
        self._staged = items

    def write_checkpoint(self, staging: str) -> dict[str, Any]:
        """Write the queued files into ``staging`` and report them (size, checksum) for the commit."""
        from openrl_ckpt.checkpoint.commit import write_group

        fault_point(f"{self.role.value}_write")
        items, self._staged = self._staged, []
        report = write_group(Path(staging), f"{self.role.value} rank {self.strategy.rank}", CheckpointContents(items))
        return report.to_json()

    def load_checkpoint(self, path: str, step: int, saved_world_size: int, saved_zero_stage: int | None) -> None:
        """Engine, optimizer and scheduler from ``path/<role>/`` (DeepSpeed's universal format when this group
        has another size or ZeRO stage), this rank's RNG, the EMA."""
        from openrl_ckpt.strategy.engine_checkpoint import load_engines
        from openrl_ckpt.trainers.ppo.ema import EMA_FILE

        saved = TrainState(algorithm="", global_batch_size=0, world_size=saved_world_size, model_fingerprint="",
                           zero_stage=saved_zero_stage)
        load_engines(self.strategy, Resumed(step=step, path=Path(path), state=saved), {self.role.value: self.engine})
        rng_file = Path(path) / self.role.value / RNG_FILE.format(rank=self.strategy.rank)
        if saved_world_size == self.strategy.world_size and rng_file.exists():
            restore_rng(json.loads(rng_file.read_text()))
        if self.ema is not None:
            self.ema.load(Path(path) / EMA_FILE)

    def ptx_state(self) -> dict[str, Any] | None:
        return self.ptx.state_dict() if self.ptx is not None else None

    def load_ptx_state(self, state: dict[str, Any]) -> None:
        if self.ptx is not None:
            self.ptx.load_state_dict(state)

    def export(self, path: str, with_ema: bool) -> None:
        """The model as a Hugging Face folder at ``path`` (collective; the actor's EMA weights with ``with_ema``)."""
        from openrl_ckpt.strategy.hf import save_model

        if with_ema and self.ema is not None:
            self.ema.copy_to(self.engine.module)
        save_model(self.strategy, self.engine, self.tokenizer, path)

    def stage_export(self) -> None:
        from openrl_ckpt.strategy.hf import stage_model_folder

        self._export = stage_model_folder(self.strategy, self.engine, self.tokenizer)

    def write_export(self, folder: str) -> None:
        if self._export is not None:
            self._export.write(Path(folder))
        self._export = None

    def sees(self, path: str) -> bool:
        return Path(path).exists()

    def ping(self) -> int:
        return os.getpid()


def _to_device(exp: Experience, dev: torch.device) -> Experience:
    if dev.type == "cpu":
        return exp
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dev)

    return Experience(exp.sequences.to(dev), exp.attention_mask.to(dev), exp.position_ids.to(dev), exp.prompt_len,
                      exp.action_mask.to(dev), exp.old_logp.to(dev), exp.advantages.to(dev), move(exp.values),
                      move(exp.returns), move(exp.ref_logp))
