#!/usr/bin/env bash
# Rejection sampling (RAFT): each iteration samples BEST_OF_N answers to the next ROLLOUT_BATCH_SIZE
# prompts with the current policy, keeps the answer the reward model likes best, and fine-tunes the
# policy on those answers (train_sft); the next iteration samples from the new policy.
#
# Kill it anywhere and run it again: it continues where it stopped.
#   - $ITER_LOG_PATH holds the number of the next iteration (written after an iteration is done);
#   - generation and scoring write their files atomically, so a stage whose file exists is done and skipped;
#   - the SFT stage checkpoints into its iteration's folder and resumes from there (--load_checkpoint);
#     its final model folder (also written atomically) marks the stage as done.
# It stops after TRAINING_ITERS iterations, or earlier when the prompts run out (batch_inference exits
# with status 3 for an --iter past the end of the data).
#
# Every variable below can be set from the environment. On a CPU-only machine:
#   DS_ACCELERATOR=cpu NUM_GPUS=2 GEN_EXTRA="" TRAIN_EXTRA="" bash examples/scripts/train_rejection_sampling.sh
set -uo pipefail  # no -e: each stage's exit status is checked below

POLICY_MODEL_PATH=${POLICY_MODEL_PATH:-OpenRLHF/Llama-3-8b-sft-mixture}
REWARD_MODEL_PATH=${REWARD_MODEL_PATH:-OpenRLHF/Llama-3-8b-rm-mixture}
DATASET=${DATASET:-OpenRLHF/prompt-collection-v0.1}
DATASET_PROBS=${DATASET_PROBS:-1.0}
INPUT_KEY=${INPUT_KEY:-context_messages}
INPUT_TEMPLATE=${INPUT_TEMPLATE:-}   # e.g. $'User: {}\nAssistant: '; empty: the tokenizer's chat template
WORK_DIR=${WORK_DIR:-./checkpoint/llama3-8b-rejection}
ITER_LOG_PATH=${ITER_LOG_PATH:-$WORK_DIR/iter.log}

TRAINING_ITERS=${TRAINING_ITERS:-10}
ROLLOUT_BATCH_SIZE=${ROLLOUT_BATCH_SIZE:-2048}    # prompts per iteration
BEST_OF_N=${BEST_OF_N:-4}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-1024}
MAX_LEN=${MAX_LEN:-2048}
TEMPERATURE=${TEMPERATURE:-0.9}
GEN_MICRO_BATCH_SIZE=${GEN_MICRO_BATCH_SIZE:-64}
RM_MICRO_BATCH_SIZE=${RM_MICRO_BATCH_SIZE:-8}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-128}
MICRO_TRAIN_BATCH_SIZE=${MICRO_TRAIN_BATCH_SIZE:-2}
LEARNING_RATE=${LEARNING_RATE:-2e-6}
SAVE_STEPS=${SAVE_STEPS:-50}
SEED=${SEED:-42}
KEEP_CKPT=${KEEP_CKPT:-0}    # 1: keep each finished iteration's training checkpoints (they hold optimizer state)

NUM_GPUS=${NUM_GPUS:-8}
LAUNCH=${LAUNCH:-"deepspeed --num_gpus $NUM_GPUS --module"}   # "python -m" for one process
GEN_TASK=${GEN_TASK:-generate}          # generate_vllm: vLLM (one process: GEN_LAUNCH="python -m", --tp_size in GEN_EXTRA)
GEN_LAUNCH=${GEN_LAUNCH:-$LAUNCH}
GEN_EXTRA=${GEN_EXTRA:-"--bf16"}
RM_EXTRA=${RM_EXTRA:-"--bf16"}
TRAIN_EXTRA=${TRAIN_EXTRA:-"--bf16 --flash_attn --gradient_checkpointing --zero_stage 2"}

EXIT_DATA_EXHAUSTED=3   # batch_inference: --iter starts past the end of the data

run() {  # print and run a command
  echo "+ $*"
  "$@"
}

