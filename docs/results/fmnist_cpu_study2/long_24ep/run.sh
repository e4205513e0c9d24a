#!/bin/bash
# one longer run: the study's outbn recipe row (fixed 0.2 + output BN), 24 epochs instead of 6, seed 0
cd "$(dirname "$0")/../../../.."   # the repository root
export OMP_NUM_THREADS=1
N=simclr-fixed-0.2-outbn-24ep-s0
P=.venv/bin/python
$P -m simclr_tau pretrain configs/fmnist_study2_cpu.yaml temperature.mode=fixed temperature.init=0.2 model.proj_out_bn=affine train.epochs=24 eval.online_knn_every=4 train.seed=0 train.output_dir=runs/long train.run_name=$N train.progress=false
$P -m simclr_tau knn runs/long/$N --no-progress
$P -m simclr_tau linear runs/long/$N --no-progress
