"""Every flag of OpenRLHF 0.6.x's CLIs is one of ours, with the same default where it matters to a script.

The flag names below are OpenRLHF 0.6.4's argparse blocks (train_ppo: 0.6.1's, the last non-Ray one; train_ppo_ray:
0.6.4's, every flag of it)."""

from __future__ import annotations

import argparse
import importlib

import pytest

from openrl_ckpt.errors import UserError

TRAINING = """--adam_betas --adam_offload --aux_loss_coef --bf16 --ckpt_path --disable_fast_tokenizer --eval_steps
--flash_attn --grad_accum_dtype --gradient_checkpointing --gradient_checkpointing_use_reentrant --l2
--load_checkpoint --load_in_4bit --local_rank --logging_steps --lora_alpha --lora_dropout --lora_rank
--lr_warmup_ratio --max_ckpt_mem --max_ckpt_num --max_epochs --max_len --max_norm --max_samples
--micro_train_batch_size --overlap_comm --pretrain --save_path --save_steps --seed --target_modules
--train_batch_size --use_ms --use_wandb --wandb_group --wandb_org --wandb_project --wandb_run_name
--zero_stage --zpg"""
FLAGS = {
    "train_sft": TRAINING + """ --apply_chat_template --dataset --dataset_probs --disable_ds_ckpt --eval_split
        --full_determinism --input_key --input_template --learning_rate --lr_scheduler --multiturn --output_key
        --packing_samples --pretrain_mode --ring_attn_size --ring_head_stride --save_hf_ckpt
        --tokenizer_chat_template --torch_compile --train_split --use_ds_universal_ckpt --use_liger_kernel
        --use_tensorboard""",
    "train_rm": TRAINING + """ --apply_chat_template --chosen_key --compute_fp32_loss --dataset --dataset_probs
        --eval_split --full_determinism --input_template --learning_rate --loss --margin_loss --packing_samples
        --prompt_key --rejected_key --ring_attn_size --ring_head_stride --tokenizer_chat_template --torch_compile
        --train_split --use_ds_universal_ckpt --use_tensorboard --value_head_prefix""",
    "train_dpo": TRAINING + """ --apply_chat_template --beta --chosen_key --dataset --dataset_probs
        --disable_ds_ckpt --eval_split --full_determinism --input_template --ipo --label_smoothing --learning_rate
        --nll_loss_coef --packing_samples --prompt_key --ref_offload --ref_pretrain --rejected_key
        --ring_attn_size --ring_head_stride --save_hf_ckpt --torch_compile --train_split
        --use_ds_universal_ckpt --use_liger_kernel --use_tensorboard""",
    "train_kto": TRAINING + """ --apply_chat_template --beta --dataset --dataset_probs --desirable_loss_weight
        --eval_split --full_determinism --input_key --input_template --label_key --learning_rate --output_key
        --ref_offload --torch_compile --train_split --undesirable_loss_weight --use_ds_universal_ckpt
        --use_liger_kernel --use_tensorboard""",
    "train_kd": TRAINING + """ --apply_chat_template --dataset --dataset_probs --eval_split --full_determinism
        --input_key --input_template --kd_coef --learning_rate --lr_scheduler --output_key --pretrain_mode
        --teacher_model --teacher_offload --torch_compile --train_split --use_ds_universal_ckpt
        --use_liger_kernel --use_tensorboard""",
    "train_prm": TRAINING + """ --dataset --dataset_probs --eval_split --full_determinism --input_key
        --label_key --learning_rate --lr_scheduler --packing_samples --placeholder_token --reward_tokens
        --torch_compile --train_split --use_ds_universal_ckpt --use_liger_kernel""",
    "train_ppo": TRAINING + """ --actor_init_on_gpu --actor_learning_rate --advantage_estimator
        --apply_chat_template --critic_learning_rate --critic_pretrain --disable_ds_ckpt --enable_ema --eps_clip
        --freezing_actor_steps --gamma --generate_max_len --init_kl_coef --input_key --input_template
        --kl_estimator --kl_target --label_key --lambd --micro_rollout_batch_size --n_samples_per_prompt
        --normalize_reward --num_episodes --pretrain_data --pretrain_data_probs --pretrain_split --prompt_data
        --prompt_data_probs --prompt_max_len --prompt_split --ptx_coef --remote_rm_url --reward_clip_range
        --reward_pretrain --rollout_batch_size --save_hf_ckpt --save_value_network --temperature --top_p
        --use_kl_loss --use_tensorboard --value_clip --value_head_prefix""",
    "train_ppo_ray": """--actor_init_on_gpu --actor_learning_rate --actor_num_gpus_per_node --actor_num_nodes
        --adam_betas --adam_offload --advantage_estimator --apply_chat_template --aux_loss_coef --bf16
        --ckpt_path --colocate_actor_ref --colocate_all_models --colocate_critic_reward
        --critic_learning_rate --critic_num_gpus_per_node --critic_num_nodes --critic_pretrain
        --deepspeed_enable_sleep --disable_ds_ckpt --disable_fast_tokenizer --enable_ema
        --enable_prefix_caching --enforce_eager --eps_clip --eval_steps --flash_attn
        --freezing_actor_steps --full_determinism --gamma --generate_max_len --grad_accum_dtype
        --gradient_checkpointing --gradient_checkpointing_use_reentrant --init_kl_coef --input_key
        --input_template --kl_estimator --kl_target --l2 --label_key --lambd --load_checkpoint
        --load_in_4bit --local_rank --logging_steps --lora_alpha --lora_dropout --lora_rank
        --lr_warmup_ratio --max_ckpt_mem --max_ckpt_num --max_epochs --max_len --max_norm --max_samples
        --micro_rollout_batch_size --micro_train_batch_size --n_samples_per_prompt
        --no_advantage_std_norm --normalize_reward --num_episodes --overlap_comm --packing_samples
        --perf --pretrain --pretrain_data --pretrain_data_probs --pretrain_split --prompt_data
        --prompt_data_probs --prompt_max_len --prompt_split --ptx_coef --ref_num_gpus_per_node
        --ref_num_nodes --ref_reward_offload --remote_rm_url --reward_clip_range
        --reward_num_gpus_per_node --reward_num_nodes --reward_pretrain --ring_attn_size
        --ring_head_stride --rollout_batch_size --save_hf_ckpt --save_path --save_steps
        --save_value_network --seed --target_modules --temperature --top_p --torch_compile
        --train_batch_size --use_ds_universal_ckpt --use_kl_loss --use_liger_kernel --use_ms
        --use_tensorboard --use_wandb --value_clip --value_head_prefix --vllm_enable_sleep
        --vllm_gpu_memory_utilization --vllm_num_engines --vllm_sync_backend --vllm_sync_with_ray
        --vllm_tensor_parallel_size --wandb_group --wandb_org --wandb_project --wandb_run_name
        --zero_stage --zpg""",
    "batch_inference": """--apply_chat_template --best_of_n --bf16 --csft_prompt --dataset --dataset_probs
        --dataset_split --disable_fast_tokenizer --enable_csft --enable_prefix_caching --eval_task --flash_attn
        --full_determinism --greedy_sampling --input_key --input_template --iter --local_rank --max_len
        --max_new_tokens --max_num_seqs --max_samples --micro_batch_size --normalize_reward --output_key
        --output_path --post_processor --pretrain --prompt_max_len --repetition_penalty --reward_template
        --rollout_batch_size --seed --temperature --top_p --tp_size --use_ms --value_head_prefix --zero_stage""",
    "serve_rm": """--batch_size --bf16 --disable_fast_tokenizer --flash_attn --host --load_in_4bit --max_len
        --normalize_reward --port --reward_pretrain --use_ms --value_head_prefix""",
    "interactive_chat": """--apply_chat_template --bf16 --csft_prompt --disable_fast_tokenizer --enable_csft
        --flash_attn --greedy_sampling --input_template --load_in_4bit --max_len --pretrain --repetition_penalty
        --ta_prompt --temperature --top_p --use_ms""",
    "lora_combiner": "--bf16 --is_rm --lora_path --model_path --output_path",
}


