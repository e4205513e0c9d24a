"""The run record's vocabulary, read by everything that looks at finished runs: :class:`RunData` (one run,
wherever it came from), loading a run directory (``config.yaml`` / ``metrics.jsonl`` / ``summary.json``, as
:mod:`simclr_tau.records.writer` writes them), and the names and labels of metrics.

A run's final value of a metric is its last logged value, overlaid by ``summary.json`` (evaluation results
such as ``knn/...``, ``linear/test_top1``, ``calib/ece_after``), as a W&B run summary is.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from simclr_tau.errors import UserError


@dataclass
class RunData:
    """One run, wherever it came from: flattened config, final metrics, logged rows (with step / epoch).
    A baseline (raw pixels, a random-init encoder: :mod:`simclr_tau.records.baselines`) names its kind in
    ``baseline``; a trained run leaves it empty."""

    name: str
    source: str
    config: Dict[str, Any]
    final: Dict[str, float]
    history: List[Dict[str, Any]] = field(default_factory=list)
    baseline: str = ""

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
    """Metric keys are namespaced (train/loss, knn/top1_k20_t0.07, ...) or come from the online evaluation,
    which logs its results under ``online_`` (online_knn/..., and ``online_rankme``, which has no ``/``);
    step, epochs, images are not metrics."""
    return ("/" in key or key.startswith("online_")) and not key.startswith("_")


def final_metrics(history: Sequence[Dict[str, Any]], summary: Dict[str, Any]) -> Dict[str, float]:
    final: Dict[str, float] = {}
    for row in history:
        final.update({k: v for k, v in ((k, _number(v)) for k, v in row.items()) if v is not None and is_metric(k)})
    final.update({k: v for k, v in ((k, _number(v)) for k, v in summary.items()) if v is not None and is_metric(k)})
    return final


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
        raise UserError(f"{p}: not a run directory (no metrics.jsonl or summary.json) nor raw-pixel results; give "
                        f"the directories that pretraining (or `simclr-tau knn pixels`) wrote under train.output_dir")
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


def expand_run_dirs(paths: Sequence[str], also: Callable[[Path], bool] = lambda p: False) -> List[Path]:
    """Run directories as given; a directory that holds runs (e.g. ``runs/``) stands for all of them (and for
    the directories ``also`` accepts, such as a raw-pixel baseline's)."""
    out: List[Path] = []
    for s in paths:
        p = Path(s)
        if p.is_dir() and not _is_run_dir(p) and not also(p):
            children = sorted(c for c in p.iterdir() if c.is_dir() and (_is_run_dir(c) or also(c)))
            if children:
                out += children
                continue
        out.append(p)
    return out


# The temperatures a run can log: pretraining's τ, distillation's student / teacher τ (SEED) and KD's T.
TAU_KEYS = (("train/tau", "τ"), ("train/tau_s", "student τ"), ("train/tau_t", "teacher τ"), ("train/T", "KD T"))


def tau_keys(r: RunData) -> List[tuple]:
    """(key, label) of each temperature of :data:`TAU_KEYS` that ``r`` logged, scalar (``key``) or per-sample
    (``key_mean`` ...)."""
    logged = set(r.final) | {k for row in r.history for k in row}
    return [(k, lab) for k, lab in TAU_KEYS if k in logged or f"{k}_mean" in logged or f"{k}_p50" in logged]


def final_tau(r: RunData, key: Optional[str] = None) -> Optional[float]:
    """Final value of the temperature ``key`` (default: the first the run logged), the batch mean of a
    per-sample one."""
    for k in [key] if key else [k for k, _ in tau_keys(r)] or ["train/tau"]:
        v = r.final.get(k, r.final.get(f"{k}_mean"))
        if v is not None:
            return v
    return None


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
