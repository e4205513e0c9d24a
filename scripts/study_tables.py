"""The tables of the τ study (scripts/reproduce_fmnist.py): rows of finished runs in, markdown out.

Pure functions of the rows the study script reads from the run directories: the mean ± std per setting, the
paired difference of each setting to fixed τ = 0.2 with its 95 % t-interval and a verdict, the τ statistics,
the label-free RankMe pick and where it ranks, and the OOD AUROCs of the held-out-class runs.
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from simclr_tau.records.run_data import knn_label, knn_order
from tau_sweep import LINEAR, RANKME, select_by_rankme  # the sweep's label-free pick, reused on the settings' means

# Xiao, Rasul & Vollgraf 2017, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
# Algorithms" (arXiv:1708.07747), Table 3 / the repository's benchmark: best test accuracy per classifier.
PAPER_BASELINES = {"SVC (rbf, C=10)": 89.7, "KNeighbors (k=5, L1, distance)": 85.4, "LogisticRegression (C=1, L1)": 84.2}

TAU_STATS = ("tau_p1", "tau_p50", "tau_p99", "tau_at_min", "tau_at_max")
REFERENCE = "simclr-fixed-0.2"  # what every learned τ is paired against
# two-sided 95 % quantiles of Student's t, by degrees of freedom (scipy is not a dependency)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}

# the figures of a row besides the kNN columns: metric names of the run record (summary.json)
FIGURES = ("linear/test_top1", "calib/ece_before", "calib/ece_after", "diag/alignment", "diag/uniformity",
           "train/images_per_s")


def knn_columns(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The kNN top-1 metric names present in ``rows`` (knn/top1_k20_t0.07, ...), sorted by k then T."""
    return sorted({k for r in rows for k in r if k.startswith("knn/top1_")}, key=knn_order)