class _Captured(Exception):
    pass


def parser_of(job: str, monkeypatch) -> argparse.ArgumentParser:
    """The job's parser, as its parse_args builds it."""
    seen: list[argparse.ArgumentParser] = []

    def capture(self, *args, **kwargs):
        seen.append(self)
        raise _Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Captured):
        importlib.import_module(f"openrl_ckpt.cli.{job}").parse_args([])
    return seen[0]


@pytest.mark.parametrize("job", FLAGS)
def test_every_flag_is_accepted(job: str, monkeypatch) -> None:
    known = parser_of(job, monkeypatch)._option_string_actions
    missing = [flag for flag in FLAGS[job].split() if flag not in known]
    assert not missing, f"{job} lacks {missing}"


def parse(job: str, *argv: str) -> argparse.Namespace:
    return importlib.import_module(f"openrl_ckpt.cli.{job}").parse_args(list(argv))


SFT = ("--pretrain", "p", "--dataset", "d")


def test_defaults_as_in_0_6() -> None:
    for job in ("train_sft", "train_kd", "train_kto"):
        assert parse(job, *SFT, *(["--teacher_model", "t"] if job == "train_kd" else [])).input_template == (
            "User: {}\nAssistant: ")
    for job in ("train_rm", "train_dpo"):
        assert parse(job, *SFT).input_template is None
    sft = parse("train_sft", *SFT)
    assert (sft.eval_split, sft.dataset_split, sft.max_samples, sft.max_epochs, sft.zpg) == ("test", "train", 1e8, 2, 1)
    rm = parse("train_rm", *SFT)
    assert (rm.max_epochs, rm.learning_rate, rm.micro_train_batch_size, rm.max_len, rm.margin_loss) == (
        1, 9e-6, 1, 512, False)
    dpo = parse("train_dpo", *SFT)
    assert (dpo.max_epochs, dpo.learning_rate, dpo.max_len) == (1, 1e-5, 512)
    kto = parse("train_kto", *SFT)
    assert (kto.max_epochs, kto.learning_rate, kto.beta) == (1, 1e-5, 0.01)
    assert parse("train_kd", *SFT, "--teacher_model", "t").output_key == "output"
    prm = parse("train_prm", *SFT, "--placeholder_token", "x")
    assert (prm.learning_rate, prm.micro_train_batch_size, prm.label_key, prm.ckpt_path) == (
        1e-6, 1, "label", "./ckpt/checkpoints_prm")
    bi = parse("batch_inference", "--eval_task", "rm", "--pretrain", "p", "--dataset", "d", "--output_path", "o")
    assert (bi.seed, bi.repetition_penalty, bi.csft_prompt, bi.rollout_batch_size) == (1234, 1.0, "<rm_score>: 5.00",
                                                                                      2048)
    chat = parse("interactive_chat", "--pretrain", "p")
    assert (chat.temperature, chat.top_p, chat.repetition_penalty, chat.max_len) == (0.2, 0.9, 1.2, 4096)
    serve = parse("serve_rm", "--reward_pretrain", "r")
    assert (serve.port, serve.host, serve.max_len, serve.batch_size) == (5000, "0.0.0.0", 2048, None)


