#!/usr/bin/env bash
# PPO launch script (as in the usage docs, on one process group). Rerun it unchanged after a crash:
# --load_checkpoint resumes from the newest valid checkpoint in $CKPT_PATH (actor, critic and PPO state).
set -euo pipefail

MODEL=${MODEL:-OpenRLHF/Llama-3-8b-sft-mixture}
REWARD_MODEL=${REWARD_MODEL:-OpenRLHF/Llama-3-8b-rm-mixture}
PROMPTS=${PROMPTS:-OpenRLHF/prompt-collection-v0.1}
SAVE_PATH=${SAVE_PATH:-./checkpoint/llama3-8b-rlhf}
CKPT_PATH=${CKPT_PATH:-./checkpoint/llama3-8b-rlhf-ckpt}
NUM_GPUS=${NUM_GPUS:-8}
EXTRA=${EXTRA:-"--bf16 --flash_attn"}   # on a CPU machine: EXTRA="" DS_ACCELERATOR=cpu

# shellcheck disable=SC2086
deepspeed --num_gpus "$NUM_GPUS" --module openrl_ckpt.cli.train_ppo \
   --pretrain "$MODEL" \
   --reward_pretrain "$REWARD_MODEL" \
   --prompt_data "$PROMPTS" \
   --input_key context_messages \
   --apply_chat_template \
   --prompt_max_len 1024 \
   --generate_max_len 1024 \
   --max_samples 100000 \
   --rollout_batch_size 1024 \
   --micro_rollout_batch_size 16 \
   --train_batch_size 128 \
   --micro_train_batch_size 8 \
   --max_epochs 1 \
   --num_episodes 1 \
   --actor_learning_rate 5e-7 \
   --critic_learning_rate 9e-6 \
   --init_kl_coef 0.01 \
   --normalize_reward \
   --zero_stage 3 \
   --ref_reward_offload \
   --adam_offload \
   --gradient_checkpointing \
   --save_path "$SAVE_PATH" \
   --save_steps 20 \
   --ckpt_path "$CKPT_PATH" \
   --load_checkpoint \
   --max_ckpt_num 3 \
   --logging_steps 1 \
   $EXTRA
