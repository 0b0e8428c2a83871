"""The shared flag groups (OpenRLHF's names) and the configs built from them."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, NoReturn

from openrl_ckpt.checkpoint.config import BestMode, CheckpointConfig, SaveErrorPolicy
from openrl_ckpt.cli.entry import is_rank_0
from openrl_ckpt.errors import UserError

if TYPE_CHECKING:
    from openrl_ckpt.data.preference_dataset import PreferenceConfig
    from openrl_ckpt.models.actor import ModelConfig
    from openrl_ckpt.strategy.deepspeed import OptimConfig, StrategyConfig
    from openrl_ckpt.trainers.base import LoopConfig
    from openrl_ckpt.trainers.progress import TrackerConfig

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (printed once, by rank 0)."""

    def error(self, message: str) -> NoReturn:
        if is_rank_0():
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def bool_flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    p.add_argument(name, action="store_true", default=False, help=help)


DEFAULT_INPUT_TEMPLATE = "User: {}\nAssistant: "  # SFT, KD and KTO's default, as in OpenRLHF 0.6.x


def input_template(value: str) -> str | None:
    """--input_template: checked at parse time; the empty string means no template."""
    from openrl_ckpt.data.templates import check_input_template

    if value == "":
        return None
    try:
        check_input_template(value)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--input_template ")) from None
    return value


def add_input_template_arg(g: argparse._ArgumentGroup, default: str | None) -> None:
    g.add_argument("--input_template", type=input_template, default=default,
                   help=f"'{{}}' is replaced by the input; '' for none (default: {default!r})")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--pretrain", required=True, help="Hugging Face model folder or hub id")
    bool_flag(g, "--bf16", "train in bfloat16 (fp32 master weights in the optimizer)")
    bool_flag(g, "--flash_attn", "use Flash Attention 2 (needs the flash-attn package)")
    g.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    bool_flag(g, "--gradient_checkpointing", "recompute activations in backward to save memory")
    g.add_argument("--aux_loss_coef", type=float, default=0.0, help="MoE load-balancing loss weight")
    g.add_argument("--lora_rank", type=int, default=0, help="> 0 enables LoRA (PEFT)")
    g.add_argument("--lora_alpha", type=int, default=16)
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument("--target_modules", nargs="*", default="all-linear",
                   help="LoRA's modules: names separated by spaces or commas, or all-linear")
    bool_flag(g, "--load_in_4bit", "QLoRA through bitsandbytes (CUDA only)")
    bool_flag(g, "--gradient_checkpointing_use_reentrant", "the reentrant variant of activation checkpointing")
    bool_flag(g, "--disable_fast_tokenizer", "load the tokenizer's slow (Python) implementation")
    bool_flag(g, "--use_liger_kernel", "Liger's fused Triton kernels (needs CUDA and liger-kernel; refused here)")
    bool_flag(g, "--torch_compile", "compile the model with torch.compile (DeepSpeed's engine.compile)")
    g.add_argument("--ring_attn_size", type=int, default=1, help="ring attention group size (needs "
                   "ring-flash-attn on CUDA; only 1 works here)")
    g.add_argument("--ring_head_stride", type=int, default=1, help="heads per ring attention step")


