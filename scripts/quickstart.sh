#!/usr/bin/env bash
# The main job end to end on this machine, offline, in about two minutes:
#   1. install (scripts/setup.sh: a venv with pinned torch, deepspeed, transformers, ...)
#   2. build a tiny Llama and its tokenizer locally (no hub needed)
#   3. SFT on the shipped data on 2 ranks with checkpoints every 5 steps
#   4. kill -9 the run in the middle, as a crash or preemption would
#   5. rerun the very same command: it resumes from the newest checkpoint and finishes
#   6. load the saved Hugging Face model and generate from it
# Env: OPENRL_VENV (default <repo>/.venv), WORK (default <repo>/runs/quickstart), RANKS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${OPENRL_VENV:-$ROOT/.venv}"
WORK="${WORK:-$ROOT/runs/quickstart}"
RANKS="${RANKS:-2}"

bash scripts/setup.sh "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" WANDB_MODE="${WANDB_MODE:-offline}" HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

rm -rf "$WORK" && mkdir -p "$WORK"
echo "== building a tiny model and tokenizer in $WORK/assets"
python scripts/make_tiny_assets.py --out "$WORK/assets"

TRAIN=(deepspeed --num_gpus "$RANKS" --module openrl_ckpt.cli.train_sft
  --pretrain "$WORK/assets/tiny"
  --dataset examples/data/sft.jsonl --input_key question --output_key response
  --input_template $'User: {}\nAssistant: '
  --eval_dataset examples/data/eval_sft.jsonl --eval_steps 25
  --max_len 512 --train_batch_size 8 --micro_train_batch_size 2 --max_epochs 2 --learning_rate 5e-4
  --zero_stage 2 --save_steps 5 --ckpt_path "$WORK/ckpt" --load_checkpoint --max_ckpt_num 2 --max_ckpt_mem 10
  --save_path "$WORK/model" --logging_steps 5)

echo "== training; the run will be killed with SIGKILL after step 40"
set +e
( setsid "${TRAIN[@]}" > "$WORK/run1.log" 2>&1 & echo $! > "$WORK/run1.pid"; wait )&
waiter=$!
pid=$(sleep 1; cat "$WORK/run1.pid")
until grep -q "step 40/" "$WORK/run1.log" 2>/dev/null; do
  if ! kill -0 "$pid" 2>/dev/null; then echo "training exited early:"; tail -20 "$WORK/run1.log"; exit 1; fi
  sleep 0.2
done
kill -9 -- "-$pid"   # the whole process group: launcher and every rank, no chance to clean up
wait "$waiter" 2>/dev/null
set -e
grep -E "step [0-9]+/|saved checkpoint" "$WORK/run1.log" | tail -4
echo "== killed. Committed checkpoints left behind:"
ls "$WORK/ckpt"

echo "== rerunning the very same command"
"${TRAIN[@]}" 2>&1 | tee "$WORK/run2.log" | grep -E "resumed from|step [0-9]+/|eval_loss|saved (checkpoint|the Hugging)"

echo "== the saved model, loaded with plain transformers"
python - "$WORK/model" <<'PY'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
prompt = "User: What is the capital of France?\nAssistant: "
ids = tok(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
print(f"{sum(p.numel() for p in model.parameters())/1e6:.2f}M parameters loaded from {path}")
print("sample:", repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
PY
echo "== done: checkpoints in $WORK/ckpt, model in $WORK/model, logs in $WORK/run*.log"
