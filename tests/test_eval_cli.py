"""``simclr-tau knn`` / ``linear`` end to end on tiny run directories: JSON, summary.json, cache reuse,
random-init and pixel baselines, conditional-τ diagnostics, the accelerate-launchable script, and the
one-line user errors (exit status 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simclr_tau.config import load_config, to_yaml
from simclr_tau.data.augment import eval_transform
from simclr_tau.data.datasets import build_eval_datasets, normalization
from simclr_tau.evaluation.cli import knn_main, linear_main
from simclr_tau.evaluation.knn import knn_classify
from simclr_tau.evaluation.ood import auroc
from simclr_tau.methods import build_method
from simclr_tau.models.encoder import build_encoder
from simclr_tau.models.export import load_encoder, save_encoder

REPO = Path(__file__).resolve().parents[1]
BASE = ["data.name=synthetic", "model.backbone=resnet10t", "data.synthetic_size=64", "data.synthetic_image_size=16",
        "wandb.enabled=false", "eval.batch_size=64", "train.progress=false", "model.proj_hidden_dim=32",
        "model.proj_dim=16"]


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def make_run(root: Path, extra=(), method: bool = False) -> Path:
    """A run directory as pretraining leaves it (config.yaml, encoder.safetensors, summary.json[, checkpoint])."""
    cfg = load_config(None, BASE + list(extra))
    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(123)
    if method:
        m = build_method(cfg, 1, 1, 1)
        with torch.no_grad():  # give the conditional τ head a non-constant output
            for p in m.temperature.parameters():
                p.normal_(0, 0.5)
        encoder = m.encoder
        (run / "checkpoints").mkdir()
        torch.save({"model": m.state_dict(), "step": 7}, run / "checkpoints" / "step_00000007.pt")
    else:
        encoder, _ = build_encoder(cfg.model, 1)
    train, _ = build_eval_datasets(cfg.data)
    norm = normalization("synthetic", train)
    save_encoder(run / "encoder.safetensors", encoder, cfg.model, 1, 16, norm.mean, norm.std)
    (run / "summary.json").write_text(json.dumps({"run_name": "tiny", "step": 7, "final/train_loss": 1.5}))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("evalcli"))


def test_knn_writes_json_updates_summary_and_reuses_cache(run_dir, capsys):
    out = knn_main([str(run_dir), "--k", "5", "10", "--t", "0.07", "0.1", "--diag-n", "16"])
    data = json.loads((run_dir / "eval" / "knn.json").read_text())
    assert data["metrics"] == out["metrics"]
    assert set(data["metrics"]) == {"knn/top1_k5_t0.07", "knn/top5_k5_t0.07", "knn/top1_k10_t0.1", "knn/top5_k10_t0.1"}
    assert data["dataset"]["n_train"] == 64 and data["feature_dim"] == 512
    assert data["cache_hit"] == {"train": False, "test": False}
    summary = json.loads((run_dir / "summary.json").read_text())
    for k, v in data["metrics"].items():
        assert summary[k] == pytest.approx(v)
    assert summary["final/train_loss"] == 1.5 and summary["run_name"] == "tiny"  # merged, not replaced
    assert summary["diag/alignment"] == pytest.approx(data["diagnostics"]["alignment"])
    assert data["diagnostics"]["conditional_tau"]["skipped"].startswith("temperature.mode=fixed")
    printed = capsys.readouterr().out
    assert "top-1" in printed and "wrote" in printed
    # second evaluation: cached features, identical numbers
    again = knn_main([str(run_dir), "--k", "5", "10", "--t", "0.07", "0.1", "--no-diagnostics"])
    assert again["cache_hit"] == {"train": True, "test": True}
    assert again["metrics"] == data["metrics"]


def test_random_init_baseline(run_dir):
    n_cache = len(list((run_dir / "eval" / "cache").glob("*.pt")))
    out = knn_main([str(run_dir), "--random-init", "--k", "5", "--t", "0.1", "--no-diagnostics"])
    assert (run_dir / "eval" / "knn_random_init.json").is_file()
    assert set(out["metrics"]) == {"knn_random_init/top1_k5_t0.1", "knn_random_init/top5_k5_t0.1"}
    assert len(list((run_dir / "eval" / "cache").glob("*.pt"))) == n_cache + 2  # other weights, other key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "knn_random_init/top1_k5_t0.1" in summary


def test_linear_end_to_end(run_dir):
    out = linear_main([str(run_dir), "--optimizer", "lbfgs", "--epochs", "20", "--wd", "0", "1e-3"])
    data = json.loads((run_dir / "eval" / "linear.json").read_text())
    assert (run_dir / "eval" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    probe, calib = data["probe"], data["calibration"]
    assert probe["chosen"]["wd"] in (0.0, 1e-3) and len(probe["grid"]) == 2
    assert probe["n_train"] + probe["n_val"] == 64
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["linear/test_top1"] == pytest.approx(probe["test_top1"])
    assert summary["calib/T"] == pytest.approx(calib["T"]) and calib["T"] > 0
    assert summary["calib/ece_before"] == pytest.approx(calib["test"]["ece_before"])
    assert summary["calib/ece_after"] == pytest.approx(calib["test"]["ece_after"])
    assert calib["test"]["top1"] == pytest.approx(probe["test_top1"])  # scaling does not move accuracy
    assert out["metrics"]["linear/val_top1"] == probe["val_top1"]


def test_linear_augmented_mode(run_dir):
    out = linear_main([str(run_dir), "--mode", "augmented", "--epochs", "1", "--lr", "0.1", "--wd", "0",
                       "--out", str(run_dir / "eval_aug")])
    assert out["probe"]["mode"] == "augmented" and out["probe"]["optimizer"] == "sgd"
    assert (run_dir / "eval_aug" / "linear.json").is_file()


def test_pixels_baseline_writes_to_out(tmp_path):
    out = knn_main(["pixels", *BASE, "--k", "5", "--t", "0.1", "--out", str(tmp_path / "px"), "--no-diagnostics"])
    assert out["feature_dim"] == 256 and out["kind"] == "pixels"
    assert (tmp_path / "px" / "knn.json").is_file() and not (tmp_path / "px" / "cache").exists()


def test_conditional_tau_diagnostics(tmp_path):
    # noisy enough that kNN makes mistakes: the AUROC of τ against them must be defined
    run = make_run(tmp_path, ["temperature.mode=conditional", "temperature.init=0.2", "temperature.hidden_dim=8",
                              "data.synthetic_noise=0.6"], method=True)
    out = knn_main([str(run), "--k", "5", "--t", "0.1", "--diag-n", "16"])
    ct = out["diagnostics"]["conditional_tau"]
    assert set(ct["tau_mean_per_class"]) == {"class0", "class1", "class2", "class3"}
    # recompute τ (from the checkpoint) and kNN correctness (from the exported encoder) independently
    cfg = load_config(run / "config.yaml")
    m = build_method(cfg, 1, 1, 1)
    m.load_state_dict(torch.load(run / "checkpoints" / "step_00000007.pt", weights_only=True)["model"])
    m.eval()
    train, test = build_eval_datasets(cfg.data)
    norm = normalization("synthetic", train)
    tf = eval_transform(16, 1, norm.mean, norm.std)
    encoder, _ = load_encoder(run / "encoder.safetensors")
    with torch.no_grad():
        tau = m.temperature(m.projector(m.encoder(tf(test.images))))
        f_train, f_test = encoder(tf(train.images)), encoder(tf(test.images))
    correct = knn_classify(f_train, train.labels, f_test, 5, 0.1, 4).argmax(1) == test.labels
    assert 0 < int(correct.sum()) < len(correct)  # both outcomes present: the AUROC is defined
    assert ct["auroc_tau_vs_knn_error"] == pytest.approx(auroc(tau, ~correct))
    assert ct["tau_mean"] == pytest.approx(tau.mean().item(), rel=1e-5)
    for c in range(4):
        assert ct["tau_mean_per_class"][f"class{c}"] == pytest.approx(tau[test.labels == c].mean().item(), rel=1e-5)
    assert ct["tau_std"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["diag/tau_auroc"] == pytest.approx(ct["auroc_tau_vs_knn_error"])
    # a fixed-τ run is skipped with a note (see test_knn_writes_json_updates_summary_and_reuses_cache)


# ---- errors ------------------------------------------------------------------------------------------

def _user_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_encoder_of_another_architecture(tmp_path, capsys):
    """An encoder file whose metadata claims regnetx_002 but holds resnet10t weights."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    run = make_run(tmp_path)
    path = run / "encoder.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    model = json.loads(meta["model"])
    model["backbone"] = "regnetx_002"
    meta["model"] = json.dumps(model)
    save_file(load_file(str(path)), str(path), metadata=meta)
    err = _user_error(capsys, knn_main, [str(run), "--k", "5", "--t", "0.1"])
    assert "does not match the encoder architecture" in err and "missing:" in err and "unexpected:" in err
    assert "unexpected: bn1.bias" in err  # names the mismatched keys (resnet keys regnet does not have)