def add_data_args(p: argparse.ArgumentParser, input_template_default: str | None = None) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, help="comma-separated files (json, jsonl, parquet, csv), "
                   "save_to_disk folders or hub names")
    g.add_argument("--dataset_probs", default=None, help="comma-separated mixing probabilities (default: equal)")
    g.add_argument("--train_split", "--dataset_split", dest="dataset_split", default="train",
                   help="the split of hub datasets and saved dataset dicts")
    g.add_argument("--eval_dataset", default=None)
    g.add_argument("--eval_split", default="test")
    g.add_argument("--max_samples", type=int, default=100_000_000, help="use at most this many training rows")
    g.add_argument("--max_len", type=int, default=2048, help="max tokens per sample (longer ones are truncated)")
    g.add_argument("--input_key", default="input")
    g.add_argument("--output_key", default=None)
    add_input_template_arg(g, input_template_default)
    bool_flag(g, "--apply_chat_template", "render rows with the tokenizer's chat template")
    g.add_argument("--tokenizer_chat_template", default=None, help="a Jinja chat template, or a file holding one")
    bool_flag(g, "--packing_samples", "pack each micro batch into one row (no padding)")
    bool_flag(g, "--use_ms", "load hub models and datasets from ModelScope (needs modelscope and its hub)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--zero_stage", type=int, default=2)
    bool_flag(g, "--adam_offload", "keep Adam states on the CPU (DeepSpeedCPUAdam)")
    g.add_argument("--grad_accum_dtype", default="fp32", choices=["fp32", "bf16"],
                   help="with --bf16: the dtype gradients are accumulated and reduced in (fp32 keeps precision "
                        "over many micro batches)")
    g.add_argument("--micro_train_batch_size", type=int, default=8, help="batch size per rank per forward")
    g.add_argument("--train_batch_size", type=int, default=128, help="global batch size per optimizer step")
    g.add_argument("--max_epochs", type=int, default=2)
    g.add_argument("--learning_rate", type=float, default=5e-6)
    g.add_argument("--l2", type=float, default=0.0, help="weight decay")
    g.add_argument("--adam_betas", type=float, nargs=2, default=(0.9, 0.95))
    g.add_argument("--lr_scheduler", default="cosine_with_min_lr")
    g.add_argument("--lr_warmup_ratio", type=float, default=0.03)
    g.add_argument("--max_norm", type=float, default=1.0, help="gradient clipping")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--logging_steps", type=int, default=1)
    g.add_argument("--eval_steps", type=int, default=-1, help="-1: evaluate once per epoch")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    g.add_argument("--zpg", type=int, default=1, help="ZeRO++ hierarchical partition size (ranks per weight "
                   "replica group); 1: off")
    bool_flag(g, "--overlap_comm", "overlap ZeRO's gradient reduction with the backward pass")
    bool_flag(g, "--full_determinism", "deterministic kernels everywhere (transformers' enable_full_determinism)")
    g.add_argument("--collective_timeout_mins", type=float, default=10.0,
                   help="how long a rank waits in a collective for the others before the run stops with an "
                        "error naming the silent ranks (a dead peer is noticed at once); raise it when one rank "
                        "does long work alone while the others wait")


def add_ckpt_args(p: argparse.ArgumentParser, default_ckpt: str) -> None:
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save_path", default="./ckpt/model", help="final Hugging Face model folder")
    g.add_argument("--save_steps", type=int, default=-1, help="steps between checkpoints; -1: none in between")
    g.add_argument("--save_epochs", type=int, default=-1, help="also a checkpoint at the end of every N-th epoch "
                   "(PPO: episode); -1: off")
    g.add_argument("--ckpt_path", default=default_ckpt)
    bool_flag(g, "--load_checkpoint", "resume from the newest valid checkpoint in --ckpt_path, if any")
    bool_flag(g, "--use_ds_universal_ckpt", "resume through DeepSpeed's universal format (done here on its own "
              "whenever the world size or ZeRO stage changed)")
    g.add_argument("--resume_from", default=None, help="resume from this checkpoint instead (a step number or a "
                   "global_step<N> folder of --ckpt_path); its newer ones are set aside under set_aside/, never "
                   "deleted")
    g.add_argument("--max_ckpt_num", type=int, default=3)
    g.add_argument("--export_steps", type=int, default=-1, help="also write a Hugging Face model to "
                   "<save_path>/global_step<N>/ every N steps while training (-1: off)")
    g.add_argument("--export_epochs", type=int, default=-1, help="... at the end of every N-th epoch (-1: off)")
    g.add_argument("--export_interval_mins", type=float, default=0.0, help="... when this many minutes passed "
                   "since the last export (rank 0's clock); 0: off")
    g.add_argument("--max_export_num", type=int, default=3, help="keep at most this many exports (a rotation of "
                   "their own, apart from checkpoints)")
    g.add_argument("--max_ckpt_mem", type=float, default=1e8, help="GB that checkpoints may take")
    g.add_argument("--save_interval_mins", type=float, default=0.0,
                   help="also save when this many minutes passed since the last save (rank 0's clock); 0: off")
    bool_flag(g, "--async_save", "copy the checkpoint to host memory, then write and commit it in the background")
    g.add_argument("--ckpt_on_error", choices=[p.value for p in SaveErrorPolicy], default=SaveErrorPolicy.STOP.value,
                   help="a save that fails (disk full, permissions): stop the run with an error, or keep "
                   "training and try again at the next save")
    bool_flag(g, "--save_hf_ckpt", "also write a Hugging Face copy of the model into each checkpoint (hf/<engine>/); "
              "counted by --max_ckpt_mem and rotated with it")
    bool_flag(g, "--disable_ds_ckpt", "checkpoints hold only the Hugging Face copy (no optimizer state): a run "
              "cannot resume from them")
    g.add_argument("--save_best_metric", default=None, help="an evaluation metric (e.g. eval_loss): the best "
                   "checkpoint is kept out of rotation (needs --eval_dataset and --eval_steps)")
    g.add_argument("--save_best_mode", choices=[m.value for m in BestMode], default=BestMode.MIN.value,
                   help="whether lower or higher is better")


