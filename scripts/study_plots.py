"""The figures of the τ study (scripts/reproduce_fmnist.py): one line or band per SETTING, not per run.

With 3-5 seeds of 16 settings, one line per run (``simclr-tau compare``) is unreadable; these figures read the
same run records and draw

1. ``knn_vs_epoch.png``: the online kNN top-1 per setting, mean over its seeds with the min–max band (or ±1
   sample std) over the seeds, seeds aligned by epoch; one panel per family of settings (:func:`setting_group`),
   the reference (fixed τ = 0.2, or a preset's own) and the raw-pixel kNN in every panel;
2. ``tau_vs_step.png``: τ of every setting whose τ moves, from its lowest seed (a per-sample τ's quantile band
   is one run's table of τ_i: a median of quantiles over seeds would be the quantile of no run);
3. ``paired_differences.png``: the paired difference of each setting to the reference with its 95 % t-interval,
   as :func:`study_tables.paired_differences` computed it (a forest plot, one panel per metric).

Data preparation (:func:`knn_bands`, :func:`tau_curves`, :func:`forest_rows`) is separate from drawing
(``plot_*``: one PNG each, or None when there is nothing to draw); :func:`write_study_plots` does all three and
says why a figure was skipped.
"""

from __future__ import annotations

import math
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from simclr_tau.records.plots import BASELINE_GREY, _integer_x, _legend_below, _plt, _save, tau_axis_scale, tau_band
from simclr_tau.records.run_data import RunData, knn_label, knn_order, load_run_dir
from study_tables import LINEAR, REFERENCE, primary_knn

# the families of settings, in panel order
FIXED, SCALAR, PER_SAMPLE, SCHEDULED, OTHER = ("fixed τ", "learned scalar τ", "per-sample τ",
                                               "scheduled / adaptive τ",
                                               "other methods / heads (DCL, MoCo v2, output BN)")
GROUPS = (FIXED, SCALAR, PER_SAMPLE, SCHEDULED, OTHER)
REFERENCE_COLOR = "black"
SPREADS = {"minmax": "min–max over seeds", "std": "±1 sample std over seeds"}
Runs = Mapping[str, Mapping[int, RunData]]  # setting -> seed -> its run


def setting_group(config: Mapping[str, Any]) -> str:
    """The family of a setting, from its run's flattened config: another method, loss or projection head
    (MoCo, DCL, an output BatchNorm) first, then by where τ comes from (a per-sample τ: conditional, or dro with ``per_sample``); a config without a
    known τ mode counts as another method."""
    mode = config.get("temperature.mode")
    if (config.get("train.method", "simclr") != "simclr" or config.get("loss.decoupled")
            or config.get("model.proj_out_bn", "auto") not in ("auto", "none")):
        return OTHER
    if mode == "fixed":
        return FIXED
    if mode == "conditional" or (mode == "dro" and config.get("temperature.dro.per_sample")):
        return PER_SAMPLE
    if mode in ("learnable", "dro"):
        return SCALAR
    return SCHEDULED if mode in ("scheduled", "adaptive") else OTHER


def groups_of(runs: Runs) -> Dict[str, str]:
    """setting -> its family (:func:`setting_group` of its lowest seed's config)."""
    return {name: setting_group(seeds[min(seeds)].config) for name, seeds in runs.items() if seeds}


def online_knn_key(runs: Runs) -> Optional[str]:
    """The online kNN top-1 key the curves show: k = 20 if logged (the verdicts' kNN), else the first."""
    keys = sorted({k for seeds in runs.values() for r in seeds.values() for row in r.history for k in row
                   if k.startswith("online_knn/top1_")}, key=knn_order)
    return primary_knn(keys)


# ---- 1. kNN vs epoch ------------------------------------------------------------------------------------

