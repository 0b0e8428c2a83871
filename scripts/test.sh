#!/usr/bin/env bash
# Install (if needed), lint (ruff, configured in ruff.toml), then run the whole test suite: tests/unit,
# then tests/integration.
#   bash scripts/test.sh [pytest args...]      e.g. bash scripts/test.sh -x -k resume
# Env: OPENRL_VENV (default <repo>/.venv), TORCH_SPEC (see scripts/setup.sh).
# Exits non-zero if the lint or either test stage fails; every stage always runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${OPENRL_VENV:-$ROOT/.venv}"

bash "$ROOT/scripts/setup.sh" "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"

export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"   # CI has no GPU; DeepSpeed must not probe for one
export WANDB_MODE="${WANDB_MODE:-offline}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1   # no hub in CI: fail fast, never hang
export TOKENIZERS_PARALLELISM=false
# Integration tests launch 2 ranks on a 2-core box: one thread per rank avoids oversubscription.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export PYTHONHASHSEED=0

declare -A status
run_stage() {
  local name="$1"; shift
  echo "=== pytest $name ==="
  local rc=0
  python -m pytest -q "tests/$name" "$@" || rc=$?
  # 5 = no tests collected: an empty stage is not a failure.
  if [[ $rc -eq 5 ]]; then echo "(no tests in tests/$name)"; rc=0; fi
  status[$name]=$rc
}

start=$(date +%s)
echo "=== ruff check ==="
lint=0
ruff check "$ROOT" || lint=$?
run_stage unit "$@"
run_stage integration "$@"

echo "=== summary ($(( $(date +%s) - start ))s) ==="
fail=0
if [[ $lint -eq 0 ]]; then echo "  ruff check: clean"; else echo "  ruff check: FAILED (findings above)"; fail=1; fi
for name in unit integration; do
  if [[ ${status[$name]} -eq 0 ]]; then echo "  tests/$name: passed"; else echo "  tests/$name: FAILED (pytest exit ${status[$name]})"; fail=1; fi
done
exit $fail
