"""CUDA checks (skipped without a GPU; scripts/gpu_check.sh runs them on one): training steps in bf16 with
channels_last and torch.compile, the batched augmentation, the dro per-sample state and the robust loss on
the device, and kNN on CUDA features — each against the CPU computation where one exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from simclr_tau.config import load_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "synthetic_tiny.yaml")
FAST = ["train.epochs=2", "train.mixed_precision=bf16", "train.channels_last=true", "train.compile=true", "train.max_steps=8",
        "train.log_every=2", "data.synthetic_size=128", "train.batch_size=32"]


def rows(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["simclr", "mocov2"])
def test_a_bf16_compiled_channels_last_training_run_on_the_gpu(tmp_path: Path, method: str) -> None:
    from simclr_tau.train.checkpoint import list_checkpoints, load_checkpoint
    from simclr_tau.train.pretrain import run

    torch.cuda.reset_peak_memory_stats()
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}", f"train.method={method}", "moco.queue_size=64", *FAST])
    result = run(cfg)
    assert torch.cuda.max_memory_allocated() > 0  # the step ran on the device
    log = rows(result.run_dir)
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in log)
    state = load_checkpoint(list_checkpoints(result.run_dir / "checkpoints")[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_batch_augment_on_the_gpu_equals_the_cpu_for_the_same_parameters() -> None:
    from simclr_tau.config import AugmentConfig
    from simclr_tau.data.batch_augment import BatchAugment

    aug = BatchAugment(AugmentConfig(blur_p=0.5, solarize_p=0.2), 32, 3, [0.5] * 3, [0.25] * 3)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = aug.sample_params(64, torch.Generator().manual_seed(1), "cpu")
    cpu = aug.apply(x, params)
    gpu = aug.cuda().apply(x.cuda(), {k: v.cuda() if torch.is_tensor(v) else v for k, v in params.items()})
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-4, rtol=1e-4)


def test_the_dro_per_sample_tables_live_and_update_on_the_gpu(tmp_path: Path) -> None:
    from simclr_tau.train.checkpoint import list_checkpoints, load_checkpoint
    from simclr_tau.train.pretrain import run

    cfg = load_config(TINY, [f"train.output_dir={tmp_path}", "temperature.mode=dro", "temperature.init=0.2",
                             "temperature.dro.per_sample=true", "temperature.dro.estimator=sogclr",
                             "temperature.dro.eta=0.05", *FAST[:3], "train.max_steps=8", "data.synthetic_size=128",
                             "train.batch_size=32"])
    result = run(cfg)
    state = load_checkpoint(list_checkpoints(result.run_dir / "checkpoints")[-1])
    tau = next(v for k, v in state["model"].items() if k.endswith("tau") and v.numel() == 128)
    assert torch.isfinite(tau).all() and (tau >= 0.05 - 1e-6).all() and (tau <= 0.7 + 1e-6).all()
    assert (tau != 0.2).any()  # the rows of the images seen moved


def test_the_robust_objective_on_the_gpu_equals_the_cpu() -> None:
    from simclr_tau.losses.dro import robust_terms

    g = torch.Generator().manual_seed(0)
    h = torch.randn(16, 30, generator=g, dtype=torch.float64) * 0.5
    tau = torch.rand(16, generator=g, dtype=torch.float64) * 0.5 + 0.1
    cpu = robust_terms(h, tau, 0.3)
    gpu = robust_terms(h.cuda(), tau.cuda(), 0.3)
    for a, b in zip(cpu, gpu):
        if torch.is_tensor(a):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-10, atol=1e-12)


def test_knn_on_cuda_features_equals_knn_on_cpu_features() -> None:
    from simclr_tau.evaluation.knn import knn_eval

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=g)
    ytr, yte = torch.randint(0, 5, (2000,), generator=g), torch.randint(0, 5, (300,), generator=g)
    tr = torch.nn.functional.normalize(centers[ytr] + 3.0 * torch.randn(2000, 32, generator=g), dim=1)
    te = torch.nn.functional.normalize(centers[yte] + 3.0 * torch.randn(300, 32, generator=g), dim=1)
    cpu = knn_eval(tr, ytr, te, yte, [20], [0.07], 5)
    gpu = knn_eval(tr.cuda(), ytr.cuda(), te.cuda(), yte.cuda(), [20], [0.07], 5)
    assert gpu == cpu and 30 < cpu["top1_k20_t0.07"] < 100
