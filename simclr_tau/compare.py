"""``simclr-tau compare``: which τ works, side by side.

    simclr-tau compare RUN_DIR ... [--out DIR] [--metric KEY ...]
    simclr-tau compare --wandb ENTITY/PROJECT [--filter KEY=VALUE ...] [--out DIR] [--metric KEY ...]

Local runs are read from the project's own record (``config.yaml`` / ``metrics.jsonl`` / ``summary.json``;
wandb's offline files cannot be read from Python); W&B runs through the public API
(:mod:`simclr_tau.wandb_api`). Both become :class:`RunData`, and then the same output:

1. a table of final metrics, one row per run (printed, ``final_metrics.csv``);
2. the flattened config keys whose values differ between the runs, one column per run (``config_diff.csv``);
3. PNGs (:mod:`simclr_tau.plots`): kNN top-1 vs epoch (online kNN rows), loss vs step, τ vs step,
   bars of the final kNN / linear / ECE (+ ``--metric`` keys);
4. ``report.html``: the tables and the PNGs (embedded as data URIs) in one self-contained file.

A run's final value of a metric is its last logged value, overlaid by ``summary.json`` (evaluation results
such as ``knn/...``, ``linear/test_top1``, ``calib/ece_after``), as a W&B run summary is.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from simclr_tau.errors import UserError, exit_on_user_error

# Config keys that differ between any two runs without saying anything about them.
NOT_A_DIFFERENCE = ("train.run_name", "train.output_dir", "train.progress")
NOT_A_DIFFERENCE_PREFIXES = ("wandb.", "_")
MISSING = "—"
TABLE_NOTE = ("accuracies in %; ECE as a fraction (0-1); final τ of a per-sample τ: batch mean (min–max); "
              "— : not logged / not evaluated")


@dataclass
class RunData:
    """One run, wherever it came from: flattened config, final metrics, logged rows (with step / epoch)."""

    name: str
    source: str
    config: Dict[str, Any]
    final: Dict[str, float]
    history: List[Dict[str, Any]] = field(default_factory=list)

    def series(self, key: str, x: str = "step") -> tuple[list, list]:
        """(xs, ys) of every logged row that has ``key`` (finite values only), in logging order."""
        xs, ys = [], []
        for row in self.history:
            v, xv = _number(row.get(key)), _number(row.get(x))
            if v is not None and xv is not None and math.isfinite(v):
                xs.append(xv)
                ys.append(v)
        return xs, ys


def _number(v: Any) -> Optional[float]:
    """A metric value as float: numbers, and the 'nan'/'inf' strings RunRecord writes for non-finite ones."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf"):
        return float(v)
    return None


def is_metric(key: str) -> bool:
    """Metric keys are namespaced (train/loss, knn/top1_k20_t0.07, ...); step, epochs, images are not."""
    return "/" in key and not key.startswith("_")


def final_metrics(history: Sequence[Dict[str, Any]], summary: Dict[str, Any]) -> Dict[str, float]:
    final: Dict[str, float] = {}
    for row in history:
        final.update({k: v for k, v in ((k, _number(v)) for k, v in row.items()) if v is not None and is_metric(k)})
    final.update({k: v for k, v in ((k, _number(v)) for k, v in summary.items()) if v is not None and is_metric(k)})
    return final


# ---- local run directories ---------------------------------------------------------------------------

def _is_run_dir(p: Path) -> bool:
    return (p / "metrics.jsonl").is_file() or (p / "summary.json").is_file()


def _read_metrics(path: Path) -> List[Dict[str, Any]]:
    rows, bad = [], 0
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += i < len(lines) - 1  # a torn last line is what a killed run leaves: not worth a warning
            continue
        if isinstance(row, dict):
            rows.append(row)
    if bad:
        print(f"warning: {path}: skipped {bad} unreadable line(s)", file=sys.stderr)
    return rows


