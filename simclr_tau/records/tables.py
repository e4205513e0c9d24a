"""The comparison's tables: final metrics (one row per run) and the config keys that differ."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from simclr_tau.errors import UserError
from simclr_tau.records.run_data import RunData, final_tau, knn_keys, knn_label, tau_keys

# Config keys that differ between any two runs without saying anything about them.
NOT_A_DIFFERENCE = ("train.run_name", "train.output_dir", "train.progress")
NOT_A_DIFFERENCE_PREFIXES = ("wandb.", "_")
MISSING = "—"
TABLE_NOTE = ("accuracies in %; ECE in % (as `simclr-tau linear` prints it); ★ / bold: the best run of a metric "
              "column; baseline rows (raw pixels, random init; same evaluators) are not ranked; "
              "final τ of a per-sample τ: batch mean (min–max); — : not logged / not evaluated")
BASELINE = "baseline"  # the method column of a baseline row
BEST = " ★"
# The setup a comparison states in its header: flattened config key -> label.
SETUP_KEYS = (("data.name", "dataset"), ("model.backbone", "backbone"), ("train.method", "method"),
              ("train.epochs", "epochs"), ("train.batch_size", "batch"), ("train.seed", "seed"))


def unique_names(runs: List[RunData]) -> None:
    seen: Dict[str, int] = {}
    for r in runs:
        n = seen.get(r.name, 0)
        seen[r.name] = n + 1
        if n:
            r.name = f"{r.name} #{n + 1}"


def check_comparable(runs: Sequence[RunData]) -> None:
    """At least one metric every run has; otherwise a one-line UserError naming what each run has."""
    for r in runs:
        if not r.final:
            raise UserError(f"run {r.name} ({r.source}) has no metrics yet (empty metrics.jsonl and summary.json)")
    common = set.intersection(*(set(r.final) for r in runs))
    if not common:
        have = "; ".join(f"{r.name}: {', '.join(sorted(r.final)[:4])}{', ...' if len(r.final) > 4 else ''}" for r in runs)
        raise UserError(f"the runs have no metric in common ({have}); compare runs of the same kind")


@dataclass
class Column:
    header: str
    value: Callable[[RunData], Any]
    text: Optional[Callable[[RunData], str]] = None  # default: format value
    best: Optional[str] = None  # "max" / "min": the best run of this column is marked


def _percent(v: Any) -> Any:
    return None if v is None else 100.0 * v


def setup(runs: Sequence[RunData]) -> tuple[Dict[str, Any], List[str]]:
    """(label -> value the runs share, labels of the setup keys whose values differ) over :data:`SETUP_KEYS`."""
    shared: Dict[str, Any] = {}
    differ: List[str] = []
    for key, label in SETUP_KEYS:
        vals = {json.dumps(r.config.get(key), default=str) for r in runs}
        if len(vals) == 1:
            if runs and runs[0].config.get(key) is not None:
                shared[label] = runs[0].config[key]
        else:
            differ.append(label)
    return shared, differ


def mixed_datasets_warning(runs: Sequence[RunData]) -> Optional[str]:
    """A warning when the runs were trained on different datasets (their numbers are not comparable)."""
    names = sorted({str(r.config.get("data.name")) for r in runs if r.config.get("data.name") is not None})
    if len(names) > 1:
        return f"runs of different datasets are mixed ({', '.join(names)}): their accuracies are not comparable"
    return None


def fmt(v: Any) -> str:
    if v is None:
        return MISSING
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _tau_mode(r: RunData) -> str:
    mode = r.config.get("temperature.mode")
    if mode == "scheduled" and r.config.get("temperature.schedule.kind"):
        return f"scheduled ({r.config['temperature.schedule.kind']})"
    return str(mode) if mode is not None else MISSING


def _one_tau_text(r: RunData, key: str) -> str:
    if key not in r.final and f"{key}_mean" in r.final:  # per-sample τ: mean (min–max)
        lo, hi = r.final.get(f"{key}_min"), r.final.get(f"{key}_max")
        return f"{fmt(r.final[f'{key}_mean'])} ({fmt(lo)}–{fmt(hi)})"
    return fmt(final_tau(r, key))


def _tau_text(r: RunData) -> str:
    """Pretraining's τ as a number; distillation's temperatures each with its name (student τ 0.1, ...)."""
    keys = tau_keys(r)
    if not keys:
        return MISSING
    if [k for k, _ in keys] == ["train/tau"]:
        return _one_tau_text(r, "train/tau")
    return ", ".join(f"{label} {_one_tau_text(r, k)}" for k, label in keys)


def metric_columns(runs: Sequence[RunData], extra: Sequence[str] = ()) -> List[Column]:
    cols = [
        Column("run", lambda r: r.name),
        Column("method", lambda r: f"{BASELINE}: {r.baseline}" if r.baseline else r.config.get("train.method", MISSING)),
        Column("τ mode", lambda r: MISSING if r.baseline else _tau_mode(r)),
        Column("final loss", lambda r: r.final.get("final/train_loss", r.final.get("train/loss"))),
        Column("final τ", final_tau, _tau_text),
    ]
    cols += [Column(knn_label(k) + " top-1", lambda r, k=k: r.final.get(k), best="max") for k in knn_keys(runs)]
    cols += [
        Column("linear top-1", lambda r: r.final.get("linear/test_top1"), best="max"),
        Column("ECE before (%)", lambda r: _percent(r.final.get("calib/ece_before")), best="min"),
        Column("ECE after (%)", lambda r: _percent(r.final.get("calib/ece_after")), best="min"),
    ]
    cols += [Column(k, lambda r, k=k: r.final.get(k)) for k in extra]
    return cols


def metric_table(runs: Sequence[RunData], extra: Sequence[str] = ()) -> tuple[List[str], List[List[Any]], List[List[str]]]:
    """(headers, raw rows, text rows) of the final-metrics table, one row per run (baselines too: marked in the
    method column, never the best of a column)."""
    cols = metric_columns(runs, extra)
    raw = [[c.value(r) for c in cols] for r in runs]
    text = [[(c.text(r) if c.text else fmt(v)) for c, v in zip(cols, row)] for r, row in zip(runs, raw)]
    ranked = [i for i, r in enumerate(runs) if not r.baseline]
    for j, c in enumerate(cols):
        vals = [raw[i][j] for i in ranked if isinstance(raw[i][j], (int, float)) and math.isfinite(raw[i][j])]
        if c.best and len(ranked) > 1 and vals:
            target = max(vals) if c.best == "max" else min(vals)
            for i in ranked:
                if raw[i][j] == target:
                    text[i][j] += BEST
    return [c.header for c in cols], raw, text


def config_diff(runs: Sequence[RunData]) -> Dict[str, List[Any]]:
    """Flattened config keys whose values differ between the runs: key -> one value per run (MISSING if absent)."""
    keys = sorted({k for r in runs for k in r.config})
    out: Dict[str, List[Any]] = {}
    for k in keys:
        if k in NOT_A_DIFFERENCE or k.startswith(NOT_A_DIFFERENCE_PREFIXES):
            continue
        vals = [r.config.get(k, MISSING) for r in runs]
        if len({json.dumps(v, sort_keys=True, default=str) for v in vals}) > 1:
            out[k] = vals
    return out


def render_text(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def diff_rows(runs: Sequence[RunData], diff: Dict[str, List[Any]]) -> tuple[List[str], List[List[str]]]:
    return ["config key", *(r.name for r in runs)], [[k, *(fmt(v) for v in vals)] for k, vals in diff.items()]