def add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--use_wandb", default=None, help="a wandb API key, or True to use the logged-in account")
    g.add_argument("--wandb_org", default=None)
    g.add_argument("--wandb_group", default=None)
    g.add_argument("--wandb_project", default="openrl_ckpt")
    g.add_argument("--wandb_run_name", default=None)
    g.add_argument("--use_tensorboard", default=None, help="a log folder for tensorboard")


def model_config(args: argparse.Namespace, pretrain: str | None = None) -> ModelConfig:
    """The model flags; ``pretrain`` overrides --pretrain (reference, teacher, reward models)."""
    from openrl_ckpt.models.actor import ModelConfig

    targets = args.target_modules
    return ModelConfig(pretrain=args.pretrain if pretrain is None else pretrain, bf16=args.bf16,
                       flash_attn=args.flash_attn, attn_implementation=args.attn_implementation,
                       gradient_checkpointing=args.gradient_checkpointing,
                       gradient_checkpointing_use_reentrant=args.gradient_checkpointing_use_reentrant,
                       lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                       target_modules=targets if isinstance(targets, str) else ",".join(targets),
                       load_in_4bit=args.load_in_4bit, aux_loss_coef=args.aux_loss_coef)


def add_serving_model_args(g: argparse._ArgumentGroup) -> None:
    """The model flags of the jobs that load one model to answer with (serve_rm, interactive_chat)."""
    bool_flag(g, "--bf16", "bfloat16 weights")
    bool_flag(g, "--flash_attn", "use Flash Attention 2 (needs the flash-attn package)")
    bool_flag(g, "--load_in_4bit", "4-bit weights through bitsandbytes (refused: serve the model unquantized)")
    bool_flag(g, "--disable_fast_tokenizer", "load the tokenizer's slow (Python) implementation")
    bool_flag(g, "--use_ms", "load the model from ModelScope (needs modelscope and its hub)")


def check_serving_model_args(args: argparse.Namespace) -> None:
    check_unavailable_flags(use_ms=args.use_ms)
    if args.load_in_4bit:
        raise UserError("--load_in_4bit: 4-bit weights are for QLoRA training here (bitsandbytes on CUDA); load the "
                        "model unquantized")


def check_unavailable_flags(*, ring_attn_size: int = 1, use_liger_kernel: bool = False, use_ms: bool = False) -> None:
    """Flags of kernels and hubs this machine cannot reach: one line saying why, before anything loads. Each job
    passes the ones it has."""
    if ring_attn_size != 1:
        raise UserError(f"--ring_attn_size {ring_attn_size}: ring attention needs the ring-flash-attn and "
                        "flash-attn kernels on CUDA, which this build does not ship; train with --ring_attn_size 1")
    if use_liger_kernel:
        raise UserError("--use_liger_kernel: Liger's Triton kernels need CUDA and the liger-kernel package, which "
                        "this build does not ship; drop the flag")
    if use_ms:
        try:
            import modelscope  # noqa: F401
        except ImportError:
            raise UserError("--use_ms: ModelScope is not reachable from here (the modelscope package is not "
                            "installed); drop the flag to load from Hugging Face or local paths") from None
        raise UserError("--use_ms: loading from ModelScope's hub is not supported by this build; download the model "
                        "and data and pass their local paths")


