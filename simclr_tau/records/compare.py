"""``simclr-tau compare``: which τ works, side by side.

    simclr-tau compare RUN_DIR ... [PIXELS_DIR ...] [--out DIR] [--metric KEY ...] [--no-baselines]
    simclr-tau compare --wandb ENTITY/PROJECT [--filter KEY=VALUE ...] [--out DIR] [--metric KEY ...]

Local runs are read from the project's own record (``config.yaml`` / ``metrics.jsonl`` / ``summary.json``;
wandb's offline files cannot be read from Python); W&B runs through the public API
(:mod:`simclr_tau.records.wandb_reader`). Both become :class:`RunData`, and then the same output:

1. a header: the setup the runs share and the keys that differ, a warning when they mix datasets;
2. a table of final metrics, one row per run (printed, ``final_metrics.csv``), the best of each column marked,
   then the baselines (:mod:`~simclr_tau.records.baselines`: raw-pixel directories given or found among the runs,
   the random-init results the runs' summaries hold) as marked rows;
3. the flattened config keys whose values differ between the runs, one column per run (``config_diff.csv``);
4. PNGs (:mod:`simclr_tau.records.plots`): kNN top-1 vs epoch (online kNN rows), loss vs step, τ vs step,
   the final kNN / linear / ECE of every run and baseline (+ ``--metric`` keys);
5. ``report.html``: all of it, the PNGs embedded as data URIs, in one self-contained file.

This module only orchestrates: the vocabulary is :mod:`~simclr_tau.records.run_data`, the tables
:mod:`~simclr_tau.records.tables`, the figures :mod:`~simclr_tau.records.plots`, the files
:mod:`~simclr_tau.records.report`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from simclr_tau.errors import UserError, exit_on_user_error
from simclr_tau.fileio import check_writable_dir
from simclr_tau.records.baselines import is_pixels_dir, load_pixels_dir, random_init_rows
from simclr_tau.records.plots import plot_all
from simclr_tau.records.report import write_csv, write_html
from simclr_tau.records.run_data import RunData, expand_run_dirs, load_run_dir
from simclr_tau.records.tables import (TABLE_NOTE, check_comparable, config_diff, diff_rows, metric_table,
                                      mixed_datasets_warning, render_text, setup, unique_names, SETUP_KEYS)


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
            echo: bool = True, baselines: bool = True) -> Comparison:
    """Tables, plots and the HTML report for ``runs`` (see the module docstring). Baseline rows among ``runs``
    and the random-init results the runs hold are added after the runs, unless ``baselines`` is False."""
    trained = [r for r in runs if not r.baseline]
    if not trained:
        raise UserError("nothing to compare: give run directories or --wandb ENTITY/PROJECT"
                        + (" (baselines alone are not a comparison)" if runs else ""))
    rows = trained + ([r for r in runs if r.baseline] + random_init_rows(trained) if baselines else [])
    unique_names(rows)
    check_comparable(trained)
    for k in extra:
        if not any(k in r.final or r.series(k)[0] for r in rows):
            known = sorted({m for r in rows for m in r.final})
            raise UserError(f"--metric {k}: no run has it; known metrics: {', '.join(known[:20])}")
    headers, raw, text = metric_table(rows, extra)
    diff = config_diff(trained)  # the setup and differences are the runs'; a baseline has no training config
    diff_table = diff_rows(trained, diff)
    shared, differ = setup(trained)
    warning = mixed_datasets_warning(rows)
    images: List[tuple] = []
    notes: List[str] = []
    html_path = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "final_metrics.csv", headers, raw)
        write_csv(out / "config_diff.csv", *diff_table)
        if plots:
            images, notes = plot_all(rows, out, extra)
        html_path = write_html(out / "report.html", rows, (headers, text), diff_table, images, notes,
                               setup_line(shared, differ, diff), warning)
    if echo:
        if warning:
            print(f"warning: {warning}")
        print(setup_line(shared, differ, diff) + "\n")
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
    return Comparison(rows, headers, raw, text, diff, images, notes, html_path)


def setup_line(shared: Dict[str, Any], differ: Sequence[str], diff: Dict[str, List[Any]]) -> str:
    """One sentence of the setup the runs share and the config keys that differ between them."""
    same = ", ".join(f"{k} {v}" for k, v in shared.items()) or "nothing in common"
    keys = list(dict.fromkeys([*differ, *(k for k in diff if k not in dict(SETUP_KEYS))]))
    return f"setup: {same}; differing: {', '.join(keys) if keys else 'nothing'}"


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
    p.add_argument("--no-baselines", action="store_true",
                   help="leave out the baseline rows (raw-pixel results given or found among the runs, the random-init "
                        "results of `simclr-tau knn RUN --random-init` in the runs' summaries)")
    return p


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> Comparison:
    args = build_parser().parse_args(argv)
    if args.filter and not args.wandb:
        raise UserError("--filter applies to --wandb ENTITY/PROJECT runs; local runs are chosen by their directories")
    if not args.runs and not args.wandb:
        raise UserError("nothing to compare: give run directories or --wandb ENTITY/PROJECT")
    check_writable_dir(args.out, "--out")
    runs = [load_pixels_dir(p) if is_pixels_dir(p) else load_run_dir(p) for p in expand_run_dirs(args.runs, is_pixels_dir)]
    if args.wandb:
        from simclr_tau.records.wandb_reader import load_wandb_runs

        runs += load_wandb_runs(args.wandb, args.filter, args.metric)
    return compare(runs, Path(args.out), args.metric, plots=not args.no_plots, baselines=not args.no_baselines)


if __name__ == "__main__":
    main(sys.argv[1:])
