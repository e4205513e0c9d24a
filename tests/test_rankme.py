"""RankMe (Garrido et al. 2023): against the formula on numpy's SVD, analytic ranks, invariances; logged by the
online kNN evaluation; the label-free pick of scripts/tau_sweep.py --select rankme."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simclr_tau.data.augment import eval_transform
from simclr_tau.data.datasets import TensorImageDataset, make_synthetic
from simclr_tau.evaluation.features import extract_features
from simclr_tau.evaluation.knn import online_knn
from simclr_tau.evaluation.rankme import rankme
from simclr_tau.records.run_data import RunData

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "tau_sweep.py"


def _sweep_module():
    spec = importlib.util.spec_from_file_location("tau_sweep", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tau_sweep"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


sweep = _sweep_module()


def reference_rankme(x: np.ndarray, eps: float = 1e-7) -> float:
    """The paper's formula, written out on numpy's float64 SVD."""
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    p = s / np.abs(s).sum() + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def _orthonormal(n: int, r: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q  # n x r, Qᵀ Q = I


# ---- the function --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d,eps", [(50, 8, 1e-7), (8, 50, 1e-7), (200, 32, 1e-7), (30, 30, 1e-3), (40, 6, 0.0)])
def test_rankme_matches_the_formula_on_numpy_svd(n, d, eps):
    g = torch.Generator().manual_seed(n * 100 + d)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)  # correlated columns: unequal σ
    ours = rankme(x, eps=eps)
    assert ours == pytest.approx(reference_rankme(x.double().numpy(), eps), rel=1e-10)
    assert 1.0 <= ours <= min(n, d) + 1e-6


def test_rankme_reads_float64_not_a_float32_rounding():
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rankme(x) == pytest.approx(reference_rankme(x.numpy()), rel=1e-12)


@pytest.mark.parametrize("r", [1, 3, 16])
@pytest.mark.parametrize("eps", [1e-7, 0.0])
def test_equal_singular_values_give_the_rank(r, eps):
    n, d = 64, 16
    g = torch.Generator().manual_seed(r)
    x = 3.0 * _orthonormal(n, r, g) @ _orthonormal(d, r, g).T  # rank r, σ_1 = … = σ_r = 3
    # ε adds K = 16 terms ε log ε ≈ -1.6e-6 to the entropy
    assert rankme(x, eps=eps) == pytest.approx(r, rel=1e-4 if eps else 1e-9)


def test_one_dominant_direction_gives_about_one():
    g = torch.Generator().manual_seed(1)
    n, d = 500, 32
    x = 100.0 * _orthonormal(n, 1, g) @ _orthonormal(d, 1, g).T + 1e-4 * torch.randn(n, d, generator=g, dtype=torch.float64)
    assert rankme(x) == pytest.approx(1.0, abs=0.01)
    assert rankme(torch.randn(n, d, generator=g)) > 25  # isotropic: close to the full width


def test_rankme_is_invariant_to_scale_and_rotation():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(80, 12, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 12, dtype=torch.float64)
    base = rankme(x)
    for c in (1e-3, 7.0, 1e4):
        assert rankme(c * x) == pytest.approx(base, rel=1e-10)
    right, left = _orthonormal(12, 12, g), _orthonormal(80, 80, g)
    assert rankme(x @ right) == pytest.approx(base, rel=1e-10)  # rotate the feature space
    assert rankme(left @ x) == pytest.approx(base, rel=1e-10)  # rotate the samples
    assert rankme(x.float()) == pytest.approx(base, rel=1e-5)  # float32 input, float64 inside


def test_rankme_rejects_bad_shapes_and_handles_degenerate_matrices():
    for bad in (torch.randn(5), torch.randn(2, 3, 4), torch.randn(1, 8), torch.randn(4, 0)):
        with pytest.raises(ValueError, match="rankme"):
            rankme(bad)
    with pytest.raises(ValueError, match="eps"):
        rankme(torch.randn(4, 3), eps=-1.0)
    assert rankme(torch.zeros(10, 4)) == 0.0  # no direction at all
    x = torch.randn(10, 4)
    x[3, 1] = float("nan")
    assert math.isnan(rankme(x))
    assert rankme(torch.ones(6, 3)) == pytest.approx(1.0, abs=1e-4)  # identical rows: rank 1


# ---- online kNN ----------------------------------------------------------------------------------------

def _split(ds, n_train):
    return (TensorImageDataset(ds.images[:n_train], ds.labels[:n_train], ds.classes),
            TensorImageDataset(ds.images[n_train:], ds.labels[n_train:], ds.classes))


def test_online_knn_returns_rankme_of_the_raw_test_features_last():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.ReLU(), torch.nn.Flatten())  # 6·10·10 = 600-d
    train, test = _split(make_synthetic(200, 4, 12), 150)
    tf = eval_transform(12, 1, [0.5], [0.25])
    res = online_knn(enc, train, test, tf, k=[5, 20], T=[0.1, 0.07], subset=100)
    keys = list(res)
    assert keys[0] == "knn/top1_k5_t0.1"  # what a plateau τ schedule monitors
    assert keys[-1] == "rankme" and keys[:-1] == ["knn/top1_k5_t0.1", "knn/top5_k5_t0.1", "knn/top1_k20_t0.07",
                                                  "knn/top5_k20_t0.07"]
    te_f, _ = extract_features(enc, test, tf)
    assert res["rankme"] == pytest.approx(rankme(te_f), rel=1e-9)
    assert res["rankme"] == pytest.approx(reference_rankme(te_f.double().numpy()), rel=1e-9)
    # the raw features, not the kNN's L2-normalized copy, nor the memory bank's
    assert abs(res["rankme"] - rankme(F.normalize(te_f, dim=1))) > 1e-6 * res["rankme"]
    assert abs(res["rankme"] - rankme(extract_features(enc, train, tf)[0])) > 1e-6 * res["rankme"]


def test_tiny_pretraining_logs_online_rankme(tmp_path: Path) -> None:
    from simclr_tau.config import load_config
    from simclr_tau.train.pretrain import run

    cfg = load_config(REPO / "configs" / "synthetic_tiny.yaml",
                      [f"train.output_dir={tmp_path}", "train.run_name=rk", "eval.online_knn_every=1", "eval.knn_k=[5]",
                       "eval.knn_t=[0.1]"])
    result = run(cfg)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    online = [r for r in rows if "online_rankme" in r]
    assert len(online) == 1 and online[0]["step"] == 4  # 64 images / batch 16, one epoch
    keys = [k for k in online[0] if k not in ("step", "epoch")]
    assert keys[0] == "online_knn/top1_k5_t0.1" and keys[-1] == "online_rankme"
    n_test = 16  # synthetic test split: synthetic_size // 4
    assert 1.0 <= online[0]["online_rankme"] <= n_test
    assert sweep.final_value(sweep_run_data(result.run_dir), "online_rankme") == online[0]["online_rankme"]


def test_run_data_keeps_online_rankme_among_the_final_metrics(tmp_path: Path) -> None:
    from simclr_tau.records.run_data import is_metric, load_run_dir

    rows = [{"step": 4, "epoch": 1.0, "online_knn/top1_k20_t0.07": 50.0, "online_rankme": 7.5},
            {"step": 8, "epoch": 2.0, "online_knn/top1_k20_t0.07": 55.0, "online_rankme": 9.25, "images": 128}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"run_name": "r", "knn/top1_k20_t0.07": 60.0}))
    final = load_run_dir(tmp_path).final
    assert final == {"online_knn/top1_k20_t0.07": 55.0, "online_rankme": 9.25, "knn/top1_k20_t0.07": 60.0}
    assert is_metric("online_rankme") and not is_metric("step") and not is_metric("_runtime")


def sweep_run_data(run_dir: Path) -> RunData:
    from simclr_tau.records.run_data import load_run_dir

    return load_run_dir(run_dir)


# ---- scripts/tau_sweep.py --select rankme --------------------------------------------------------------

K20, K200 = "knn/top1_k20_t0.07", "knn/top1_k200_t0.1"

RUNS = {
    "fixed-0.07": {"online_rankme": 10.0, K20: 80.0, K200: 79.0, "linear/test_top1": 85.0},
    "learnable": {"online_rankme": 14.0, K20: 82.0, K200: 78.0},  # no linear probe
    "cosine": {"online_rankme": 12.0, K200: 81.0, K20: 84.0, "linear/test_top1": 86.0},
    "fixed-0.5": {K20: 83.0, K200: 80.0, "linear/test_top1": 84.0},  # no online evaluation
}


def test_selection_picks_the_highest_rankme_and_ranks_it_by_each_metric():
    sel = sweep.select_by_rankme(RUNS)
    assert sel.pick == "learnable" and sel.score == 14.0
    assert sel.scores == {"fixed-0.07": 10.0, "learnable": 14.0, "cosine": 12.0, "fixed-0.5": None}
    assert list(sel.ranks) == [K20, K200, "linear/test_top1"]  # kNN by k, then the linear probe
    assert sel.ranks == {K20: (3, 4), K200: (4, 4), "linear/test_top1": None}
    assert sel.values == {K20: 82.0, K200: 78.0, "linear/test_top1": None}
    assert sel.best == {K20: ("cosine", 84.0), K200: ("cosine", 81.0), "linear/test_top1": ("cosine", 86.0)}
    text = sweep.format_selection(sel)
    assert text.splitlines()[0].startswith("RankMe picks learnable (RankMe 14.00;")
    assert "fixed-0.5 -" in text  # a run without RankMe is listed, not picked
    lines = {line.split("(")[1].split(")")[0]: line for line in text.splitlines()[3:]}
    assert "3 of 4  (82.00)  best: cosine 84.00" in lines[K20]
    assert "4 of 4  (78.00)" in lines[K200] and "not evaluated  best: cosine 86.00" in lines["linear/test_top1"]


def test_selection_ranks_ties_together_and_reads_rankme_from_the_logged_rows():
    runs = [RunData("a", "x", {}, {K20: 70.0}, [{"step": 1, "online_rankme": 9.0}, {"step": 2, "online_rankme": 3.0}]),
            RunData("b", "x", {}, {K20: 75.0}, [{"step": 2, "online_rankme": 5.0}]),
            RunData("c", "x", {}, {K20: 75.0}, [{"step": 2, "online_rankme": float("nan")}])]
    sel = sweep.select_by_rankme(runs)
    assert sel.scores == {"a": 3.0, "b": 5.0, "c": None}  # the last value, not the best one; nan: none
    assert sel.pick == "b" and sel.ranks[K20] == (1, 3)  # tied with c for the best kNN
    assert sweep.select_by_rankme({"p": {"online_rankme": 2.0, K20: 1.0}, "q": {"online_rankme": 2.0, K20: 2.0}}).pick == "p"
    assert "not evaluated (no run has it)" in sweep.format_selection(sel)
    with pytest.raises(ValueError, match="eval.online_knn_every"):
        sweep.select_by_rankme({"p": {K20: 1.0}})


def _fake_run(root: Path, name: str, metrics: dict, rankme_value: float | None) -> None:
    d = root / name
    d.mkdir(parents=True)
    rows = [{"step": 4, "epoch": 1.0, "online_knn/top1_k20_t0.07": 50.0,
             **({"online_rankme": rankme_value} if rankme_value is not None else {})}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({"run_name": name, **metrics}))


def test_select_only_picks_among_existing_sweep_runs(tmp_path: Path) -> None:
    for setting, m in RUNS.items():
        _fake_run(tmp_path, f"sw-{setting}", {k: v for k, v in m.items() if k != "online_rankme"},
                  m.get("online_rankme"))
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(SCRIPT), f"train.output_dir={tmp_path}", "--name", "sw", "--select-only",
                           "--only", *RUNS], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "RankMe picks learnable (RankMe 14.00" in proc.stdout and "3 of 4" in proc.stdout
    missing = subprocess.run([sys.executable, str(SCRIPT), f"train.output_dir={tmp_path}", "--name", "nope",
                              "--select-only"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert missing.returncode == 1 and "no run to select from" in missing.stderr
    no_name = subprocess.run([sys.executable, str(SCRIPT), "--select-only"], capture_output=True, text=True,
                             timeout=60, env=env, cwd=tmp_path)
    assert no_name.returncode == 2 and "--name" in no_name.stderr


def test_select_switches_the_online_evaluation_on_only_when_it_is_off(tmp_path: Path) -> None:
    base = [f"train.output_dir={tmp_path}", "--name", "sw", "--dry-run", "--only", "fixed-0.2"]

    def pretrain_line(*extra: str) -> str:
        proc = subprocess.run([sys.executable, str(SCRIPT), *extra, *base], capture_output=True, text=True,
                              timeout=60, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        return next(line for line in proc.stdout.splitlines() if " pretrain " in line)

    assert "eval.online_knn_every=1" in pretrain_line("--select", "rankme")
    assert "online_knn_every" not in pretrain_line()  # without --select nothing changes
    assert pretrain_line("eval.online_knn_every=3", "--select", "rankme").count("online_knn_every") == 1