def test_other_user_errors(run_dir, tmp_path, capsys):
    err = _user_error(capsys, knn_main, [str(run_dir), "--k", "1000", "--t", "0.1"])
    assert "k=1000 is larger than the training set (64 samples)" in err
    err = _user_error(capsys, knn_main, [str(tmp_path / "nope")])
    assert "no such run directory or encoder file" in err
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "encoder.safetensors").write_bytes((run_dir / "encoder.safetensors").read_bytes())
    err = _user_error(capsys, linear_main, [str(lone / "encoder.safetensors")])
    assert "needs --config" in err
    err = _user_error(capsys, linear_main, [str(run_dir), "--mode", "augmented", "--optimizer", "lbfgs"])
    assert "--optimizer sgd or adamw" in err
    err = _user_error(capsys, linear_main, [str(run_dir), "--val-fraction", "0"])
    assert "--val-fraction=0.0 must lie in (0, 1)" in err
    err = _user_error(capsys, knn_main, [str(run_dir), "data.channels=rgb", "--k", "5"])
    assert "expects 1-channel images" in err


def test_launchable_script(run_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, str(REPO / "eval" / "knn.py"), str(run_dir), "--k", "5", "--t", "0.2",
                          "--no-diagnostics", "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "o" / "knn.json").read_text())["results"][0]["k"] == 5
