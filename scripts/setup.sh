#!/usr/bin/env bash
# Create ./.venv and install simclr_tau with its test extras (idempotent: re-runs only when
# pyproject.toml changed). Usage: source-free, `bash scripts/setup.sh`; prints the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.simclr_tau-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  # torch/torchvision: whatever pip resolves on this platform (on the project's machines a capped local build).
  .venv/bin/python -m pip install --quiet --progress-bar off -e '.[test]' 2>&1 | grep -v -E "^WARNING: Location|is ignored" || true
  .venv/bin/python -c "import simclr_tau, torch, timm, faiss, accelerate, wandb" \
    || { echo "error: installation failed (see pip output above)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