def test_spellings_of_0_6() -> None:
    assert parse("train_sft", *SFT, "--input_template", "").input_template is None  # '' is no template
    assert parse("train_sft", *SFT, "--train_split", "dev").dataset_split == "dev"
    from openrl_ckpt.cli.args import model_config

    assert model_config(parse("train_sft", *SFT, "--target_modules", "q_proj", "v_proj")).target_modules == (
        "q_proj,v_proj")
    assert model_config(parse("train_sft", *SFT)).target_modules == "all-linear"
    merge = parse("lora_combiner", "--model_path", "b", "--lora_path", "l", "--output_path", "o", "--bf16")
    assert (merge.base, merge.lora, merge.output, merge.dtype) == ("b", "l", "o", "bf16")
    ppo = parse("train_ppo", "--pretrain", "p", "--dataset", "d", "--head_prefix", "v", "--remote_rm_url", "http://x")
    assert (ppo.prompt_data, ppo.value_head_prefix, ppo.ptx_coef, ppo.max_samples) == ("d", "v", 0.05, 1_000_000)


def test_a_template_without_its_placeholder_is_a_one_line_parse_error(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        parse("train_sft", *SFT, "--input_template", "no placeholder")
    assert e.value.code == 2 and "--input_template" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--ring_attn_size", "2"], "--ring_attn_size 2: ring attention needs the ring-flash-attn and flash-attn"),
    (["--use_liger_kernel"], "--use_liger_kernel: Liger's Triton kernels need CUDA"),
    (["--use_ms"], "--use_ms: "),
    (["--zpg", "0"], "--zpg must be at least 1"),
])
def test_what_cannot_run_here_is_one_line(argv: list[str], message: str) -> None:
    from openrl_ckpt.cli.args import strategy_config

    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        strategy_config(parse("train_sft", *SFT, *argv))


def test_flash_attn_without_its_kernels_is_one_line() -> None:
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    from openrl_ckpt.models.actor import ModelConfig, attn_implementation

    with pytest.raises(UserError, match="--flash_attn needs the flash-attn package"):
        attn_implementation(ModelConfig(pretrain="p", flash_attn=True))


def test_deepspeed_config_carries_zpg_and_overlap_comm() -> None:
    from openrl_ckpt.cli.args import strategy_config
    from openrl_ckpt.strategy.deepspeed import DeepspeedStrategy

    zero = DeepspeedStrategy(strategy_config(parse("train_sft", *SFT, "--zpg", "4", "--overlap_comm"))).ds_config()[
        "zero_optimization"]
    assert (zero["zero_hpz_partition_size"], zero["overlap_comm"], zero["contiguous_gradients"]) == (4, True, True)
    plain = DeepspeedStrategy(strategy_config(parse("train_sft", *SFT))).ds_config()["zero_optimization"]
    assert "zero_hpz_partition_size" not in plain and "overlap_comm" not in plain
