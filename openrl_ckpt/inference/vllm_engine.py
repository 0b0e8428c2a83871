"""Generation through vLLM (``--eval_task generate_vllm``). vLLM is imported only here, when the task
runs; without it the task is a one-line error. One process drives vLLM, which spreads the model
over ``--tp_size`` GPUs itself."""

from __future__ import annotations

from typing import Any

from openrl_ckpt.errors import UserError
from openrl_ckpt.inference.generation import SamplingConfig


def generate_vllm(pretrain: str, prompt_ids: list[list[int]], max_tokens: list[int], seeds: list[int],
                  sampling: SamplingConfig, *, bf16: bool, max_len: int, seed: int, tp_size: int,
                  enable_prefix_caching: bool, max_num_seqs: int) -> list[str]:
    """One answer per request (``prompt_ids[i]`` with at most ``max_tokens[i]`` new tokens, sampled
    with its own seed ``seeds[i]`` so the answer does not depend on how vLLM batches requests)."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise UserError("--eval_task generate_vllm needs the vllm package (pip install 'openrl_ckpt[vllm]' on a "
                        "CUDA machine); --eval_task generate runs the same job with Hugging Face generate") from None
    llm = LLM(model=pretrain, tensor_parallel_size=tp_size, seed=seed, dtype="bfloat16" if bf16 else "auto",
              max_model_len=max_len, enable_prefix_caching=enable_prefix_caching, max_num_seqs=max_num_seqs)
    params = [sampling_params(SamplingParams, sampling, limit, s) for limit, s in zip(max_tokens, seeds)]
    requests: list[Any] = [{"prompt_token_ids": ids} for ids in prompt_ids]
    outputs = llm.generate(requests, sampling_params=params, use_tqdm=True)
    return [out.outputs[0].text for out in outputs]  # vLLM returns requests in the order given


def sampling_params(params_class: Any, sampling: SamplingConfig, max_tokens: int, seed: int) -> Any:
    """vLLM's SamplingParams for one request, with its own seed (reproducible whatever the batching)."""
    return params_class(n=1, max_tokens=max_tokens, seed=seed, skip_special_tokens=True,
                        temperature=0.0 if sampling.greedy else sampling.temperature,
                        top_p=1.0 if sampling.greedy else sampling.top_p,
                        top_k=-1 if sampling.greedy or sampling.top_k == 0 else sampling.top_k,
                        repetition_penalty=sampling.repetition_penalty)
