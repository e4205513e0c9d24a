"""End-to-end pretraining on the synthetic dataset: τ modes, resume, multi-process equivalence, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from procs import BN_FREE, pretrain_one_and_two_processes
from simclr_tau.config import load_config
from simclr_tau.train.checkpoint import list_checkpoints, load_checkpoint
from simclr_tau.train.pretrain import run

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "synthetic_tiny.yaml")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_cfg(tmp_path: Path, *overrides: str):
    return load_config(TINY, [f"train.output_dir={tmp_path}", *overrides])


TAU_MODES = {
    "fixed": ["temperature.mode=fixed", "temperature.init=0.2"],
    "learnable-log": ["temperature.mode=learnable", "temperature.parametrization=log", "optim.lr=2.0"],
    "learnable-softplus": ["temperature.mode=learnable", "temperature.parametrization=softplus", "optim.lr=2.0"],
    "learnable-relu": ["temperature.mode=learnable", "temperature.parametrization=relu", "optim.lr=2.0"],
    "conditional": ["temperature.mode=conditional", "optim.lr=2.0"],
    "scheduled": ["temperature.mode=scheduled", "temperature.schedule.kind=linear",
                  "temperature.schedule.start=0.5", "temperature.schedule.end=0.1"],
}


@pytest.mark.parametrize("mode", list(TAU_MODES))
def test_every_tau_mode_trains_and_logs_tau(tmp_path: Path, mode: str) -> None:
    cfg = tiny_cfg(tmp_path, f"train.run_name={mode}", *TAU_MODES[mode])
    result = run(cfg)
    rows = metrics(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)
    if mode == "conditional":
        taus = [r["train/tau_mean"] for r in rows]
        eps = 1e-6  # the mean of equal float32 values can exceed them in the last bit
        assert all(0.05 < r["train/tau_min"] <= r["train/tau_mean"] + eps <= r["train/tau_max"] + 2 * eps < 1.0 for r in rows)
        assert rows[-1]["train/tau_std"] > 0  # per-sample τ really differs between samples after training
    else:
        taus = [r["train/tau"] for r in rows]
    if mode == "fixed":
        assert taus == pytest.approx([0.2] * 4)
    elif mode == "scheduled":
        # τ is set before each step: step s (0-based) uses 0.5 + (0.1 - 0.5) * s / 4; the row of step s+1 shows it
        assert taus == pytest.approx([0.5 - 0.4 * s / 4 for s in range(4)], rel=1e-6)
    else:
        assert taus[-1] != pytest.approx(0.1, abs=1e-6)  # a trained τ moved away from its init
    assert (result.run_dir / "encoder.safetensors").is_file()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["step"] == 4 and summary["config"]["temperature.mode"] == cfg.temperature.mode


def _final_state(run_dir: Path) -> dict:
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["model"]


@pytest.mark.parametrize("resume_step, pipeline", [(4, "batched"), (6, "batched"), (6, "dataloader")])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path, resume_step: int, pipeline: str) -> None:
    """Resume at the end of epoch 1 or mid-epoch 2, with either data pipeline."""
    common = ["train.epochs=2", "train.save_every_steps=2", "train.keep_last=10", "train.deterministic=true",
              f"data.pipeline={pipeline}"]
    full = run(tiny_cfg(tmp_path, "train.run_name=full", *common))
    assert full.step == 8
    # An interrupted run: all it has left is the checkpoint at resume_step (and its log up to there + junk after).
    part_dir = tmp_path / "part"
    (part_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(full.run_dir / "checkpoints" / f"step_{resume_step:08d}.pt", part_dir / "checkpoints")
    shutil.copy(full.run_dir / "metrics.jsonl", part_dir / "metrics.jsonl")
    resumed = run(tiny_cfg(tmp_path, "train.run_name=part", *common), resume="auto")
    assert resumed.step == 8
    a, b = _final_state(full.run_dir), _final_state(part_dir)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
    # the log has each step exactly once, and the redone steps carry the same losses
    rows_full, rows_part = metrics(full.run_dir), metrics(part_dir)
    assert [r["step"] for r in rows_part] == list(range(1, 9))
    assert [r["train/loss"] for r in rows_part] == [r["train/loss"] for r in rows_full]


def test_a_relu_tau_stuck_at_its_floor_is_reported_once(tmp_path: Path) -> None:
    """Resume a relu-τ run whose checkpoint has θ < 0 (as the τ study's relu run reached by itself)."""
    common = ["temperature.mode=learnable", "temperature.parametrization=relu", "train.run_name=relu"]
    first = run(tiny_cfg(tmp_path, *common))
    ckpt_path = list_checkpoints(first.run_dir / "checkpoints")[-1]
    ckpt = load_checkpoint(ckpt_path)
    (key,) = [k for k in ckpt["model"] if k.endswith("temperature.theta")]
    ckpt["model"][key] = torch.tensor(-0.5)
    torch.save(ckpt, ckpt_path)
    with pytest.warns(RuntimeWarning, match=r"stuck at its floor eps=0.001") as caught:
        resumed = run(tiny_cfg(tmp_path, *common, "train.epochs=2"), resume="auto")
    assert len([w for w in caught if "stuck at its floor" in str(w.message)]) == 1  # once, not every log step
    assert [r["train/tau"] for r in metrics(resumed.run_dir)[4:]] == pytest.approx([1e-3] * 4)  # dead for good
    # the same run with a healthy τ says nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run(tiny_cfg(tmp_path, *common, "train.run_name=healthy"))


def test_a_fresh_run_refuses_to_overwrite_an_existing_run(tmp_path: Path) -> None:
    run(tiny_cfg(tmp_path, "train.run_name=x", "train.max_steps=1"))
    with pytest.raises(ValueError, match="already holds a run"):
        run(tiny_cfg(tmp_path, "train.run_name=x", "train.max_steps=1"))


@pytest.mark.slow
def test_two_processes_give_the_same_per_step_losses_as_one(tmp_path: Path) -> None:
    """A real 2-process gloo group (torchrun) vs one process, same global batch and seeds."""
    overrides = [*BN_FREE, "train.epochs=2", "temperature.mode=learnable", "optim.lr=1.0", "optim.warmup_epochs=0.5"]
    pretrain_one_and_two_processes(TINY, tmp_path, overrides, REPO)
    r1, r2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == list(range(1, 9))
    for a, b in zip(r1, r2):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5), (a, b)
        assert b["train/tau"] == pytest.approx(a["train/tau"], rel=1e-5), (a, b)
    assert r1[-1]["train/tau"] != pytest.approx(r1[0]["train/tau"], rel=1e-3)  # τ did train