stop_on_failure() {  # stop_on_failure NAME STATUS
  if (($2 != 0)); then
    echo "FAILED $1 (exit status $2); rerun this script to continue from here"
    exit "$2"
  fi
}

prompt_flags=(--apply_chat_template)
if [[ -n $INPUT_TEMPLATE ]]; then
  prompt_flags=(--input_template "$INPUT_TEMPLATE")
fi

mkdir -p "$WORK_DIR"
iter=0
if [[ -f $ITER_LOG_PATH ]]; then
  iter=$(cat "$ITER_LOG_PATH")
fi

while ((iter < TRAINING_ITERS)); do
  dir=$WORK_DIR/iter$iter
  policy=$POLICY_MODEL_PATH
  if ((iter > 0)); then
    policy=$WORK_DIR/iter$((iter - 1))/model
  fi
  echo "=== iteration $iter of $TRAINING_ITERS: policy $policy"

  if [[ -f $dir/generate.jsonl ]]; then
    echo "generate: $dir/generate.jsonl exists, skipped"
  else
    # shellcheck disable=SC2086
    run $GEN_LAUNCH openrl_ckpt.cli.batch_inference --eval_task "$GEN_TASK" --pretrain "$policy" \
      --dataset "$DATASET" --dataset_probs "$DATASET_PROBS" --input_key "$INPUT_KEY" "${prompt_flags[@]}" \
      --max_len "$MAX_LEN" --max_new_tokens "$MAX_NEW_TOKENS" --temperature "$TEMPERATURE" \
      --best_of_n "$BEST_OF_N" --micro_batch_size "$GEN_MICRO_BATCH_SIZE" --seed "$SEED" \
      --iter "$iter" --rollout_batch_size "$ROLLOUT_BATCH_SIZE" --output_path "$dir/generate.jsonl" $GEN_EXTRA
    rc=$?
    if ((rc == EXIT_DATA_EXHAUSTED)); then
      echo "the prompts are used up at iteration $iter: stopping after $iter iteration(s)"
      break
    fi
    stop_on_failure GENERATE $rc
  fi

  if [[ -f $dir/rm.jsonl ]]; then
    echo "rm: $dir/rm.jsonl exists, skipped"
  else
    # shellcheck disable=SC2086
    run $LAUNCH openrl_ckpt.cli.batch_inference --eval_task rm --pretrain "$REWARD_MODEL_PATH" \
      --dataset "$dir/generate.jsonl" --max_len "$MAX_LEN" --micro_batch_size "$RM_MICRO_BATCH_SIZE" \
      --post_processor rs --output_path "$dir/rm.jsonl" $RM_EXTRA
    stop_on_failure RM $?
  fi

  if [[ -d $dir/model ]]; then
    echo "sft: $dir/model exists, skipped"
  else
    # shellcheck disable=SC2086
    run $LAUNCH openrl_ckpt.cli.train_sft --pretrain "$policy" --dataset "$dir/rm.jsonl" \
      --input_key input --output_key output --input_template "" --max_len "$MAX_LEN" \
      --train_batch_size "$TRAIN_BATCH_SIZE" \
      --micro_train_batch_size "$MICRO_TRAIN_BATCH_SIZE" --max_epochs 1 --learning_rate "$LEARNING_RATE" \
      --lr_scheduler constant --seed "$SEED" --save_steps "$SAVE_STEPS" --ckpt_path "$dir/ckpt" --load_checkpoint \
      --save_path "$dir/model" --logging_steps 1 $TRAIN_EXTRA
    stop_on_failure SFT $?
  fi
  if ((KEEP_CKPT == 0)); then
    rm -rf "$dir/ckpt"   # the model is saved: the iteration will not be trained again
  fi

  iter=$((iter + 1))
  echo "$iter" >"$ITER_LOG_PATH.tmp" && mv "$ITER_LOG_PATH.tmp" "$ITER_LOG_PATH"
done

if ((iter > 0)); then
  echo "final policy: $WORK_DIR/iter$((iter - 1))/model"
fi
