#!/usr/bin/env bash
# Every GPU check of the project in one call, ~8 minutes on one H100/H200 from a bare machine (issue 20):
#   1. the CUDA tests (tests/test_cuda.py, the CUDA cases of tests/test_augment.py);
#   2. scripts/bench_train.py at 32 px, batch 512, bf16 + compile: ours (batched) against lightly's SimCLR;
#   3. a 2-epoch configs/fmnist_simclr_gpu.yaml run, then kNN of the encoder (and of raw pixels).
# Writes $OUT/gpu_summary.txt (and the logs beside it); OUT defaults to runs/gpu_check.
# SMOKE=1 runs every step tiny (a few steps, 2k images): checks the plumbing on a CPU machine in ~2 minutes.
# Prepare once here: `bash scripts/gpu_prepare.sh`; then run with the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=590)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
SUMMARY=$OUT/gpu_summary.txt
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled WANDB_SILENT=true
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  PY=.venv/bin/python
fi
if ! "$PY" -c "import omegaconf, faiss, lightly" 2>/dev/null && ls .gpu/whl/* >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/* \
    > "$OUT/pip.log" 2>&1 || { say "pip install of .gpu/whl failed (see pip.log)"; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DATA=/usr/share/datasets/fashion-mnist
[ -f "$DATA/train-images-idx3-ubyte.gz" ] || DATA=$PWD/.gpu/fashion-mnist
say "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC') commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
say "$("$PY" -c 'import torch, timm; print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "timm", timm.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tail -1)"

step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to $OUT/NAME.log, one status line in the summary
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  say "== $name: rc=$rc in $((SECONDS - t0)) s"
}

BENCH_STEPS=(--steps 100 --log-every 10); PRE=(train.epochs=2); DATA_N=()
if [ "${SMOKE:-0}" = 1 ]; then
  BENCH_STEPS=(--steps 6 --log-every 2); PRE=(train.epochs=1 train.max_steps=3); DATA_N=(data.subset=2048)
fi

step cuda_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_augment.py -k "cuda"
tail -n 3 "$OUT/cuda_tests.log" | tee -a "$SUMMARY"

step bench_train 170 "$PY" scripts/bench_train.py --config configs/fmnist_simclr_gpu.yaml "${BENCH_STEPS[@]}" \
  --pipelines batched,lightly "data.root=$DATA" "${DATA_N[@]}" data.image_size=32 train.batch_size=512 train.mixed_precision=bf16 \
  train.compile=true
grep -E "images/s|ratio" "$OUT/bench_train.log" | tee -a "$SUMMARY"

RUN=gpu-fmnist-2ep
step pretrain_2ep 150 "$PY" -m simclr_tau pretrain configs/fmnist_simclr_gpu.yaml "data.root=$DATA" "${PRE[@]}" \
  "${DATA_N[@]}" optim.warmup_epochs=0.2 eval.online_knn_every=0 train.run_name=$RUN train.output_dir="$OUT/runs" train.progress=false
grep -E "images/s|done|epoch" "$OUT/pretrain_2ep.log" | tail -n 3 | tee -a "$SUMMARY"
step knn_2ep 90 "$PY" -m simclr_tau knn "$OUT/runs/$RUN" "data.root=$DATA"
grep -E "^ +(20|200) " "$OUT/knn_2ep.log" | tee -a "$SUMMARY"
say "done in $SECONDS s"