BAD_INPUT = {
    "missing dataset": (["data.name=fashion_mnist", "data.root=/nonexistent/fmnist"], "no Fashion-MNIST idx files"),
    "unknown timm model": (["model.backbone=resnet19"], "is not a timm model"),
    "unknown config key": (["train.epochz=3"], "train.epochz"),
    "wrong value type": (["train.epochs=many"], "train.epochs"),
    "batch larger than dataset": (["train.batch_size=128"], "larger than the dataset"),
    "bad tau bounds": (["temperature.mode=learnable", "temperature.tau_min=0.5", "temperature.tau_max=0.1"], "tau_min"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_one_line_error_with_exit_code_2(tmp_path: Path, capsys, case: str) -> None:
    from simclr_tau.cli import main

    overrides, expected = BAD_INPUT[case]
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", TINY, f"train.output_dir={tmp_path}", *overrides])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert expected in err


def test_console_script_reports_a_bad_config_file_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  bogus_key: 1\n")
    proc = subprocess.run([sys.executable, "-m", "simclr_tau", "pretrain", str(bad)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "train.bogus_key" in proc.stderr and str(bad) in proc.stderr


def test_online_knn_is_logged_and_drives_a_plateau_schedule(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, "train.run_name=knn", "train.epochs=3", "eval.online_knn_every=1", "eval.knn_k=[5]",
                   "eval.knn_t=[0.1]", "temperature.mode=scheduled", "temperature.schedule.kind=plateau",
                   "temperature.schedule.start=0.5", "temperature.schedule.end=0.05", "temperature.schedule.patience=1",
                   "temperature.schedule.gamma=0.5")
    result = run(cfg)
    rows = [r for r in metrics(result.run_dir) if "online_knn/top1_k5_t0.1" in r]
    assert [r["step"] for r in rows] == [4, 8, 12]
    accs = [r["online_knn/top1_k5_t0.1"] for r in rows]
    assert all(0.0 <= a <= 100.0 for a in accs)  # percent
    # τ after the run = 0.5 · 0.5^(drops); a drop happens after each evaluation that does not improve the best
    best, drops = None, 0
    for a in accs[:-1]:  # the last evaluation's drop would act after the final step
        if best is None or a > best:
            best = a
        else:
            drops += 1
    taus = [r["train/tau"] for r in metrics(result.run_dir) if "train/tau" in r]
    assert taus[-1] == pytest.approx(0.5 * 0.5**drops)


def test_pretraining_on_a_mixture_logs_target_and_realized_source_frequencies(tmp_path: Path) -> None:
    sources = "[{name: synthetic, score: 2.0}, {name: synthetic, synthetic_noise: 0.3, score: 0.0}]"
    cfg = tiny_cfg(tmp_path, "train.run_name=mix", "data.name=mixture", f"data.sources={sources}",
                   "data.mixture.temperature=1.0", "data.mixture.num_samples=96")
    result = run(cfg)
    rows = metrics(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # 96 draws per epoch / batch 16
    p0 = math.exp(2.0) / (math.exp(2.0) + 1.0)  # softmax([2, 0] / T) at T = 1
    for r in rows:
        assert r["data/p_synthetic"] == pytest.approx(p0) and r["data/p_synthetic_1"] == pytest.approx(1 - p0)
        assert r["data/freq_synthetic"] + r["data/freq_synthetic_1"] == pytest.approx(1.0)
    # the last row counts all 96 draws (a realized count, not the target) within 3σ of the target
    assert rows[-1]["data/freq_synthetic"] * 96 == pytest.approx(round(rows[-1]["data/freq_synthetic"] * 96))
    assert rows[-1]["data/freq_synthetic"] != pytest.approx(p0)
    sigma = math.sqrt(p0 * (1 - p0) / 96)
    assert abs(rows[-1]["data/freq_synthetic"] - p0) < 3 * sigma


def test_mixture_without_sources_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.name=mixture needs data.sources"):
        tiny_cfg(tmp_path, "data.name=mixture")


def test_speed_options_change_nothing_but_speed(tmp_path: Path) -> None:
    """Fused optimizer kernels give bit-identical weights (2 steps); channels_last activations give the
    reference run's loss and updated weights up to float32 summation order (1 step: later steps of this tiny
    run, batch 16 through BatchNorm, amplify 1e-7 differences chaotically)."""
    from safetensors.torch import load_file

    def go(name: str, *opts: str, steps: int = 2) -> tuple[list[float], dict]:
        r = run(tiny_cfg(tmp_path, f"train.run_name={name}", "train.deterministic=true", f"train.max_steps={steps}",
                         "optim.weight_decay=1e-3", *opts))
        return [m["train/loss"] for m in metrics(r.run_dir)], load_file(r.run_dir / "encoder.safetensors")

    ref_loss, ref_w = go("ref", "train.channels_last=false", "optim.fused=false")
    fused_loss, fused_w = go("fused", "train.channels_last=false", "optim.fused=true")
    assert fused_loss == ref_loss and all(torch.equal(fused_w[k], v) for k, v in ref_w.items())
    assert ref_loss[1] != ref_loss[0]  # it trained
    ref_loss, ref_w = go("ref1", "train.channels_last=false", "optim.fused=false", steps=1)
    cl_loss, cl_w = go("channels_last", "train.channels_last=true", "optim.fused=true", steps=1)
    assert cl_loss == pytest.approx(ref_loss, rel=1e-5)
    assert cl_w.keys() == ref_w.keys()
    _, init_w = go("init", "train.channels_last=false", "optim.lr=1e-20", steps=1)  # ~ the weights before the step
    for k, v in ref_w.items():
        if "running_" in k or "num_batches" in k or not v.is_floating_point():
            continue  # (not floating: the export's not-a-timm-architecture marker of the small stem)
        # the step's update per tensor, in norm (BN biases are sums of ~1e3 nearly cancelling terms: 1 % wobble
        # from the summation order of NHWC kernels; a wrong layout would be off by O(1))
        upd_ref, upd_cl = v - init_w[k], cl_w[k] - init_w[k]
        assert (upd_cl - upd_ref).norm() <= 2e-2 * upd_ref.norm() + 1e-7, k
    assert sum(float((cl_w[k] - init_w[k]).norm()) for k in ref_w if ref_w[k].is_floating_point()) > 1e-2  # it stepped


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_encoder_trains_like_eager_and_exports_the_same_keys(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    eager = run(tiny_cfg(tmp_path, "train.run_name=eager", "train.max_steps=3"))
    comp = run(tiny_cfg(tmp_path, "train.run_name=compiled", "train.max_steps=3", "train.compile=true"))
    la, lb = [r["train/loss"] for r in metrics(eager.run_dir)], [r["train/loss"] for r in metrics(comp.run_dir)]
    # the first step's loss: the same forward; then inductor's reordered float sums drift the tiny run a little
    assert lb[0] == pytest.approx(la[0], rel=1e-4) and lb == pytest.approx(la, rel=2e-2)
    assert load_file(comp.run_dir / "encoder.safetensors").keys() == load_file(eager.run_dir / "encoder.safetensors").keys()