def strategy_config(args: argparse.Namespace) -> StrategyConfig:
    """The first config every training job builds: flags this machine cannot serve fail here."""
    from openrl_ckpt.strategy.deepspeed import StrategyConfig

    check_unavailable_flags(ring_attn_size=args.ring_attn_size, use_liger_kernel=args.use_liger_kernel,
                            use_ms=args.use_ms)
    if args.zpg < 1:
        raise UserError(f"--zpg must be at least 1, got {args.zpg}")
    return StrategyConfig(seed=args.seed, zero_stage=args.zero_stage, bf16=args.bf16,
                          micro_train_batch_size=args.micro_train_batch_size, train_batch_size=args.train_batch_size,
                          max_norm=args.max_norm, adam_offload=args.adam_offload,
                          grad_accum_dtype=args.grad_accum_dtype, zpg=args.zpg, overlap_comm=args.overlap_comm,
                          full_determinism=args.full_determinism, torch_compile=args.torch_compile,
                          collective_timeout_mins=args.collective_timeout_mins)


def optim_config(args: argparse.Namespace, learning_rate: float | None = None) -> OptimConfig:
    from openrl_ckpt.strategy.deepspeed import OptimConfig

    return OptimConfig(learning_rate=args.learning_rate if learning_rate is None else learning_rate,
                       weight_decay=args.l2, betas=tuple(args.adam_betas), lr_scheduler=args.lr_scheduler,
                       lr_warmup_ratio=args.lr_warmup_ratio)


def loop_config(args: argparse.Namespace, algorithm: str) -> LoopConfig:
    """The shared loop's settings from the shared flags: every CLI gets new loop flags from here."""
    from openrl_ckpt.trainers.base import LoopConfig

    return LoopConfig(algorithm=algorithm, max_epochs=args.max_epochs, seed=args.seed,
                      checkpoint=checkpoint_config(args), logging_steps=args.logging_steps,
                      eval_steps=args.eval_steps)


def checkpoint_config(args: argparse.Namespace) -> CheckpointConfig:
    if args.save_interval_mins < 0:
        raise UserError(f"--save_interval_mins must be positive (or 0 for off), got {args.save_interval_mins}")
    if args.save_epochs == 0 or args.save_epochs < -1:
        raise UserError(f"--save_epochs must be a positive number of epochs (or -1 for off), got {args.save_epochs}")
    return CheckpointConfig(ckpt_path=args.ckpt_path, save_steps=args.save_steps, save_epochs=args.save_epochs,
                            load_checkpoint=args.load_checkpoint, resume_from=args.resume_from,
                            max_ckpt_num=args.max_ckpt_num, max_ckpt_mem=args.max_ckpt_mem,
                            save_interval_mins=args.save_interval_mins, async_save=args.async_save,
                            ckpt_on_error=SaveErrorPolicy(args.ckpt_on_error), save_hf_ckpt=args.save_hf_ckpt,
                            disable_ds_ckpt=args.disable_ds_ckpt, save_best_metric=args.save_best_metric,
                            save_best_mode=BestMode(args.save_best_mode), save_path=args.save_path,
                            export_steps=args.export_steps, export_epochs=args.export_epochs,
                            export_interval_mins=args.export_interval_mins, max_export_num=args.max_export_num)


def tracker_config(args: argparse.Namespace) -> TrackerConfig:
    from openrl_ckpt.trainers.progress import TrackerConfig

    return TrackerConfig(use_wandb=args.use_wandb, wandb_project=args.wandb_project,
                         wandb_run_name=args.wandb_run_name, wandb_group=args.wandb_group, wandb_org=args.wandb_org,
                         use_tensorboard=args.use_tensorboard, run_config=vars(args))


# ---------------------------------------------------------------------------- preference trainers

def add_preference_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preference data")
    g.add_argument("--prompt_key", default=None, help="key of the shared prompt; without it chosen and rejected "
                   "are whole texts, or conversations whose last assistant turn is the answer")
    g.add_argument("--chosen_key", default="chosen")
    g.add_argument("--rejected_key", default="rejected")


def add_reference_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reference model")
    g.add_argument("--ref_pretrain", default=None, help="frozen reference model (default: --pretrain)")
    bool_flag(g, "--ref_offload", "keep the reference model on the CPU between uses")
    g.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference")


def preference_config(args: argparse.Namespace) -> PreferenceConfig:
    from openrl_ckpt.data.preference_dataset import PreferenceConfig

    return PreferenceConfig(prompt_key=args.prompt_key, chosen_key=args.chosen_key, rejected_key=args.rejected_key,
                            input_template=args.input_template, apply_chat_template=args.apply_chat_template)