@dataclass
class SeedBand:
    """One setting's curve over its seeds: at each epoch, the mean over the ``n`` seeds that logged it and the
    spread (``lo``, ``hi``; None where fewer than two seeds did)."""

    setting: str
    seeds: List[int]
    epochs: List[float]
    mean: List[float]
    lo: List[Optional[float]]
    hi: List[Optional[float]]
    n: List[int]


def seed_band(setting: str, series: Mapping[int, Tuple[Sequence[float], Sequence[float]]],
              spread: str = "minmax") -> Optional[SeedBand]:
    """:class:`SeedBand` of ``{seed: (epochs, values)}``; None if no seed has a value. Seeds are aligned by
    epoch (a seed that stopped early counts where it has values); a seed that logged an epoch twice (a resumed
    run) counts with its last value."""
    if spread not in SPREADS:
        raise ValueError(f"spread={spread!r}: expected one of {', '.join(SPREADS)}")
    by_epoch: Dict[float, Dict[int, float]] = {}
    for seed, (xs, ys) in series.items():
        for x, y in zip(xs, ys):
            by_epoch.setdefault(round(x, 6), {})[seed] = y
    if not by_epoch:
        return None
    epochs = sorted(by_epoch)
    band = SeedBand(setting, sorted(s for s, (xs, _) in series.items() if xs), epochs, [], [], [], [])
    for e in epochs:
        vals = list(by_epoch[e].values())
        mean = statistics.fmean(vals)
        if len(vals) < 2:
            lo = hi = None
        elif spread == "minmax":
            lo, hi = min(vals), max(vals)
        else:
            sd = statistics.stdev(vals)
            lo, hi = mean - sd, mean + sd
        band.mean.append(mean)
        band.lo.append(lo)
        band.hi.append(hi)
        band.n.append(len(vals))
    return band


def knn_bands(runs: Runs, key: str, spread: str = "minmax") -> List[SeedBand]:
    """:func:`seed_band` of metric ``key`` against epoch for every setting that logged it, in ``runs`` order."""
    bands = [seed_band(name, {s: r.series(key, "epoch") for s, r in seeds.items()}, spread)
             for name, seeds in runs.items()]
    return [b for b in bands if b is not None]


