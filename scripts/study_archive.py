"""A study's record that survives the machine: the small files of every finished run, mirrored into a folder
that is committed with the code (``reproduce_fmnist.py --archive``).

A study directory holds checkpoints and exported encoders (~10 MB a run) next to the few kilobytes the tables and
plots are built from. Only the latter are archived, under the same relative paths:

    <run>/config.yaml (and the configs a resume kept), <run>/metrics.jsonl, <run>/summary.json, <run>/eval/*.json,
    baselines/**/*.json, logs/<run>.log, logs/timings.jsonl

Restoring copies back every archived file that the study directory lacks (a file already there is newer: it is
kept), and merges ``logs/timings.jsonl`` line by line. A run restored this way has its evaluations but no encoder;
the study counts it finished (``reproduce_fmnist.pending_steps``), and ``--report-only`` rebuilds the tables and
plots from a fresh clone.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, List

RUN_PATTERNS = ("*.yaml", "metrics.jsonl", "summary.json", "eval/*.json")
BASELINE_PATTERNS = ("baselines/**/*.json",)
TIMINGS = Path("logs") / "timings.jsonl"


def run_files(out: Path, label: str) -> List[Path]:
    """The archived files of run ``label`` (its run directory and its log), relative to the study directory."""
    run = out / label
    found = [p for pat in RUN_PATTERNS for p in sorted(run.glob(pat)) if p.is_file()]
    log = out / "logs" / f"{label}.log"
    return [p.relative_to(out) for p in [*found, *([log] if log.is_file() else [])]]


def baseline_files(out: Path) -> List[Path]:
    return [p.relative_to(out) for pat in BASELINE_PATTERNS for p in sorted(out.glob(pat)) if p.is_file()]


def merge_lines(src: Path, dst: Path) -> int:
    """Append to ``dst`` the lines of ``src`` it does not hold yet (order kept); the number appended."""
    have = dst.read_text().splitlines() if dst.is_file() else []
    seen = set(have)
    new = [line for line in (src.read_text().splitlines() if src.is_file() else []) if line and line not in seen]
    if new:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "a") as f:
            f.write("".join(f"{line}\n" for line in new))
    return len(new)


def archive(out: Path, archive_dir: Path, labels: Iterable[str], baselines: bool = True) -> List[Path]:
    """Copy the small files of the runs ``labels`` (and the baselines' results) from ``out`` into ``archive_dir``,
    overwriting older copies; merge the step timings. Returns the relative paths copied."""
    rel = [f for label in labels for f in run_files(out, label)] + (baseline_files(out) if baselines else [])
    copied = []
    for f in rel:
        src, dst = out / f, archive_dir / f
        if dst.is_file() and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        copied.append(f)
    merge_lines(out / TIMINGS, archive_dir / TIMINGS)
    return copied


def restore(archive_dir: Path, out: Path) -> List[Path]:
    """Copy into ``out`` the archived runs it has no directory for (a run directory that exists is the study's own,
    perhaps mid-run: nothing is mixed into it), the baselines' and logs' files it lacks, and merge the step
    timings. Returns the relative paths restored."""
    if not archive_dir.is_dir():
        return []
    shared = ("logs", "baselines")  # restored file by file; a run directory: all or nothing
    runs = {d.name for d in archive_dir.iterdir() if d.is_dir() and d.name not in shared and not (out / d.name).exists()}
    restored = []
    for src in sorted(archive_dir.rglob("*")):
        f = src.relative_to(archive_dir)
        wanted = f.parts[0] in runs or (f.parts[0] in shared and f != TIMINGS and not (out / f).exists())
        if src.is_file() and wanted:
            (out / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out / f)
            restored.append(f)
    merge_lines(archive_dir / TIMINGS, out / TIMINGS)
    return restored
