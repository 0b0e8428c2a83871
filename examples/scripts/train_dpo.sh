#!/usr/bin/env bash
# DPO launch script (as in the usage docs). Rerun it unchanged after a crash: --load_checkpoint
# resumes from the newest valid checkpoint in $CKPT_PATH.
set -euo pipefail

MODEL=${MODEL:-OpenRLHF/Llama-3-8b-sft-mixture}
DATASET=${DATASET:-OpenRLHF/preference_dataset_mixture2_and_safe_pku}
SAVE_PATH=${SAVE_PATH:-./checkpoint/llama3-8b-dpo}
CKPT_PATH=${CKPT_PATH:-./checkpoint/llama3-8b-dpo-ckpt}
NUM_GPUS=${NUM_GPUS:-8}
EXTRA=${EXTRA:-"--bf16 --flash_attn"}   # on a CPU machine: EXTRA="" DS_ACCELERATOR=cpu

# shellcheck disable=SC2086
deepspeed --num_gpus "$NUM_GPUS" --module openrl_ckpt.cli.train_dpo \
   --pretrain "$MODEL" \
   --dataset "$DATASET" \
   --apply_chat_template \
   --chosen_key chosen \
   --rejected_key rejected \
   --beta 0.1 \
   --ref_offload \
   --max_len 8192 \
   --train_batch_size 256 \
   --micro_train_batch_size 1 \
   --max_epochs 1 \
   --learning_rate 5e-7 \
   --zero_stage 3 \
   --gradient_checkpointing \
   --save_path "$SAVE_PATH" \
   --save_steps 100 \
   --ckpt_path "$CKPT_PATH" \
   --load_checkpoint \
   --max_ckpt_num 3 \
   --logging_steps 1 \
   --eval_steps -1 \
   $EXTRA