def _seeds_label(seeds: Sequence[int]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ",".join(map(str, seeds))


def _panels(names: Sequence[str], groups: Mapping[str, str]) -> List[Tuple[str, List[str]]]:
    """[(family, its settings in the given order)] for the families present, in :data:`GROUPS` order."""
    return [(g, [n for n in names if groups.get(n, OTHER) == g]) for g in GROUPS
            if any(groups.get(n, OTHER) == g for n in names)]


def _grid(n: int, width: float, height: float, sharex: bool = True) -> Tuple[Any, List[Any]]:
    """A figure with ``n`` panels in rows of at most 3, ``width`` x ``height`` inches each; unused slots hidden."""
    plt = _plt()
    ncol = min(3, n)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(width * ncol, height * nrow), squeeze=False, sharex=sharex,
                             sharey=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _suptitle(fig: Any, text: str, fontsize: float = 11) -> None:
    """``fig.suptitle(text)``, each line wrapped to the figure's width (a one-panel figure is ~5 inches wide, and
    an unwrapped title runs off both sides). Width per character: ~0.6 em of the font, a DejaVu Sans average."""
    chars = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
    lines = [wrapped for line in text.split("\n") for wrapped in (textwrap.wrap(line, chars) or [""])]
    fig.suptitle("\n".join(lines), fontsize=fontsize)


def _panel_legend(ax: Any) -> None:
    """The panel's own legend below its axes (its colours are the panel's), out of the way of the curves."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, fontsize=8, frameon=False)


def _colors(n: int) -> List[Any]:
    cmap = _plt().get_cmap("tab10")
    return [cmap(i % cmap.N) for i in range(n)]


def _width(i: int, n: int) -> float:
    """Line width of the ``i``-th of ``n`` lines in a panel: thinner and later on top, so that settings with
    identical curves still show every colour (as :func:`simclr_tau.records.plots.line_styles` does)."""
    return 2.6 - 1.4 * i / max(n - 1, 1)


def _draw_band(ax: Any, b: SeedBand, color: Any, zorder: float, width: float = 2.0, role: str = "") -> None:
    """Mean line (solid where every seed has the epoch, dotted where only some do) and its spread band,
    labelled ``setting (role, seeds ...)``."""
    import numpy as np

    full = np.array(b.n) == len(b.seeds)
    mean = np.array(b.mean)
    style = dict(color=color, linewidth=width, marker="o", markersize=4, zorder=zorder)
    label = f"{b.setting} ({role}{_seeds_label(b.seeds)}" + ("" if full.all() else "; dotted: not every seed") + ")"
    if not full.all():
        ax.plot(b.epochs, mean, linestyle=":", **style)
    ax.plot(b.epochs, np.where(full, mean, np.nan), label=label, **style)
    spread = [lo is not None for lo in b.lo]
    if any(spread):
        lo = [v if v is not None else m for v, m in zip(b.lo, b.mean)]
        hi = [v if v is not None else m for v, m in zip(b.hi, b.mean)]
        ax.fill_between(b.epochs, lo, hi, where=spread, color=color, alpha=0.18, linewidth=0, zorder=zorder - 1)


def plot_knn_bands(bands: Sequence[SeedBand], groups: Mapping[str, str], path: Path, key: str,
                   spread: str = "minmax", reference: str = REFERENCE, pixels: Optional[float] = None,
                   note: str = "") -> Optional[Path]:
    """Small multiples of :func:`knn_bands`: one panel per family, the ``reference`` setting (black) and the
    raw-pixel kNN top-1 ``pixels`` (grey dashed, when given) in every panel, one y-axis range for all panels.
    None if there is no band."""
    if not bands:
        return None
    by_name = {b.setting: b for b in bands}
    ref = by_name.get(reference)
    panels = _panels([b.setting for b in bands], groups)
    fig, axes = _grid(len(panels), 5.2, 4.6)
    values = [v for b in bands for v in b.mean + [x for x in b.lo + b.hi if x is not None]]
    values += [pixels] if pixels is not None else []
    lo, hi = min(values), max(values)
    pad = 0.06 * (hi - lo or 1.0)
    for ax, (group, names) in zip(axes, panels):
        others = [n for n in names if n != reference]
        for i, (name, color) in enumerate(zip(others, _colors(len(others)))):
            _draw_band(ax, by_name[name], color, 3 + i, _width(i, len(others)))
        if ref is not None:
            _draw_band(ax, ref, REFERENCE_COLOR, 2.5, 2.6, role="reference, ")
        if pixels is not None:
            ax.axhline(pixels, color=BASELINE_GREY, linestyle="--", linewidth=1.2, zorder=1,
                       label=f"raw pixels {pixels:.2f} % (offline kNN)")
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(group, fontsize=11)
        ax.set_xlabel("epoch")
        ax.tick_params(labelbottom=True)
        _integer_x(ax)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        _panel_legend(ax)
    _suptitle(fig, f"{knn_label(key)} top-1 vs epoch: line = mean over seeds, band = {SPREADS[spread]} "
              "(none for one seed)" + (f"\n{note}" if note else ""))
    fig.tight_layout()
    return _save(fig, path)


# ---- 2. τ vs step ---------------------------------------------------------------------------------------

@dataclass
class TauCurve:
    """One setting's τ against optimizer step, from one seed: a scalar τ (``lo`` / ``hi`` None) or a per-sample
    τ's centre line with its band (``what`` says which quantiles, from :func:`tau_band`)."""

    setting: str
    seed: int
    steps: List[float]
    centre: List[float]
    lo: Optional[List[float]]
    hi: Optional[List[float]]
    what: str


def tau_curve(setting: str, seed: int, run: RunData, key: str = "train/tau") -> Optional[TauCurve]:
    """τ of ``run``: its scalar ``key`` series, else its per-sample band; None if it logged no τ or its τ never
    moved (a fixed τ)."""
    xs, ys = run.series(key)
    if xs:
        curve = TauCurve(setting, seed, xs, ys, None, None, "scalar")
    else:
        band = tau_band(run, key)
        if band is None:
            return None
        steps, mid, lo, hi, what = band
        curve = TauCurve(setting, seed, steps, mid, lo, hi, what)
    values = curve.centre + (curve.lo or []) + (curve.hi or [])
    return curve if max(values) > min(values) else None


def tau_curves(runs: Runs) -> List[TauCurve]:
    """:func:`tau_curve` of the lowest seed of every setting whose τ moves, in ``runs`` order."""
    curves = [tau_curve(name, min(seeds), seeds[min(seeds)]) for name, seeds in runs.items() if seeds]
    return [c for c in curves if c is not None]


def _plain_log_ticks(ax: Any) -> None:
    """A log y-axis labelled 0.02, 0.05, 0.1, ... rather than 2 x 10^-2: decades and their 2 and 5."""
    from matplotlib.ticker import FuncFormatter

    def label(v: float, _: Any) -> str:
        mantissa = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
        return f"{v:g}" if mantissa in (1, 2, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(label))
    ax.yaxis.set_minor_formatter(FuncFormatter(label))


def plot_tau_curves(curves: Sequence[TauCurve], groups: Mapping[str, str], path: Path,
                    reference_tau: Optional[float] = 0.2, reference: str = REFERENCE) -> Optional[Path]:
    """Small multiples of :func:`tau_curves`, one panel per family, each on a log axis when its values span
    more than a decade (:func:`tau_axis_scale`); the reference's fixed τ as a dashed black line. None if no
    setting's τ moves."""
    if not curves:
        return None
    by_name = {c.setting: c for c in curves}
    panels = _panels([c.setting for c in curves], groups)
    fig, axes = _grid(len(panels), 5.2, 4.6)
    for ax, (group, names) in zip(axes, panels):
        values = [] if reference_tau is None else [reference_tau]
        for i, (name, color) in enumerate(zip(names, _colors(len(names)))):
            c = by_name[name]
            label = f"{name} (seed {c.seed}" + ("" if c.lo is None else f"; per-sample: {c.what}") + ")"
            ax.plot(c.steps, c.centre, color=color, linewidth=_width(i, len(names)), label=label, zorder=3 + i)
            values += c.centre
            if c.lo is not None and c.hi is not None:
                ax.fill_between(c.steps, c.lo, c.hi, color=color, alpha=0.2, linewidth=0, zorder=2 + i)
                values += c.lo + c.hi
        if reference_tau is not None:
            ax.axhline(reference_tau, color=REFERENCE_COLOR, linestyle="--", linewidth=1.0, zorder=1,
                       label=f"τ = {reference_tau:g} (the reference {reference})")
        scale = tau_axis_scale(values)
        ax.set_yscale(scale)
        if scale == "log":
            _plain_log_ticks(ax)
        ax.set_ylabel("τ" + (" (log scale)" if scale == "log" else ""))
        ax.set_title(group, fontsize=11)
        ax.set_xlabel("optimizer step")
        ax.tick_params(labelbottom=True)
        ax.grid(alpha=0.3, which="both" if scale == "log" else "major")
        _panel_legend(ax)
    _suptitle(fig, "τ vs step of the settings whose τ moves (lowest seed of each; band: per-sample τ quantiles)")
    fig.tight_layout()
    return _save(fig, path)


# ---- 3. paired differences ------------------------------------------------------------------------------

@dataclass
class ForestRow:
    """One setting's paired difference to the reference on one metric, as :func:`paired_differences` gave it
    (``lo`` / ``hi`` None for a single common seed)."""

    setting: str
    mean: float
    lo: Optional[float]
    hi: Optional[float]
    n: int
    verdict: str


def forest_rows(diffs: Sequence[Mapping[str, Any]], metric: str, order: Sequence[str] = ()) -> Tuple[
        List[ForestRow], List[str]]:
    """The rows of ``metric`` in ``diffs`` (the output of ``study_tables.paired_differences``) with a difference,
    in ``order`` (settings not in it after, in ``diffs`` order), and the settings without a common seed."""
    mine = [d for d in diffs if d["metric"] == metric]
    rank = {name: i for i, name in enumerate(order)}
    mine.sort(key=lambda d: rank.get(d["run"], len(rank)))  # stable: the rest keep their order
    rows = [ForestRow(d["run"], d["mean"], d["lo"], d["hi"], d["n"], d["verdict"]) for d in mine
            if d["mean"] is not None]
    return rows, [d["run"] for d in mine if d["mean"] is None]


VERDICT_COLORS = {"better": "tab:green", "worse": "tab:red", "no evidence": "#333333"}


def _metric_label(metric: str) -> str:
    return "linear probe" if metric == LINEAR else knn_label(metric)


def plot_paired_forest(diffs: Sequence[Mapping[str, Any]], metrics: Sequence[str], path: Path,
                       order: Sequence[str] = (), groups: Mapping[str, str] = {}, reference: str = REFERENCE
                       ) -> Optional[Path]:
    """One panel per metric: each setting's mean paired difference to ``reference`` with its 95 % t-interval
    (coloured by verdict), a single common seed as a hollow point without interval, a vertical line at 0;
    settings top to bottom in ``order``, a rule between two ``groups``. None if no setting has a difference."""
    from matplotlib.lines import Line2D

    table = {m: forest_rows(diffs, m, order) for m in metrics}
    metrics = [m for m in metrics if table[m][0]]
    if not metrics:
        return None
    names = list(dict.fromkeys(r.setting for m in metrics for r in table[m][0]))
    names.sort(key=lambda n: list(order).index(n) if n in order else len(order))
    fig, axes = _grid(len(metrics), 5.0, 0.36 * len(names) + 2.2, sharex=False)
    for k, (ax, metric) in enumerate(zip(axes, metrics)):
        for r in table[metric][0]:
            y = names.index(r.setting)
            if r.lo is None:
                ax.scatter([r.mean], [y], marker="o", facecolors="white", edgecolors="#555555", s=34, zorder=3)
                text = f"{r.mean:+.2f} (1 seed)"
            else:
                ax.errorbar([r.mean], [y], xerr=[[r.mean - r.lo], [r.hi - r.mean]], fmt="o", markersize=5,
                            capsize=3, color=VERDICT_COLORS.get(r.verdict, "#333333"), zorder=3)
                text = f"{r.mean:+.2f} [{r.lo:+.2f}, {r.hi:+.2f}] n={r.n}"
            ax.annotate(text, (r.mean, y), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7,
                        bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.3), zorder=4)
        for y in range(1, len(names)):  # a rule between families
            if groups.get(names[y]) != groups.get(names[y - 1]):
                ax.axhline(y - 0.5, color="#888888", linewidth=1.0, zorder=0)
        ax.axvline(0.0, color=REFERENCE_COLOR, linewidth=1.0, zorder=1)
        ax.set_ylim(len(names) - 0.4, -0.8)  # first setting on top; room for the first row's text
        ax.set_yticks(range(len(names)), names if k % 3 == 0 else [""] * len(names), fontsize=8)
        ax.set_title(_metric_label(metric), fontsize=10)
        ax.set_xlabel(f"Δ top-1 (points): setting − {reference}")
        ax.margins(x=0.25)  # room for the text over the outermost points
        ax.grid(axis="x", alpha=0.3)
    # a setting without a common seed in every panel is not drawn at all; one whose later metric is pending
    # (kNN written, linear probe not yet: a report built mid-run) is drawn in some panels and named per panel
    nowhere = sorted(set.intersection(*(set(table[m][1]) for m in metrics)))
    partly = [f"{_metric_label(m)}: {', '.join(n for n in table[m][1] if n not in nowhere)}" for m in metrics
              if any(n not in nowhere for n in table[m][1])]
    handles = [Line2D([], [], color=c, marker="o", linestyle="-", label=f"mean, 95 % t-interval: {v}")
               for v, c in VERDICT_COLORS.items()]
    handles.append(Line2D([], [], color="#555555", marker="o", markerfacecolor="white", linestyle="",
                          label="one common seed: no interval"))
    title = f"paired difference to {reference} on the seeds both ran"
    notes = ([f"not drawn, no seed in common with the reference: {', '.join(nowhere)}"] if nowhere else []) + (
        [f"not drawn in one panel, no common seed with that metric yet: {'; '.join(partly)}"] if partly else [])
    _suptitle(fig, "\n".join([title, *notes]), fontsize=10)
    _legend_below(fig, handles, [h.get_label() for h in handles])
    return _save(fig, path)


