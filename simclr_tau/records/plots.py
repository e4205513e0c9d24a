"""Comparison plots (matplotlib, Agg): every run on shared axes, one colour per run in every figure.

Each function writes one PNG and returns its path, or returns None with the reason in ``notes`` when no run
has the data (e.g. no online kNN rows). Legends name the runs and sit below the axes, where long run names
(``simclr-fixed-fashion_mnist-regnetx_002-20260101-120000``) do not cover the curves.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from simclr_tau.records.run_data import RunData, knn_keys, knn_label, knn_order, tau_keys


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, safe in threads and on servers
    import matplotlib.pyplot as plt

    return plt


def run_colors(runs: Sequence[RunData]) -> Dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    return {r.name: cmap(i % cmap.N) for i, r in enumerate(runs)}


def _legend_below(fig: Any, handles: List[Any], labels: List[str]) -> None:
    ncol = 1 if max((len(s) for s in labels), default=0) > 45 or len(labels) <= 2 else 2
    legend = fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.canvas.draw()  # measure the legend, then give the axes the rest of the figure
    legend_h = legend.get_window_extent().height / fig.dpi  # inches
    width, height = fig.get_size_inches()
    axes_h = height * 0.55  # what the axes keep at least; a long legend makes the figure taller instead
    if legend_h > height - axes_h:
        fig.set_size_inches(width, axes_h + legend_h + 0.2)
    fig.tight_layout(rect=(0, (legend_h + 0.05) / fig.get_size_inches()[1], 1, 1))


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
BASELINE_GREY = "#666666"


def line_styles(runs: Sequence[RunData]) -> Dict[str, Dict[str, Any]]:
    """Per run: its colour, a marker, and a line that gets thinner run by run, so that runs with identical
    curves (ties are common in kNN accuracy) still show every colour: the later, thinner line on top."""
    colors, n = run_colors(runs), max(len(runs) - 1, 1)
    return {r.name: {"color": colors[r.name], "marker": MARKERS[i % len(MARKERS)], "linewidth": 3.2 - 1.6 * i / n,
                     "markersize": 8.0 - 3.5 * i / n, "zorder": 2 + i} for i, r in enumerate(runs)}


def _plot(ax: Any, style: Dict[str, Any], xs: Sequence[float], ys: Sequence[float], markers: bool) -> Any:
    kw = dict(style)
    if not markers:  # long curves: markers would hide the line
        kw.pop("marker"), kw.pop("markersize")
    return ax.plot(xs, ys, **kw)[0]


def plot_lines(runs: Sequence[RunData], key: str, path: Path, x: str = "step", ylabel: Optional[str] = None,
               title: Optional[str] = None) -> Optional[Path]:
    """One line per run of ``key`` against ``x``; None if no run logged it."""
    data = [(r, *r.series(key, x)) for r in runs]
    data = [(r, xs, ys) for r, xs, ys in data if xs]
    if not data:
        return None
    plt, styles = _plt(), line_styles(runs)
    fig, ax = plt.subplots(figsize=(8, 5))
    handles = [_plot(ax, styles[r.name], xs, ys, len(xs) <= 25) for r, xs, ys in data]
    ax.set_xlabel("optimizer step" if x == "step" else x)
    _integer_x(ax)
    ax.set_ylabel(ylabel or key)
    ax.set_title(title or f"{key} vs {x}")
    ax.grid(alpha=0.3)
    _legend_below(fig, handles, [r.name for r, _, _ in data])
    return _save(fig, path)


def tau_axis_scale(values: Sequence[float]) -> str:
    """"log" when the plotted τ values span more than a decade (a learnable τ that fell to its floor next
    to fixed τ = 0.5 would flatten every other line on a linear axis), else "linear"."""
    pos = [v for v in values if v > 0]
    return "log" if pos and max(pos) / min(pos) > 10 else "linear"


def tau_band(r: RunData, key: str = "train/tau") -> Optional[Tuple[list, list, Optional[list], Optional[list], str]]:
    """A per-sample τ run's curve of temperature ``key``: (steps, centre, low, high, what they are), or None
    for a scalar τ.

    The quantiles of the whole τ_i table (``<key>_p50`` with ``_p1``–``_p99``: a dro per-sample τ) when
    logged, else the batch's mean with its min–max band (a conditional τ)."""
    for suffixes, what in ((("_p50", "_p1", "_p99"), "median, p1–p99 band of all τ_i"),
                           (("_mean", "_min", "_max"), "batch mean, min–max band")):
        centre, lo_key, hi_key = (key + x for x in suffixes)
        rows = [(row["step"], row[centre], row.get(lo_key), row.get(hi_key))
                for row in r.history if isinstance(row.get(centre), (int, float)) and "step" in row]
        if rows:
            s, mid, lo, hi = (list(c) for c in zip(*rows))
            full = all(v is not None for v in lo + hi)
            return s, mid, lo if full else None, hi if full else None, what
    return None