def aggregate(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows of the same setting merged: {"run", "seeds", "mean": {figure: value}, "std": {figure: sample std}}
    over the evaluated seeds (std None for one seed)."""
    out = []
    for name in dict.fromkeys(r["run"] for r in rows):
        group = [r for r in rows if r["run"] == name and knn_columns([r])]  # a seed still training does not count
        out.append(_merged(name, group, [*knn_columns(group), *FIGURES, "tau", *TAU_STATS, RANKME, "train_min"]))
    return out


def _merged(name: str, group: List[Dict[str, Any]], keys: Sequence[str]) -> Dict[str, Any]:
    """{"run", "seeds", "mean", "std"} of ``keys`` over the rows of ``group`` that have each key."""
    agg: Dict[str, Any] = {"run": name, "seeds": [r["seed"] for r in group], "mean": {}, "std": {}}
    for key in keys:
        vals = [r[key] for r in group if r.get(key) is not None]
        agg["mean"][key] = statistics.fmean(vals) if vals else None
        agg["std"][key] = statistics.stdev(vals) if len(vals) > 1 else None
    return agg


def _fmt(v: Optional[float], std: Optional[float] = None, digits: int = 2, scale: float = 1.0) -> str:
    if v is None:
        return "–"
    s = f"{scale * v:.{digits}f}"
    return s + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def markdown_table(agg: List[Dict[str, Any]], baselines: List[Dict[str, Any]]) -> str:
    keys = knn_columns([a["mean"] for a in agg])
    cols = ["run", "seeds", *[knn_label(k) for k in keys], "linear", "ECE before → after (%)", "align", "uniform",
            "final τ", "train min"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for a in agg:
        m, sd = a["mean"], a["std"]
        cells = [a["run"], ",".join(map(str, a["seeds"])), *[_fmt(m.get(k), sd.get(k)) for k in keys],
                 _fmt(m["linear/test_top1"], sd["linear/test_top1"]),
                 f"{_fmt(m['calib/ece_before'], None, 2, 100)} → {_fmt(m['calib/ece_after'], None, 2, 100)}",
                 _fmt(m["diag/alignment"], None, 3), _fmt(m["diag/uniformity"], None, 3), _fmt(m["tau"], sd["tau"], 4),
                 _fmt(m["train_min"], None, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    blank = [""] * 5
    for b in baselines:
        lines.append("| " + " | ".join([f"*{b['run']}*", "–", *[_fmt(b.get(k)) for k in keys],
                                        _fmt(b.get("linear/test_top1")), *blank]) + " |")
    for name, acc in PAPER_BASELINES.items():
        lines.append("| " + " | ".join([f"*paper: {name}*", "–", *[""] * len(keys), f"{acc:.1f} (classifier)", *blank])
                     + " |")
    return "\n".join(lines)


def verdict(agg: List[Dict[str, Any]], baselines: List[Dict[str, Any]]) -> List[str]:
    """The goals of the study, checked on the figures (printed and written to results.md)."""
    out: List[str] = []
    keys = knn_columns([a["mean"] for a in agg])
    ssl = [a for a in agg if keys and a["mean"].get(keys[0]) is not None]
    if not ssl:
        return ["no finished run"]
    base = {b["run"]: b for b in baselines}
    for key in keys:
        for bname in ("random-init encoder", "raw pixels"):
            ref = base.get(bname, {}).get(key)
            if ref is None:
                continue
            miss = [a["run"] for a in ssl if a["mean"].get(key) is not None and a["mean"][key] <= ref]
            out.append(f"{knn_label(key)}: {len(ssl) - len(miss)}/{len(ssl)} runs beat the {bname} ({ref:.2f})"
                       + (f"; not: {', '.join(miss)}" if miss else ""))
    for key, label in (("linear/test_top1", "linear probe"), *[(k, knn_label(k)) for k in keys[:1]]):
        ranked = sorted((a for a in ssl if a["mean"].get(key) is not None), key=lambda a: -a["mean"][key])
        if len(ranked) >= 2:
            best, second = ranked[0], ranked[1]
            gap = best["mean"][key] - second["mean"][key]
            spreads = [a["std"][key] for a in ssl if a["std"].get(key) is not None]
            noise = (f"; largest seed std among multi-seed rows {max(spreads):.2f}, so the gap is "
                     f"{'larger' if gap > max(spreads) else 'not larger'} than seed noise") if spreads else \
                "; one seed per run, no spread measured"
            out.append(f"best {label}: {best['run']} {best['mean'][key]:.2f}, ahead of {second['run']} by "
                       f"{gap:.2f}{noise}")
    best_lin = max((a["mean"]["linear/test_top1"] for a in ssl if a["mean"]["linear/test_top1"] is not None),
                   default=None)
    if best_lin is not None:
        svc = PAPER_BASELINES["SVC (rbf, C=10)"]
        out.append(f"best linear probe {best_lin:.2f} vs the paper's best classical baseline (SVC) {svc}: "
                   f"{'above' if best_lin > svc else 'below'}")
    return out


def t975(df: int) -> float:
    """Student's t two-sided 95 % quantile for ``df`` degrees of freedom (the next tabulated df below)."""
    return T975[max(d for d in T975 if d <= df)] if df < 30 else 1.96 + 2.4 / df


def paired_differences(rows: List[Dict[str, Any]], keys: Sequence[str], reference: str = REFERENCE
                       ) -> List[Dict[str, Any]]:
    """Each setting minus ``reference`` on the seeds both ran (same seed = same data order, augmentations and
    initialization): mean difference, sample std, 95 % t-interval, verdict (better / worse when the interval
    excludes 0, else no evidence), per metric."""
    ref = {r["seed"]: r for r in rows if r["run"] == reference and knn_columns([r])}
    out = []
    for name in dict.fromkeys(r["run"] for r in rows if r["run"] != reference):
        mine = {r["seed"]: r for r in rows if r["run"] == name and knn_columns([r])}
        seeds = sorted(set(mine) & set(ref))
        for key in keys:
            on = [s for s in seeds if mine[s].get(key) is not None and ref[s].get(key) is not None]  # this metric's
            d = [mine[s][key] - ref[s][key] for s in on]  # seeds: a run whose linear probe is pending lacks that seed
            entry = {"run": name, "reference": reference, "metric": key, "seeds": on, "n": len(d),
                     "mean": statistics.fmean(d) if d else None}
            if len(d) >= 2:
                sd = statistics.stdev(d)
                half = t975(len(d) - 1) * sd / len(d) ** 0.5
                lo, hi = entry["mean"] - half, entry["mean"] + half
                entry.update(std=sd, lo=lo, hi=hi, verdict="better" if lo > 0 else "worse" if hi < 0 else "no evidence")
            else:
                entry.update(std=None, lo=None, hi=None, verdict="one seed: no interval")
            out.append(entry)
    return out


def paired_table(diffs: List[Dict[str, Any]], keys: Sequence[str]) -> str:
    if not diffs:
        return ""
    head = ["run", "seeds", *[f"Δ {knn_label(k) if k.startswith('knn/') else 'linear'}" for k in keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in dict.fromkeys(d["run"] for d in diffs):
        cells = [name]
        ds = {d["metric"]: d for d in diffs if d["run"] == name}
        cells.append(",".join(map(str, next(iter(ds.values()))["seeds"])))
        cells += [_diff_cell(ds.get(k)) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diff_cell(d: Optional[Dict[str, Any]], verdict: bool = True) -> str:
    """A paired difference as a table cell: mean [95 % t-interval] and (``verdict``) the verdict."""
    if d is None or d["mean"] is None:
        return "–"
    if d["lo"] is None:
        return f"{d['mean']:+.2f} ({d['verdict'] if verdict else 'one seed'})"
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" + (f" {d['verdict']}" if verdict else "")


def summary_table(agg: List[Dict[str, Any]], diffs: List[Dict[str, Any]], keys: Sequence[str],
                  baselines: List[Dict[str, Any]], reference: str = REFERENCE) -> str:
    """The study's answer in one table: per evaluated setting, each of ``keys`` (the main kNN column, the
    linear probe) as mean ± std over its seeds next to its paired difference to ``reference`` with the 95 %
    t-interval, a verdict per metric, and the final τ; then the baselines and the paper's best classifier."""
    head = ["setting", "seeds"]
    for k in keys:
        head += [_label(k), f"Δ {_label(k)} [95 %]"]
    head += ["verdict (" + " / ".join(_label(k) for k in keys) + ")", "final τ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in agg:
        if not a["seeds"]:
            continue
        ds = {d["metric"]: d for d in diffs if d["run"] == a["run"]}
        cells = [a["run"], ",".join(map(str, a["seeds"]))]
        for k in keys:
            cells += [_fmt(a["mean"].get(k), a["std"].get(k)), "ref." if a["run"] == reference else _diff_cell(ds.get(k), False)]
        verdicts = ["ref." if a["run"] == reference else (ds[k]["verdict"] if k in ds and ds[k]["lo"] is not None else "–")
                    for k in keys]
        cells += [verdicts[0] if len(set(verdicts)) == 1 else " / ".join(verdicts),
                  _fmt(a["mean"].get("tau"), None, 4)]
        lines.append("| " + " | ".join(cells) + " |")
    for b in baselines:
        cells = [f"*{b['run']}*", "–"]
        for k in keys:
            cells += [_fmt(b.get(k)), ""]
        lines.append("| " + " | ".join(cells + ["", ""]) + " |")
    name, acc = next(iter(PAPER_BASELINES.items()))
    cells = [f"*paper: {name}*", "–"]
    for k in keys:
        cells += [f"{acc:.1f} (classifier)" if k == LINEAR else "", ""]
    lines.append("| " + " | ".join(cells + ["", ""]) + " |")
    return "\n".join(lines)


def tau_table(agg: List[Dict[str, Any]]) -> str:
    """τ statistics of the runs whose τ has state (dro per-sample: quantiles of all τ_i and the bounds)."""
    rows = [a for a in agg if a["mean"].get("tau_p50") is not None or a["mean"].get("tau_at_min") is not None]
    if not rows:
        return ""
    lines = ["| run | final τ (scalar or batch mean) | τ_i p1 / p50 / p99 | fraction of τ at τ_min / τ_max |", "|---|---|---|---|"]
    for a in rows:
        m = a["mean"]
        q = " / ".join(_fmt(m.get(k), None, 3) for k in ("tau_p1", "tau_p50", "tau_p99")) if m.get("tau_p50") is not None else "–"
        lines.append(f"| {a['run']} | {_fmt(m['tau'], a['std'].get('tau'), 4)} | {q} | "
                     f"{_fmt(m.get('tau_at_min'), None, 3)} / {_fmt(m.get('tau_at_max'), None, 3)} |")
    return "\n".join(lines)



# ---- round two: the verdict per mode, the label-free pick, the held-out classes ------------------------

def best_fixed(agg: List[Dict[str, Any]], key: str, fixed: Sequence[str]) -> Optional[str]:
    """Of the ``fixed`` τ settings, the one with the highest mean ``key`` over its seeds (None if none has it)."""
    have = [a for a in agg if a["run"] in fixed and a["mean"].get(key) is not None]
    return max(have, key=lambda a: a["mean"][key])["run"] if have else None


def vs_best_fixed(rows: List[Dict[str, Any]], agg: List[Dict[str, Any]], keys: Sequence[str],
                  learned: Sequence[str], fixed: Sequence[str]) -> List[Dict[str, Any]]:
    """Each evaluated ``learned`` setting paired against the best fixed τ of each metric (:func:`best_fixed`):
    the entries of :func:`paired_differences`, with ``reference`` naming that fixed τ. Choosing the best constant
    on the same test set favours it, so a "better" here is conservative."""
    order = [n for n in dict.fromkeys(r["run"] for r in rows) if n in learned]  # the study's order
    out = []
    for key in keys:
        ref = best_fixed(agg, key, fixed)
        if ref is not None:
            out += vs_references(rows, [key], [(name, ref) for name in order])
    return out


def vs_references(rows: List[Dict[str, Any]], keys: Sequence[str], pairs: Sequence[Tuple[str, str]]
                  ) -> List[Dict[str, Any]]:
    """Each ``(setting, reference)`` of ``pairs`` paired on the seeds both ran: the entries of
    :func:`paired_differences` for that setting, with ``reference`` added (a setting without rows has none)."""
    out = []
    for name, ref in pairs:
        mine = [r for r in rows if r["run"] in (name, ref)]
        out += [{**d, "reference": ref} for d in paired_differences(mine, keys, reference=ref) if d["run"] == name]
    return out


def vs_references_table(diffs: List[Dict[str, Any]], keys: Sequence[str]) -> str:
    """One row per (setting, reference) pair of :func:`vs_references`: the reference named in the row, then the
    paired Δ of each metric, [95 % t-interval] verdict (seeds)."""
    pairs = list(dict.fromkeys((d["run"], d["reference"]) for d in diffs if d["mean"] is not None))
    if not pairs:
        return ""
    head = ["setting", "against", *[f"Δ {_label(k)} (seeds)" for k in keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, ref in pairs:
        ds = {d["metric"]: d for d in diffs if (d["run"], d["reference"]) == (name, ref)}
        lines.append("| " + " | ".join([name, ref, *[_seeded_cell(ds.get(k)) for k in keys]]) + " |")
    return "\n".join(lines)


def vs_best_fixed_table(diffs: List[Dict[str, Any]], keys: Sequence[str]) -> str:
    """One row per learned setting: its paired Δ to the best fixed τ of each metric, [95 % t-interval] verdict."""
    if not diffs:
        return ""
    refs = {d["metric"]: d["reference"] for d in diffs}
    keys = [k for k in keys if k in refs]
    head = ["learned τ", *[f"Δ {_label(k)} vs {refs[k]} (seeds)" for k in keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in dict.fromkeys(d["run"] for d in diffs):
        ds = {d["metric"]: d for d in diffs if d["run"] == name}
        if all(d["mean"] is None for d in ds.values()):
            continue  # not evaluated yet
        cells = [_seeded_cell(ds.get(k)) for k in keys]  # seeds per cell: the references may differ in seeds
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def _seeded_cell(d: Optional[Dict[str, Any]]) -> str:
    """A paired difference with the seeds it is over: ``+0.24 [+0.13, +0.36] better (seeds 0,1,2)``, or for
    one common seed ``-0.56 (seed 0 only: no interval)``."""
    if d is None or d["mean"] is None:
        return "–"
    seeds = ",".join(map(str, d["seeds"]))
    if d["lo"] is None:
        return f"{d['mean']:+.2f} (seed {seeds} only: no interval)"
    return f"{_diff_cell(d)} (seeds {seeds})"


def primary_knn(keys: Sequence[str]) -> Optional[str]:
    """The kNN column a verdict reads first: k = 20 (the paper's protocol), else the first one."""
    return next((k for k in keys if knn_order(k)[1] == 20), keys[0] if keys else None)


def _label(key: str) -> str:
    return "linear probe" if key == LINEAR else knn_label(key)


def mode_verdicts(agg: List[Dict[str, Any]], diffs: List[Dict[str, Any]], keys: Sequence[str],
                  reference: str = REFERENCE) -> List[str]:
    """One line per setting: its mean ± std on each of ``keys`` and the paired difference to ``reference`` on
    the common seeds, mean [95 % t-interval] and the verdict (better / no evidence / worse)."""
    by_run = {a["run"]: a for a in agg}
    if reference not in by_run:
        return [f"no {reference} run in this study: no paired verdicts"]

    def figure(a: Dict[str, Any], k: str) -> str:
        return f"{_label(k)} {_fmt(a['mean'].get(k), a['std'].get(k))}"

    ref = by_run[reference]
    lines = [f"{reference} (the reference; seeds {','.join(map(str, ref['seeds'])) or 'none evaluated'}): "
             + "; ".join(figure(ref, k) for k in keys)]
    for a in agg:
        if a["run"] == reference:
            continue
        if not a["seeds"]:
            lines.append(f"{a['run']}: no seed evaluated yet")
            continue
        ds = {d["metric"]: d for d in diffs if d["run"] == a["run"]}
        parts = []
        for k in keys:
            d = ds.get(k)
            if d is None or d["mean"] is None:
                parts.append(f"{figure(a, k)}, no seed in common with {reference}")
            elif d["lo"] is None:
                parts.append(f"{figure(a, k)}, Δ {d['mean']:+.2f} (one common seed: no interval)")
            else:
                parts.append(f"{figure(a, k)}, Δ {d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] **{d['verdict']}**")
        common = next((d["seeds"] for d in ds.values()), [])
        seeds, paired = ",".join(map(str, a["seeds"])), ",".join(map(str, common)) or "–"
        lines.append(f"{a['run']} (seeds {seeds}; paired on {paired}): " + "; ".join(parts))
    return lines


def rankme_line(agg: List[Dict[str, Any]]) -> str:
    """Which setting RankMe (label-free: the highest mean final online RankMe over seeds) would have picked,
    and where that setting ranks by kNN k = 20 and by the linear probe (rank 1 = best; ties share a rank)."""
    finals = {a["run"]: a["mean"] for a in agg if a["seeds"]}
    metrics = [m for m in (primary_knn(knn_columns(list(finals.values()))), LINEAR) if m is not None]
    try:
        sel = select_by_rankme(finals, metrics)
    except ValueError:
        return f"RankMe: no evaluated setting logged {RANKME} (pretrain with eval.online_knn_every > 0)"
    n = sum(v is not None for v in sel.scores.values())
    parts = []
    for m in metrics:
        rank, best = sel.ranks[m], sel.best[m]
        if rank is None:
            parts.append(f"{_label(m)}: not evaluated")
        else:
            parts.append(f"rank {rank[0]} of {rank[1]} by {_label(m)} ({sel.values[m]:.2f}"
                         + ("" if rank[0] == 1 or best is None else f"; best: {best[0]} {best[1]:.2f}") + ")")
    return (f"RankMe (label-free: the highest mean final {RANKME} over seeds, among {n} settings) would pick "
            f"{sel.pick} (RankMe {sel.score:.2f}): " + ", ".join(parts))


def learned_ranking_line(agg: List[Dict[str, Any]], learned: Sequence[str],
                         chosen: Sequence[Optional[str]] = ()) -> Optional[str]:
    """The learned τ modes by mean kNN k = 20, and the two a next invocation would name with --best-learned
    and --second-learned (the ones that get DCL / MoCo v2 variants and the extra seeds)."""
    key = primary_knn(knn_columns([a["mean"] for a in agg]))
    ranked = sorted((a for a in agg if a["run"] in learned and key and a["mean"].get(key) is not None),
                    key=lambda a: -a["mean"][key])
    if not ranked:
        return None
    line = f"learned τ modes by mean {_label(key)}: " + ", ".join(f"{a['run']} {a['mean'][key]:.2f}" for a in ranked)
    if len(ranked) >= 2:
        line += f"; the best two: `--best-learned {ranked[0]['run']} --second-learned {ranked[1]['run']}`"
    if any(chosen):
        line += " (this report: " + ", ".join(f"--{flag} {c}" for flag, c in zip(("best-learned", "second-learned"),
                                                                                chosen) if c) + ")"
    return line


# (key in a row of ood_record, column header); AUROCs as measured: 0.5 = no signal, < 0.5 = the other way
OOD_FIGURES = (("auroc_tau", "AUROC τ: OOD"), ("auroc_knn_distance", "AUROC kNN dist: OOD"),
               ("auroc_tau_id_error", "AUROC τ: ID kNN errors"),
               ("auroc_knn_distance_id_error", "AUROC kNN dist: ID kNN errors"),
               ("train_auroc_tau_error", "AUROC τ: train kNN errors (LOO)"),
               ("train_auroc_knn_distance_error", "AUROC kNN dist: train kNN errors (LOO)"),
               ("knn_top1_id", "ID kNN top-1"))


def ood_record(payload: Dict[str, Any]) -> Dict[str, Any]:
    """The figures of one ``eval/ood.json`` (written by ``simclr-tau ood``) under the keys of OOD_FIGURES."""
    loo = payload.get("train_leave_one_out") or {}
    return {**{k: payload.get(k) for k, _ in OOD_FIGURES if not k.startswith("train_")},
            "train_auroc_tau_error": loo.get("auroc_tau_error"),
            "train_auroc_knn_distance_error": loo.get("auroc_knn_distance_error"),
            "tau_reason": payload.get("auroc_tau_reason"), "train_tau_reason": loo.get("auroc_tau_reason"),
            "ood_classes": payload.get("ood_classes"), "ood_class_names": payload.get("ood_class_names")}


def ood_aggregate(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows of the same setting (``{"run", "seed", **ood_record}``) merged over the seeds that have an ood.json;
    each entry keeps the reasons given for a missing τ."""
    out = []
    for name in dict.fromkeys(r["run"] for r in rows):
        group = [r for r in rows if r["run"] == name and r.get("knn_top1_id") is not None]
        agg = _merged(name, group, [k for k, _ in OOD_FIGURES])
        agg["reasons"] = sorted({r[k] for r in group for k in ("tau_reason", "train_tau_reason") if r.get(k)})
        out.append(agg)
    return out


def ood_table(agg: List[Dict[str, Any]], rows: List[Dict[str, Any]], pixels: Optional[Dict[str, Any]] = None) -> str:
    """The held-out-class table: per setting mean ± std over seeds of each AUROC (n/a where the run has no τ for
    those images, with the reason below), and the raw-pixel kNN distance when its ood.json exists."""
    held = next((r for r in rows if r.get("ood_classes")), None)
    head = ("Held out as out-of-distribution: classes "
            + (f"{held['ood_classes']} ({', '.join(held['ood_class_names'] or [])})" if held else "(no ood.json yet)")
            + "; score: larger = more OOD / uncertain; mean ± std over seeds.")
    cols = ["setting", "seeds", *[h for _, h in OOD_FIGURES]]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for a in agg:
        m, sd = a["mean"], a["std"]
        cells = [a["run"], ",".join(map(str, a["seeds"])) or "–"]
        for k, _ in OOD_FIGURES:
            digits = 2 if k == "knn_top1_id" else 3
            cells.append(_fmt(m[k], sd[k], digits) if m[k] is not None else "n/a" if a["seeds"] else "–")
        lines.append("| " + " | ".join(cells) + " |")
    if pixels is not None:
        cells = ["*raw pixels*", "–", *[_fmt(pixels.get(k), None, 2 if k == "knn_top1_id" else 3)
                                       if "knn" in k else "" for k, _ in OOD_FIGURES]]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {a['run']}, why τ is missing: {'; '.join(a['reasons'])}" for a in agg if a["reasons"]]
    return "\n".join(lines + ([""] + notes if notes else []))