def load_run_dir(path: str | Path) -> RunData:
    """Read a run directory written by pretraining (and evaluation). UserError if it is not one."""
    from simclr_tau.config import flatten

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such run directory")
    if not p.is_dir() or not _is_run_dir(p):
        raise UserError(f"{p}: not a run directory (no metrics.jsonl or summary.json); give the directories "
                        f"that pretraining wrote under train.output_dir")
    summary: Dict[str, Any] = {}
    if (p / "summary.json").is_file():
        try:
            summary = json.loads((p / "summary.json").read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{p / 'summary.json'}: invalid JSON ({e}); restore it or remove it") from None
        if not isinstance(summary, dict):
            raise UserError(f"{p / 'summary.json'}: expected a JSON object")
    history = _read_metrics(p / "metrics.jsonl") if (p / "metrics.jsonl").is_file() else []
    config = summary.get("config")
    if not isinstance(config, dict) and (p / "config.yaml").is_file():
        import yaml

        try:
            config = flatten(yaml.safe_load((p / "config.yaml").read_text()) or {})
        except yaml.YAMLError:
            config = None
    return RunData(name=str(summary.get("run_name") or p.name), source=str(p), config=dict(config or {}),
                   final=final_metrics(history, summary), history=history)


def expand_run_dirs(paths: Sequence[str]) -> List[Path]:
    """Run directories as given; a directory that holds runs (e.g. ``runs/``) stands for all of them."""
    out: List[Path] = []
    for s in paths:
        p = Path(s)
        if p.is_dir() and not _is_run_dir(p):
            children = sorted(c for c in p.iterdir() if c.is_dir() and _is_run_dir(c))
            if children:
                out += children
                continue
        out.append(p)
    return out


def _unique_names(runs: List[RunData]) -> None:
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


# ---- tables ------------------------------------------------------------------------------------------

@dataclass
class Column:
    header: str
    value: Callable[[RunData], Any]
    text: Optional[Callable[[RunData], str]] = None  # default: format value


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


def final_tau(r: RunData) -> Optional[float]:
    return r.final.get("train/tau", r.final.get("train/tau_mean"))


def _tau_text(r: RunData) -> str:
    if "train/tau" not in r.final and "train/tau_mean" in r.final:  # per-sample τ: mean (min–max)
        lo, hi = r.final.get("train/tau_min"), r.final.get("train/tau_max")
        return f"{fmt(r.final['train/tau_mean'])} ({fmt(lo)}–{fmt(hi)})"
    return fmt(final_tau(r))


_KNN_KEY = re.compile(r"^(online_)?knn/top1_k(\d+)_(?:t([0-9.eE+-]+)|(vote))$")


def knn_order(key: str) -> tuple:
    """Sort key of a kNN metric name: by k, then T (vote last)."""
    m = _KNN_KEY.match(key)
    if not m:
        return (math.inf, math.inf, math.inf, key)
    return (1 if m.group(1) else 0, int(m.group(2)), float(m.group(3)) if m.group(3) else math.inf, key)


def knn_keys(runs: Sequence[RunData]) -> List[str]:
    """knn/top1_k<k>_t<T> (and _vote) keys of any run's final metrics, sorted by k then T."""
    return sorted({k for r in runs for k in r.final if k.startswith(("knn/top1_", "online_knn/top1_"))}, key=knn_order)


def knn_label(key: str) -> str:
    """knn/top1_k20_t0.07 -> 'kNN k=20 T=0.07' (k20_vote -> 'kNN k=20 vote'; online_knn/... -> 'online kNN ...')."""
    m = _KNN_KEY.match(key)
    if not m:
        return key
    return ("online " if m.group(1) else "") + f"kNN k={m.group(2)} " + (f"T={m.group(3)}" if m.group(3) else "vote")


def metric_columns(runs: Sequence[RunData], extra: Sequence[str] = ()) -> List[Column]:
    cols = [
        Column("run", lambda r: r.name),
        Column("method", lambda r: r.config.get("train.method", MISSING)),
        Column("τ mode", _tau_mode),
        Column("final loss", lambda r: r.final.get("final/train_loss", r.final.get("train/loss"))),
        Column("final τ", final_tau, _tau_text),
    ]
    cols += [Column(knn_label(k) + " top-1", lambda r, k=k: r.final.get(k)) for k in knn_keys(runs)]
    cols += [
        Column("linear top-1", lambda r: r.final.get("linear/test_top1")),
        Column("ECE before", lambda r: r.final.get("calib/ece_before")),
        Column("ECE after", lambda r: r.final.get("calib/ece_after")),
    ]
    cols += [Column(k, lambda r, k=k: r.final.get(k)) for k in extra]
    return cols


def metric_table(runs: Sequence[RunData], extra: Sequence[str] = ()) -> tuple[List[str], List[List[Any]], List[List[str]]]:
    """(headers, raw rows, text rows) of the final-metrics table, one row per run."""
    cols = metric_columns(runs, extra)
    raw = [[c.value(r) for c in cols] for r in runs]
    text = [[(c.text(r) if c.text else fmt(v)) for c, v in zip(cols, row)] for r, row in zip(runs, raw)]
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


def _diff_rows(runs: Sequence[RunData], diff: Dict[str, List[Any]]) -> tuple[List[str], List[List[str]]]:
    return ["config key", *(r.name for r in runs)], [[k, *(fmt(v) for v in vals)] for k, vals in diff.items()]


# ---- report ------------------------------------------------------------------------------------------

def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(path: Path, runs: Sequence[RunData], table: tuple, diff_table: tuple, images: Sequence[tuple],
               notes: Sequence[str]) -> Path:
    style = ("body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:13px}th{background:#f3f3f3}"
             "img{max-width:100%;border:1px solid #eee;margin:0.5em 0}")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>simclr-tau comparison</title>"
             f"<style>{style}</style></head><body><h1>simclr-tau run comparison</h1>",
             f"<p>{len(runs)} runs, generated {html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
             _html_table(["run", "source"], [[r.name, r.source] for r in runs]),
             "<h2>Final metrics</h2>", _html_table(*table), f"<p><small>{html.escape(TABLE_NOTE)}</small></p>",
             "<h2>Config differences</h2>",
             _html_table(*diff_table) if diff_table[1] else "<p>identical configs (apart from run names)</p>",
             "<h2>Plots</h2>"]
    for title, png in images:
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        parts.append(f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(headers)
        w.writerows([["" if v is None else v for v in r] for r in rows])


@dataclass
class Comparison:
    runs: List[RunData]
    headers: List[str]
    raw: List[List[Any]]
    text: List[List[str]]
    diff: Dict[str, List[Any]]
    images: List[tuple]
    notes: List[str]
    html: Optional[Path]


def compare(runs: List[RunData], out: Optional[Path] = None, extra: Sequence[str] = (), plots: bool = True,
            echo: bool = True) -> Comparison:
    """Tables, plots and the HTML report for ``runs`` (see the module docstring)."""
    if not runs:
        raise UserError("nothing to compare: give run directories or --wandb ENTITY/PROJECT")
    _unique_names(runs)
    check_comparable(runs)
    for k in extra:
        if not any(k in r.final or r.series(k)[0] for r in runs):
            known = sorted({m for r in runs for m in r.final})
            raise UserError(f"--metric {k}: no run has it; known metrics: {', '.join(known[:20])}")
    headers, raw, text = metric_table(runs, extra)
    diff = config_diff(runs)
    diff_table = _diff_rows(runs, diff)
    images: List[tuple] = []
    notes: List[str] = []
    html_path = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "final_metrics.csv", headers, raw)
        _write_csv(out / "config_diff.csv", *_diff_rows(runs, diff))
        if plots:
            from simclr_tau.plots import plot_all

            images, notes = plot_all(runs, out, extra)
        html_path = write_html(out / "report.html", runs, (headers, text), diff_table, images, notes)
    if echo:
        print("final metrics")
        print(render_text(headers, text))
        print(f"({TABLE_NOTE})\n")
        if diff:
            print("config differences")
            print(render_text(*diff_table))
        else:
            print("config differences: none (apart from run names)")
        for n in notes:
            print(f"note: {n}")
        if out is not None:
            print(f"\nwrote {', '.join(str(p) for _, p in images)}" if images else "")
            print(f"wrote {html_path}", flush=True)
    return Comparison(runs, headers, raw, text, diff, images, notes, html_path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simclr-tau compare",
                                description="Compare runs: final metrics, config differences, plots, an HTML report.")
    p.add_argument("runs", nargs="*", help="run directories (a directory holding runs, e.g. runs/, means all of them)")
    p.add_argument("--out", default="compare", help="output directory for PNGs, CSVs and report.html (default: ./compare)")
    p.add_argument("--metric", action="append", default=[], metavar="KEY",
                   help="also tabulate and plot this metric, e.g. diag/alignment (repeatable)")
    p.add_argument("--wandb", default=None, metavar="ENTITY/PROJECT", help="compare the runs of a W&B project (public API)")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="with --wandb: keep runs whose config KEY (e.g. temperature.mode), tags, group, state ... "
                        "equals VALUE (repeatable, all must hold)")
    p.add_argument("--no-plots", action="store_true", help="tables and HTML only")
    return p


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> Comparison:
    args = build_parser().parse_args(argv)
    if args.filter and not args.wandb:
        raise UserError("--filter applies to --wandb ENTITY/PROJECT runs; local runs are chosen by their directories")
    if not args.runs and not args.wandb:
        raise UserError("nothing to compare: give run directories or --wandb ENTITY/PROJECT")
    runs = [load_run_dir(p) for p in expand_run_dirs(args.runs)]
    if args.wandb:
        from simclr_tau.wandb_api import load_wandb_runs

        runs += load_wandb_runs(args.wandb, args.filter, args.metric)
    return compare(runs, Path(args.out), args.metric, plots=not args.no_plots)


if __name__ == "__main__":
    main(sys.argv[1:])