LINESTYLES = {"train/tau": "-", "train/tau_s": "-", "train/tau_t": "--", "train/T": ":"}


def plot_tau(runs: Sequence[RunData], path: Path) -> Optional[Path]:
    """Every temperature of every run (:data:`~simclr_tau.records.run_data.TAU_KEYS`: τ, distillation's
    student / teacher τ and KD T, told apart by line style): a scalar as a line, a per-sample one as a centre
    line with a quantile band (:func:`tau_band`)."""
    plt, styles = _plt(), line_styles(runs)
    fig, ax = plt.subplots(figsize=(8, 5))
    handles, labels, values = [], [], []
    for r in runs:
        for key, what_tau in tau_keys(r):
            style = {**styles[r.name], "linestyle": LINESTYLES.get(key, "-")}
            name = r.name if key == "train/tau" else f"{r.name} {what_tau}"
            xs, ys = r.series(key)
            values += list(ys)
            if xs:
                handles.append(_plot(ax, style, xs, ys, len(xs) <= 25))
                labels.append(name)
                continue
            band = tau_band(r, key)
            if band is not None:
                s, mid, lo, hi, what = band
                values += mid + (lo or []) + (hi or [])
                handles.append(_plot(ax, style, s, mid, len(s) <= 25))
                if lo is not None and hi is not None:
                    ax.fill_between(s, lo, hi, color=style["color"], alpha=0.25, linewidth=0)
                labels.append(f"{name} (per-sample: {what})")
    if not handles:
        _plt().close(fig)
        return None
    ax.set_xlabel("optimizer step")
    _integer_x(ax)
    scale = tau_axis_scale(values)
    ax.set_yscale(scale)
    ax.set_ylabel("temperature τ" + (" (log scale)" if scale == "log" else ""))
    ax.set_title("τ vs step")
    ax.grid(alpha=0.3)
    _legend_below(fig, handles, labels)
    return _save(fig, path)


def plot_knn_curves(runs: Sequence[RunData], keys: Sequence[str], path: Path) -> Optional[Path]:
    """Online kNN top-1 vs epoch: one panel per (k, T), every run in each panel."""
    keys = [k for k in keys if any(r.series(k, "epoch")[0] for r in runs)][:4]
    if not keys:
        return None
    plt, styles = _plt(), line_styles(runs)
    fig, axes = plt.subplots(1, len(keys), figsize=(min(16, 6 * len(keys)), 5), squeeze=False)
    shown: Dict[str, Any] = {}
    for ax, key in zip(axes[0], keys):
        for r in runs:
            xs, ys = r.series(key, "epoch")
            if xs:
                shown[r.name] = _plot(ax, styles[r.name], xs, ys, True)
        ax.set_xlabel("epoch")
        _integer_x(ax)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(knn_label(key))
        ax.grid(alpha=0.3)
    _legend_below(fig, list(shown.values()), list(shown))
    return _save(fig, path)


def value_limits(values: Sequence[float], pad: float = 0.12) -> Tuple[float, float]:
    """Axis limits that fit the values with ``pad`` of their range either side (never forced to include 0).

    Runs of one study differ by tenths of a point out of 85: an axis from 0 flattens exactly the
    differences a comparison is for. A single value (or equal values) gets ±5 % of its size (±1 if 0).
    """
    lo, hi = min(values), max(values)
    span = hi - lo
    if span == 0:
        span = abs(lo) * 0.1 or 2.0
        return lo - span / 2, hi + span / 2
    return lo - pad * span, hi + pad * span


