#!/usr/bin/env bash
# PPO on Ray with vLLM rollouts, submitted as in the usage docs. Start a head first (ray start --head;
# on a CPU machine `ray start --head --num-cpus 8`, one CPU bundle per rank). Resubmit it unchanged after
# a crash: --load_checkpoint resumes actor, critic and PPO state from the newest committed checkpoint.
set -euo pipefail

MODEL=${MODEL:-OpenRLHF/Llama-3-8b-sft-mixture}
REWARD_MODEL=${REWARD_MODEL:-OpenRLHF/Llama-3-8b-rm-mixture}
PROMPTS=${PROMPTS:-OpenRLHF/prompt-collection-v0.1}
SAVE_PATH=${SAVE_PATH:-/openrl_ckpt/examples/checkpoint/llama3-8b-rlhf}
CKPT_PATH=${CKPT_PATH:-/openrl_ckpt/examples/checkpoint/llama3-8b-rlhf-ckpt}   # shared by every node
RAY_DASHBOARD=${RAY_DASHBOARD:-http://127.0.0.1:8265}
GPUS=${GPUS:-2}            # ranks per group; with --colocate_* groups share them
ENGINES=${ENGINES:-2}      # vLLM engines (0: the actor group generates with Hugging Face)
TP=${TP:-2}                # vLLM tensor parallel size
EXTRA=${EXTRA:-"--bf16 --flash_attn"}   # on a CPU machine: EXTRA="" TP=1

# shellcheck disable=SC2086
ray job submit --address="$RAY_DASHBOARD" \
   --runtime-env-json='{"working_dir": "."}' \
   -- python3 -m openrl_ckpt.cli.train_ppo_ray \
   --ref_num_nodes 1 \
   --ref_num_gpus_per_node "$GPUS" \
   --reward_num_nodes 1 \
   --reward_num_gpus_per_node "$GPUS" \
   --critic_num_nodes 1 \
   --critic_num_gpus_per_node "$GPUS" \
   --actor_num_nodes 1 \
   --actor_num_gpus_per_node "$GPUS" \
   --vllm_num_engines "$ENGINES" \
   --vllm_tensor_parallel_size "$TP" \
   --colocate_critic_reward \
   --colocate_actor_ref \
   --ref_reward_offload \
   --pretrain "$MODEL" \
   --reward_pretrain "$REWARD_MODEL" \
   --save_path "$SAVE_PATH" \
   --micro_train_batch_size 8 \
   --train_batch_size 128 \
   --micro_rollout_batch_size 16 \
   --rollout_batch_size 1024 \
   --max_samples 100000 \
   --max_epochs 1 \
   --prompt_max_len 1024 \
   --generate_max_len 1024 \
   --zero_stage 3 \
   --actor_learning_rate 5e-7 \
   --critic_learning_rate 9e-6 \
   --init_kl_coef 0.01 \
   --prompt_data "$PROMPTS" \
   --input_key context_messages \
   --apply_chat_template \
   --normalize_reward \
   --adam_offload \
   --gradient_checkpointing \
   --save_steps 20 \
   --ckpt_path "$CKPT_PATH" \
   --load_checkpoint \
   --max_ckpt_num 3 \
   $EXTRA
