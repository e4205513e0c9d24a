#!/usr/bin/env bash
# Run once on the development machine before scripts/gpu_check.sh: puts into ./.gpu (git-ignored, carried to the
# GPU machine with `carry: [".gpu"]`) what the GPU machine's image lacks — it has torch, timm, accelerate, pytest
# and matplotlib but no package registry: wheels of omegaconf (+ antlr4, an sdist: pure Python), faiss-cpu and
# lightly (+ hydra-core, lightly_utils) for CPython 3.12, and the Fashion-MNIST idx files. ~50 MB together.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/whl .gpu/fashion-mnist
PLAT=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for spec in omegaconf==2.3.1 faiss-cpu==1.15.1 lightly==1.6.0 hydra-core==1.3.2 lightly_utils==0.0.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d .gpu/whl "$spec"
done
python3 -m pip download -q --no-deps --no-binary=:all: -d .gpu/whl antlr4-python3-runtime==4.9.3
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .gpu/fashion-mnist/
du -sh .gpu