def plot_final_metrics(runs: Sequence[RunData], keys: Sequence[Tuple[str, str]], path: Path,
                       scale: Optional[Dict[str, float]] = None) -> Optional[Path]:
    """One panel per (key, label): a dot per run on a value axis fitted to the values, value written beside it.

    A dot plot rather than bars: bars must start at 0, which hides the sub-point differences between runs.
    Runs are named on the value axis of the first panel of each row (long names wrapped), top to bottom in
    the given order; runs without a finite value are left out of that panel; baselines are hollow grey
    diamonds with their names in italics. ``scale`` multiplies a key's values (ECE fractions -> %).
    """
    import textwrap

    scale = scale or {}
    def finite(r: RunData, key: str) -> bool:
        v = r.final.get(key)
        return isinstance(v, (int, float)) and math.isfinite(v)

    keys = [(k, lab) for k, lab in keys if any(finite(r, k) for r in runs)]
    if not keys:
        return None
    plt, colors = _plt(), run_colors(runs)
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    names = ["\n".join(textwrap.wrap(r.name, 28)) or r.name for r in runs]
    lines = max(n.count("\n") + 1 for n in names)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol + 2.2, (0.22 * lines * len(runs) + 1.3) * nrow + 0.3),
                             squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for n, (ax, (key, label)) in enumerate(zip(axes.flat, keys)):
        shown = [(i, r.final[key] * scale.get(key, 1.0)) for i, r in enumerate(runs) if finite(r, key)]
        for i, v in shown:
            if runs[i].baseline:  # a hollow grey diamond: a reference, not a competitor
                ax.scatter([v], [i], marker="D", facecolors="none", edgecolors=BASELINE_GREY, s=36, zorder=3)
            else:
                ax.scatter([v], [i], color=colors[runs[i].name], s=36, zorder=3)
            ax.annotate(f"{v:.4g}", (v, i), va="center", fontsize=7, xytext=(5, 0), textcoords="offset points")
        lo, hi = value_limits([v for _, v in shown])
        ax.set_xlim(lo, hi + 0.15 * (hi - lo))  # room for the printed values on the right
        ax.set_ylim(len(runs) - 0.5, -0.5)  # run 1 on top
        ax.set_yticks(range(len(runs)), names if n % ncol == 0 else [""] * len(runs), fontsize=8)
        for tick, r in zip(ax.get_yticklabels(), runs):
            if r.baseline:
                tick.set_fontstyle("italic")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_")


def plot_all(runs: Sequence[RunData], out: Path, extra: Sequence[str] = ()) -> Tuple[List[tuple], List[str]]:
    """Every comparison figure into ``out``: [(title, path)], [notes about what was skipped]."""
    images: List[tuple] = []
    notes: List[str] = []

    def add(title: str, path: Optional[Path], why_not: str) -> None:
        if path is None:
            notes.append(f"{title}: skipped ({why_not})")
        else:
            images.append((title, path))

    online = sorted({k for r in runs for row in r.history for k in row if k.startswith("online_knn/top1_")}, key=knn_order)
    add("kNN top-1 vs epoch", plot_knn_curves(runs, online, out / "knn_vs_epoch.png"),
        "no online kNN rows in any run's metrics; pretrain with eval.online_knn_every=N")
    add("loss vs step", plot_lines(runs, "train/loss", out / "loss_vs_step.png", ylabel="contrastive loss",
                                   title="training loss vs step"), "no run logged train/loss")
    add("τ vs step", plot_tau(runs, out / "tau_vs_step.png"), "no run logged a temperature (train/tau, train/tau_s, train/tau_t, train/T)")
    bars = [(k, f"{knn_label(k)} top-1 (%)") for k in knn_keys(runs)]
    bars += [("linear/test_top1", "linear probe test top-1 (%)"), ("calib/ece_before", "ECE before calibration (%)"),
             ("calib/ece_after", "ECE after temperature scaling (%)")]
    bars += [(k, k) for k in extra]
    add("final metrics", plot_final_metrics(runs, bars, out / "final_metrics.png",
                                                {"calib/ece_before": 100.0, "calib/ece_after": 100.0}), "no final kNN / linear / ECE results")
    for k in extra:
        if any(r.series(k)[0] for r in runs):
            add(f"{k} vs step", plot_lines(runs, k, out / f"curve_{_slug(k)}.png"), "")
    return images, notes