# ---- the study's figures --------------------------------------------------------------------------------

def load_study_runs(entries: Iterable[Tuple[str, int, Path]]) -> Dict[str, Dict[int, RunData]]:
    """``{setting: {seed: RunData}}`` of the run directories ``(setting, seed, run_dir)``, in the given order."""
    runs: Dict[str, Dict[int, RunData]] = {}
    for name, seed, run_dir in entries:
        runs.setdefault(name, {})[seed] = load_run_dir(run_dir)
    return runs


def write_study_plots(runs: Runs, diffs: Sequence[Mapping[str, Any]], metrics: Sequence[str], out: Path,
                      pixels: Optional[Mapping[str, Any]] = None, spread: str = "minmax",
                      reference: str = REFERENCE) -> Tuple[List[Path], List[str]]:
    """The three figures of the module docstring into ``out``: (the PNGs written, a reason for each skipped one).
    ``pixels``: the raw-pixel baseline's metrics (its ``knn/top1_k20_t0.07`` is drawn under the online
    ``online_knn/top1_k20_t0.07`` curves); ``metrics``: the panels of the forest plot; ``reference``: the setting
    ``diffs`` pairs against (black in every panel)."""
    out.mkdir(parents=True, exist_ok=True)
    groups = groups_of(runs)
    order = [n for _, names in _panels(list(runs), groups) for n in names]
    written: List[Path] = []
    notes: List[str] = []
    key = online_knn_key(runs)
    pixels = (pixels or {}).get(key.removeprefix("online_")) if key else None
    bank = {r.config.get("eval.online_knn_subset") for seeds in runs.values() for r in seeds.values()}
    note = (f"online kNN: memory bank of {bank.pop()} training images; the raw-pixel line is the offline kNN on the "
            "whole training set" if len(bank) == 1 and None not in bank and pixels is not None else "")
    figures = [
        ("kNN vs epoch", lambda: key and plot_knn_bands(knn_bands(runs, key, spread), groups, out / "knn_vs_epoch.png",
                                                        key, spread, reference, pixels=pixels, note=note),
         "no online kNN rows in any run (pretrain with eval.online_knn_every=1)"),
        ("τ vs step", lambda: plot_tau_curves(tau_curves(runs), groups, out / "tau_vs_step.png",
                                              reference=reference),
         "no setting's τ moves (all fixed, or no τ logged)"),
        ("paired differences", lambda: plot_paired_forest(diffs, metrics, out / "paired_differences.png", order,
                                                                groups, reference),
         f"no setting shares a seed with {reference}"),
    ]
    for title, draw, why_not in figures:
        path = draw()
        if path:
            written.append(path)
        else:
            notes.append(f"{title}: skipped ({why_not})")
    return written, notes
