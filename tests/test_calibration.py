"""Calibration: ECE by hand, temperature scaling recovers a known miscalibration without touching
accuracy, the L-BFGS fit is the NLL minimum, the reliability diagram (AUROC: tests/test_ood.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from simclr_tau.evaluation.calibration import (
    bin_statistics, calibrate, calibration_report, ece_from_logits, expected_calibration_error,
    fit_temperature, nll, reliability_diagram, reliability_figure,
)


def test_ece_hand_computed():
    # confidences 0.90 (right), 0.91 (wrong) share bin (13/15, 14/15]; 0.75 (wrong), 0.62 (right) and
    # 0.52 (right) are alone in their bins. ECE = [2·|0.5 − 0.905| + 0.75 + 0.38 + 0.48] / 5 = 0.484
    probs = torch.tensor([
        [0.90, 0.05, 0.05],
        [0.04, 0.91, 0.05],
        [0.75, 0.20, 0.05],
        [0.20, 0.18, 0.62],
        [0.52, 0.40, 0.08],
    ], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.484, abs=1e-9)
    # with 2 bins everything lands in (0.5, 1]: |3/5 − mean conf| = |0.6 − 0.74|
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.14, abs=1e-9)


def test_bin_statistics_matches_loop():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(500, generator=g)
    correct = torch.rand(500, generator=g) < conf
    acc, mean_conf, count = bin_statistics(conf, correct, 15)
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        m = (conf > lo) & (conf <= hi)
        assert count[b] == m.sum()
        if m.any():
            assert acc[b].item() == pytest.approx(correct[m].double().mean().item())
            assert mean_conf[b].item() == pytest.approx(conf[m].double().mean().item())


def _calibrated_classifier(n=6000, c=10, seed=0):
    """Logits whose softmax is the true label distribution (labels are drawn from it): calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, c, generator=g)
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("scale", [5.0, 0.25])
def test_temperature_scaling_recovers_known_miscalibration(scale):
    logits, labels = _calibrated_classifier()
    bad = logits * scale  # ×5: over-confident (needs T ≈ 5 > 1); ×0.25: under-confident (T ≈ 0.25 < 1)
    val, test = slice(0, 3000), slice(3000, None)
    T = fit_temperature(bad[val], labels[val])
    assert T == pytest.approx(scale, rel=0.15)
    assert (T > 1) == (scale > 1)
    rep = calibration_report(bad[test], labels[test], T)
    assert rep["ece_after"] < 0.5 * rep["ece_before"]
    assert rep["ece_after"] < 0.03
    assert rep["nll_after"] < rep["nll_before"]
    # accuracy and every prediction unchanged
    assert rep["top1"] == pytest.approx(100.0 * (bad[test].argmax(1) == labels[test]).double().mean().item())
    assert torch.equal((bad[test] / T).argmax(1), bad[test].argmax(1))


def test_fit_is_the_nll_minimum():
    logits, labels = _calibrated_classifier(n=2000, seed=1)
    z = logits * 3.0
    T = fit_temperature(z, labels)
    grid = torch.exp(torch.linspace(math.log(0.5), math.log(10.0), 2001)).double()
    losses = torch.stack([F.cross_entropy(z.double() / t, labels) for t in grid])
    T_grid = grid[losses.argmin()].item()
    assert T == pytest.approx(T_grid, rel=2e-3)
    assert nll(z, labels, T) <= losses.min().item() + 1e-9


def test_scaling_never_changes_predictions_even_for_extreme_T():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(300, 5, generator=g)
    logits[:10, 1] = logits[:10, 0] + 1e-7  # near-ties
    labels = torch.randint(0, 5, (300,), generator=g)
    ref = calibration_report(logits, labels, 1.0)["top1"]
    for T in (1e-4, 0.1, 3.0, 1e4):
        assert calibration_report(logits, labels, T)["top1"] == ref
        # the ECE uses the unscaled argmax as the prediction
        probs = torch.softmax(logits.double() / T, 1)
        assert ece_from_logits(logits, labels, T) == pytest.approx(
            expected_calibration_error(probs, labels, predictions=logits.argmax(1)))


def test_calibrate_and_reliability_png(tmp_path):
    from matplotlib.image import imread

    logits, labels = _calibrated_classifier(n=2000, seed=3)
    out = calibrate(5 * logits[:1000], labels[:1000], 5 * logits[1000:], labels[1000:], tmp_path / "rel.png")
    assert out["T"] > 1
    assert out["test"]["top1"] == pytest.approx(100.0 * (logits[1000:].argmax(1) == labels[1000:]).double().mean().item())
    assert out["test"]["ece_after"] < out["test"]["ece_before"]
    png = tmp_path / "rel.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 400
    p2 = reliability_diagram(logits, labels, 1.0, tmp_path / "sub" / "r.png", n_bins=10, title="x")
    assert p2.is_file()


def test_reliability_diagram_shows_the_bin_counts_under_each_panel():
    """Under each reliability panel a histogram holds the number of samples per confidence bin (issue 19)."""
    logits, labels = _calibrated_classifier(n=500, seed=4)
    T = 2.0
    fig = reliability_figure(5 * logits, labels, T, n_bins=10)
    axes = fig.get_axes()
    assert len(axes) == 4  # (diagram, histogram) x (before, after)
    for hist, t in ((axes[1], 1.0), (axes[3], T)):
        heights = [bar.get_height() for bar in hist.patches]
        conf = torch.softmax(5 * logits.double() / t, 1).max(1).values
        _, _, count = bin_statistics(conf, torch.ones_like(conf, dtype=torch.bool), 10)
        assert heights == count.tolist() and sum(heights) == 500
        assert hist.get_ylabel() == "samples per bin"
