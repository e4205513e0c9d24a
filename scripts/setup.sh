#!/usr/bin/env bash
# Create ./.venv and install simclr_tau (editable) with its test extras. Idempotent: pip runs again
# only when pyproject.toml changed. Used by scripts/main_job.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.simclr_tau-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch/torchvision: whatever pip resolves on this platform (on the project's machines a capped local build).
  echo "installing simclr_tau and its dependencies into .venv (first time: ~2 minutes) ..."
  if ! .venv/bin/python -m pip install --progress-bar off -e '.[test]' > .venv/pip.log 2>&1 \
      || ! .venv/bin/python -c "import simclr_tau, torch, timm, faiss, accelerate, wandb"; then
    tail -n 30 .venv/pip.log >&2
    echo "error: installation failed; the whole pip log is in .venv/pip.log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
