"""Calibration of a classifier's logits: temperature scaling, ECE, NLL, reliability diagrams.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar T > 0,
fitted on held-out (validation) logits by minimizing the NLL of softmax(z / T) with L-BFGS over
log T (so T stays positive). Dividing all logits by the same T > 0 keeps their order, and predictions
here are always taken from the *unscaled* logits, so accuracy cannot change.

Expected calibration error with B = 15 equal-width confidence bins (Guo et al., Naeini et al. 2015):

    ECE = Σ_b (|B_b| / N) · |acc(B_b) − conf(B_b)|,   bin b = (b/B, (b+1)/B]   (confidence 0 goes to bin 0)

where confidence is the softmax probability of the predicted class. ECE is a fraction in [0, 1];
NLL is the mean negative log-likelihood in nats.

Example:
    >>> import torch
    >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]); labels = torch.tensor([0, 1, 1])
    >>> T = fit_temperature(logits, labels); T > 1   # one confident mistake: soften
    True
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# torchmetrics (not a dependency) has this binned ECE (MulticlassCalibrationError); not added: bin_statistics
# below is a few lines and also gives the per-bin figures the reliability diagram draws.
N_BINS = 15


def _check(probs_or_logits: Tensor, labels: Tensor) -> None:
    if probs_or_logits.ndim != 2 or labels.ndim != 1 or probs_or_logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected (N, C) scores and (N,) labels; got {tuple(probs_or_logits.shape)} and {tuple(labels.shape)}")


def bin_statistics(confidence: Tensor, correct: Tensor, n_bins: int = N_BINS) -> Tuple[Tensor, Tensor, Tensor]:
    """Per bin: (accuracy, mean confidence, count), bins (b/B, (b+1)/B]; empty bins hold 0."""
    conf = confidence.double()
    # bin of c: ceil(c * B) - 1, i.e. (lo, hi]; c = 0 goes to bin 0
    b = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    count = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, b, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, b, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, b, correct.double())
    safe = count.clamp_min(1)
    return acc_sum / safe, conf_sum / safe, count


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = N_BINS,
                               predictions: Optional[Tensor] = None) -> float:
    """ECE of class probabilities (N, C). ``predictions`` (default argmax) fixes the predicted class."""
    _check(probs, labels)
    pred = probs.argmax(1) if predictions is None else predictions
    conf = probs.gather(1, pred.view(-1, 1)).squeeze(1)
    acc, mean_conf, count = bin_statistics(conf, pred == labels, n_bins)
    return float(((count / count.sum()) * (acc - mean_conf).abs()).sum())


def ece_from_logits(logits: Tensor, labels: Tensor, T: float = 1.0, n_bins: int = N_BINS) -> float:
    """ECE of softmax(logits / T), predictions from the unscaled logits."""
    probs = torch.softmax(logits.double() / T, dim=1)
    return expected_calibration_error(probs, labels, n_bins, predictions=logits.argmax(1))


def nll(logits: Tensor, labels: Tensor, T: float = 1.0) -> float:
    """Mean negative log-likelihood (nats) of softmax(logits / T)."""
    _check(logits, labels)
    return float(F.cross_entropy(logits.double() / T, labels.long()))


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 200) -> float:
    """The T > 0 minimizing NLL(softmax(logits / T)) on (validation) logits; L-BFGS on log T, float64."""
    _check(logits, labels)
    z, y = logits.detach().double().cpu(), labels.long().cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    T = float(log_t.detach().exp())
    if not math.isfinite(T) or T <= 0:  # degenerate input (e.g. all-equal logits): leave the model as is
        return 1.0
    return T


def calibration_report(logits: Tensor, labels: Tensor, T: float, n_bins: int = N_BINS) -> Dict[str, float]:
    """Accuracy (percent, unchanged by T), ECE and NLL before (T = 1) and after temperature scaling."""
    acc = 100.0 * (logits.argmax(1) == labels).double().mean().item()
    return {
        "top1": acc,
        "ece_before": ece_from_logits(logits, labels, 1.0, n_bins),
        "ece_after": ece_from_logits(logits, labels, T, n_bins),
        "nll_before": nll(logits, labels, 1.0),
        "nll_after": nll(logits, labels, T),
    }


def reliability_figure(logits: Tensor, labels: Tensor, T: float, n_bins: int = N_BINS, title: str = "") -> "Figure":
    """The reliability diagram as a matplotlib Figure: two columns (before / after temperature scaling),
    each with accuracy per confidence bin as bars against the diagonal of perfect calibration (ECE in the
    title) and, in a short panel underneath, the number of test samples in each bin."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pred = logits.argmax(1)
    correct = pred == labels
    edges = torch.linspace(0, 1, n_bins + 1)
    centers, width = ((edges[:-1] + edges[1:]) / 2).numpy(), 1.0 / n_bins
    fig = Figure(figsize=(9, 5.6), dpi=110)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 1))
    for i, (name, t) in enumerate((("before", 1.0), (f"after (T = {T:.3g})", T))):
        ax = fig.add_subplot(grid[0, i])
        conf = torch.softmax(logits.double() / t, 1).gather(1, pred.view(-1, 1)).squeeze(1)
        acc, mean_conf, count = bin_statistics(conf, correct, n_bins)
        nonempty = (count > 0).numpy()
        ax.bar(centers[nonempty], acc.numpy()[nonempty], width=width, edgecolor="black", color="tab:blue",
               alpha=0.85, label="accuracy")
        lo, gap = torch.minimum(acc, mean_conf).numpy(), (mean_conf - acc).abs().numpy()
        ax.bar(centers[nonempty], gap[nonempty], bottom=lo[nonempty], width=width, color="tab:red", alpha=0.3,
               label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.tick_params(labelbottom=False)
        ece = ece_from_logits(logits, labels, t, n_bins)
        ax.set_title(f"{title + ' ' if title else ''}{name}: ECE = {100 * ece:.2f}%")
        ax.legend(loc="upper left", fontsize=8)
        hist = fig.add_subplot(grid[1, i], sharex=ax)
        hist.bar(centers, count.numpy(), width=width, edgecolor="black", color="tab:gray", alpha=0.7)
        hist.set_xlabel("confidence (max softmax probability)")
        hist.set_ylabel("samples per bin", fontsize=8)
    fig.tight_layout()
    return fig


def reliability_diagram(logits: Tensor, labels: Tensor, T: float, path: str | Path, n_bins: int = N_BINS,
                        title: str = "") -> Path:
    """Save :func:`reliability_figure` as a PNG at ``path``."""
    fig = reliability_figure(logits, labels, T, n_bins, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def calibrate(val_logits: Tensor, val_labels: Tensor, test_logits: Tensor, test_labels: Tensor,
              png_path: Optional[str | Path] = None, n_bins: int = N_BINS) -> Dict[str, object]:
    """Fit T on validation logits; report ECE / NLL before and after on validation and test (+ PNG)."""
    T = fit_temperature(val_logits, val_labels)
    out: Dict[str, object] = {
        "T": T,
        "n_bins": n_bins,
        "val": calibration_report(val_logits, val_labels, T, n_bins),
        "test": calibration_report(test_logits, test_labels, T, n_bins),
    }
    if png_path is not None:
        out["reliability_png"] = str(reliability_diagram(test_logits, test_labels, T, png_path, n_bins, "test"))
    return out

