#!/usr/bin/env bash
# SFT launch script (as in the usage docs). Rerun it unchanged after a crash: --load_checkpoint
# resumes from the newest valid checkpoint in $CKPT_PATH.
set -euo pipefail

MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B}
DATASET=${DATASET:-Open-Orca/OpenOrca}
SAVE_PATH=${SAVE_PATH:-./checkpoint/llama3-8b-sft}
CKPT_PATH=${CKPT_PATH:-./checkpoint/llama3-8b-sft-ckpt}
NUM_GPUS=${NUM_GPUS:-8}
EXTRA=${EXTRA:-"--bf16 --flash_attn"}   # on a CPU machine: EXTRA="" DS_ACCELERATOR=cpu

# shellcheck disable=SC2086
deepspeed --num_gpus "$NUM_GPUS" --module openrl_ckpt.cli.train_sft \
   --pretrain "$MODEL" \
   --dataset "$DATASET" \
   --input_key question \
   --output_key response \
   --input_template $'User: {}\nAssistant: ' \
   --max_len 2048 \
   --max_samples 500000 \
   --train_batch_size 256 \
   --micro_train_batch_size 2 \
   --max_epochs 1 \
   --learning_rate 5e-6 \
   --zero_stage 2 \
   --gradient_checkpointing \
   --save_path "$SAVE_PATH" \
   --save_steps 200 \
   --ckpt_path "$CKPT_PATH" \
   --load_checkpoint \
   --max_ckpt_num 3 \
   --max_ckpt_mem 500 \
   --logging_steps 1 \
   --eval_steps -1 \
   $EXTRA
