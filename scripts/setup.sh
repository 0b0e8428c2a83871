#!/usr/bin/env bash
# Create (or reuse) the project venv and install everything into it.
#   bash scripts/setup.sh [VENV]        default: $OPENRL_VENV or <repo>/.venv
# Env: TORCH_SPEC  torch requirement installed first (default torch==2.13.0;
#                  on a CUDA machine e.g. TORCH_SPEC="torch==2.13.0 --index-url ...").
#      PYTHON      interpreter used to create the venv (default python3).
# Idempotent: a stamp holding the hash of requirements.txt + TORCH_SPEC makes a
# second run a no-op (apart from the cheap editable install check).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${OPENRL_VENV:-$ROOT/.venv}}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.openrl_ckpt_setup_stamp"
start=$(date +%s)

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# pip quietly; drop the "Location ... is ignored" noise some pip configs emit.
# With pipefail the pipeline still fails when pip does.
pip_install() {
  "$PY" -m pip install -q "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }
}
# Installed version without importing the package (importing torch/deepspeed is slow and chatty).
version_of() {
  "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || echo "missing"
}

# The hash covers everything that decides what gets installed.
want="$( { cat "$ROOT/requirements.txt"; echo "$TORCH_SPEC"; cat "$ROOT/setup.py"; } | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"

if [[ "$want" == "$have" ]]; then
  echo "[setup] $VENV up to date (stamp matches), skipping pip"
else
  echo "[setup] upgrading pip + setuptools"
  pip_install --upgrade pip setuptools  # setuptools: for the no-isolation editable build
  # torch first and pinned: anything that depends on torch would otherwise
  # resolve the newest (CUDA, multi-GB) wheel.
  echo "[setup] installing $TORCH_SPEC"
  # shellcheck disable=SC2086  # TORCH_SPEC may carry extra pip args on purpose
  pip_install $TORCH_SPEC
  torch_pin="torch==$(version_of torch | cut -d+ -f1)"
  echo "[setup] installing requirements.txt (holding $torch_pin)"
  # Repeat the installed torch pin, and drop requirements.txt's own torch line so a
  # CUDA TORCH_SPEC (different pin) does not conflict with it.
  grep -v -E '^\s*torch\s*==' "$ROOT/requirements.txt" > "$VENV/.requirements-notorch.txt"
  pip_install -r "$VENV/.requirements-notorch.txt" "$torch_pin"
  echo "[setup] installing openrl_ckpt (editable, --no-deps)"
  pip_install --no-build-isolation -e "$ROOT" --no-deps
  echo "$want" > "$STAMP"
fi

# The editable install points at a path; re-link when the repo moved (fresh clone
# reusing an old OPENRL_VENV).
if ! (cd / && "$PY" -c 'import openrl_ckpt, os, sys; sys.exit(0 if os.path.dirname(os.path.dirname(openrl_ckpt.__file__)) == sys.argv[1] else 1)' "$ROOT") 2>/dev/null; then
  echo "[setup] (re)installing openrl_ckpt editable from $ROOT"
  pip_install --no-build-isolation -e "$ROOT" --no-deps
fi

echo "[setup] done in $(( $(date +%s) - start ))s: $VENV (torch $(version_of torch), deepspeed $(version_of deepspeed), transformers $(version_of transformers))"
