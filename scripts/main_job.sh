#!/usr/bin/env bash
# The main job: set up ./.venv, get Fashion-MNIST, pretrain SimCLR with the CPU-sized config,
# then evaluate the pretrained encoder with FAISS kNN next to a random-init encoder of the same
# architecture and the raw pixels (the input itself: the row a representation must beat).
# Extra arguments are config overrides (e.g. train.epochs=1 temperature.mode=learnable).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/fmnist_simclr_cpu.yaml}
bash scripts/setup.sh

FMNIST=/usr/share/datasets/fashion-mnist
DATA_OVERRIDE=()
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist) ..."
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || true
  fi
  if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
    echo "Fashion-MNIST not installed system-wide: torchvision will download it into data/fashion-mnist"
    DATA_OVERRIDE=(data.root=data/fashion-mnist data.download=true)
  fi
fi

RUN_NAME=${RUN_NAME:-main-$(date +%Y%m%d-%H%M%S)}
.venv/bin/python -m simclr_tau pretrain "$CONFIG" train.run_name="$RUN_NAME" "${DATA_OVERRIDE[@]}" "$@"
RUN_DIR=runs/$RUN_NAME
.venv/bin/python -m simclr_tau knn "$RUN_DIR" "${DATA_OVERRIDE[@]}"
.venv/bin/python -m simclr_tau knn "$RUN_DIR" --random-init "${DATA_OVERRIDE[@]}"
.venv/bin/python -m simclr_tau knn pixels --config "$CONFIG" --out "$RUN_DIR/eval/pixels" "${DATA_OVERRIDE[@]}"
.venv/bin/python - "$RUN_DIR" <<'PY'
import json, sys, pathlib
run = pathlib.Path(sys.argv[1])
pre = json.loads((run / "eval" / "knn.json").read_text())
rnd = json.loads((run / "eval" / "knn_random_init.json").read_text())
pix = json.loads((run / "eval" / "pixels" / "knn.json").read_text())
print(f"\nkNN top-1 on Fashion-MNIST test ({run}):")
print(f"{'k':>5} {'T':>6} {'pretrained':>11} {'random init':>12} {'raw pixels':>11}")
for a, b, c in zip(pre["results"], rnd["results"], pix["results"]):
    print(f"{a['k']:>5} {a['T']:>6} {a['top1']:>10.2f}% {b['top1']:>11.2f}% {c['top1']:>10.2f}%")
PY
