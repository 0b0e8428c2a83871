"""vLLM engines for Ray PPO's rollouts, each a Ray actor, and the way the actor's weights reach them.

An engine runs vLLM in its own process (in-process engine mode for tensor parallel 1; vLLM's
multiprocess executor for more). After every update the actor's rank 0 sends each weight, gathered
(under ZeRO-3 one parameter at a time, all actor ranks together), over a process group of its own
with every engine (``--vllm_sync_backend``: nccl on GPUs, gloo on CPU) or through Ray's object store
(``--vllm_sync_with_ray``); the engine reloads them in place and resets its prefix cache. Sender and
receivers hash what they sent and received, and the driver compares the digests after a resume.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from openrl_ckpt.inference.generation import SamplingConfig

DEFAULT_CPU_KV_CACHE_BYTES = 256 * 2**20  # vLLM on CPU needs an explicit KV cache size (VLLM_CPU_KVCACHE_SPACE)


def iter_full_weights(strategy: Any, engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of the engine's model with its Hugging Face name, whole, on the CPU (collective under
    ZeRO-3: each is gathered by all ranks together)."""
    import deepspeed

    for name, param in engine.module.named_parameters():
        if strategy.cfg.zero_stage == 3:
            with deepspeed.zero.GatheredParameters([param]):
                yield name, param.detach().cpu().clone()
        else:
            yield name, param.detach().cpu()


def add_to_digest(digest: Any, name: str, tensor: torch.Tensor) -> None:
    digest.update(name.encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def weight_digest(pairs: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in pairs:
        add_to_digest(digest, name, tensor)
    return digest.hexdigest()


class WeightSender:
    """The actor rank 0's end of a weight sync: a process group with every engine (rank 0 of it), or the
    object store (the tensors are put there on ``close``)."""

    def __init__(self, how: dict[str, Any]) -> None:
        self.kind = how["kind"]
        self.pairs: list[tuple[str, torch.Tensor]] = []
        self.ref: Any = None
        if self.kind == "group":
            from vllm.distributed.utils import stateless_init_torch_distributed_process_group

            self.group = stateless_init_torch_distributed_process_group(how["host"], how["port"], 0, how["world"],
                                                                       how["backend"])
            self.device = torch.device("cuda") if how["backend"] == "nccl" else torch.device("cpu")

    def send(self, name: str, tensor: torch.Tensor) -> None:
        if self.kind == "group":
            self.group.broadcast(tensor.to(self.device).contiguous(), 0).wait()
        else:
            self.pairs.append((name, tensor.clone()))

    def close(self) -> None:
        if self.kind == "ray":
            import ray

            self.ref = ray.put(self.pairs)
            self.pairs = []


class VLLMEngine:
    """One vLLM engine (``--vllm_tensor_parallel_size`` ranks) serving the actor's current weights."""

    def __init__(self, index: int, pretrain: str, seed: int, tensor_parallel_size: int, max_model_len: int, *,
                 bf16: bool, enable_prefix_caching: bool, enforce_eager: bool, gpu_memory_utilization: float) -> None:
        self.index = index
        self.in_process = tensor_parallel_size == 1
        if self.in_process:  # no engine-core subprocess: faster start, one process to watch
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        extra: dict[str, Any] = {}
        if on_gpu:
            extra["gpu_memory_utilization"] = gpu_memory_utilization
        elif "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            extra["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
        if tensor_parallel_size > 1:
            extra["distributed_executor_backend"] = "mp"
        self.llm = LLM(model=pretrain, tensor_parallel_size=tensor_parallel_size, seed=seed,
                       dtype="bfloat16" if bf16 else "float32", max_model_len=max_model_len,
                       enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager or not on_gpu,
                       **extra)
        self.group: Any = None

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: SamplingConfig) -> list[list[int]]:
        """The answer token ids to each prompt (up to and including EOS), each sampled with its own seed."""
        from vllm import SamplingParams

        from openrl_ckpt.inference.vllm_engine import sampling_params

        params = [sampling_params(SamplingParams, sampling, sampling.max_new_tokens, s) for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=params,
                                    use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    def join_weight_group(self, host: str, port: int, world: int, backend: str) -> None:
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        self.group = stateless_init_torch_distributed_process_group(host, port, self.index + 1, world, backend)
        self.device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")

    def receive_weights(self, specs: list[tuple[str, list[int], str]], check: bool) -> str | None:
        """Receive every weight over the sync group (names, shapes, dtypes in ``specs``), reload; returns the
        digest of what arrived."""
        pairs = []
        for name, shape, dtype in specs:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            self.group.broadcast(tensor, 0).wait()
            pairs.append((name, tensor.cpu()))
        return self._reload(pairs, check)

    def receive_weights_object(self, boxed: list[Any], check: bool) -> str | None:
        """The weights from the object store (``boxed``: [ref], so Ray hands over the reference)."""
        import ray

        return self._reload(ray.get(boxed[0]), check)

    def _reload(self, pairs: list[tuple[str, torch.Tensor]], check: bool = True) -> str | None:
        """Load ``pairs`` in place; with ``check`` returns the digest of what arrived (hashing every weight is
        kept off the per-update path)."""
        digest = weight_digest(pairs) if check else None
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(pairs),
                                                              "is_checkpoint_format": True})
        else:  # the tensor-parallel workers are processes of their own: hand them a file
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(prefix="openrl-sync-") as folder:
                save_file(dict(pairs), os.path.join(folder, "model.safetensors"))
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": folder,
                                                                  "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        return digest

    def ping(self) -> int:
        return os.getpid()
