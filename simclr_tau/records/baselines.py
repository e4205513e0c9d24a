"""Baselines as rows of a comparison: the raw pixels and the random-init encoder, scored by the same evaluators
as the runs, so that a table says what pretraining bought.

Where the evaluators leave them:

- **raw pixels**: ``simclr-tau knn pixels --config C`` (and ``linear pixels``) write ``knn.json`` /
  ``linear.json`` (``"kind": "pixels"``) into ``<train.output_dir>/pixels-<dataset>/eval/``, or into ``--out DIR``.
  Such a directory (or its ``eval/``) is given to ``simclr-tau compare`` like a run directory, and a directory of
  runs (``runs/``) includes it: one row per dataset.
- **random init**: ``simclr-tau knn RUN --random-init`` (and ``linear``) merge ``knn_random_init/...``,
  ``linear_random_init/...``, ``calib_random_init/...``, ``diag_random_init/...`` into the run's ``summary.json``
  (and its W&B summary). Every compared run that holds them gives a row under the runs' metric names; runs of one
  architecture and dataset with the same numbers (a seeded init: the usual case) give one row between them.

A baseline row has :attr:`RunData.baseline` set; it is shown, marked, and never ranked as the best of a column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from simclr_tau.errors import UserError
from simclr_tau.records.run_data import RunData, final_metrics

PIXELS = "raw pixels"
RANDOM_INIT = "random init"
PIXEL_FILES = ("knn.json", "linear.json")
# summary.json prefixes of the random-init results -> the runs' own metric names
RANDOM_INIT_PREFIXES = {"knn_random_init/": "knn/", "linear_random_init/": "linear/", "calib_random_init/": "calib/",
                        "diag_random_init/": "diag/"}


def _pixel_files(p: Path) -> List[Path]:
    """The raw-pixel result files of ``p`` or ``p/eval``: knn.json / linear.json whose ``kind`` is pixels."""
    for d in (p, p / "eval"):
        found = [d / n for n in PIXEL_FILES if (d / n).is_file() and _kind(d / n) == "pixels"]
        if found:
            return found
    return []


def _kind(path: Path) -> Optional[str]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return payload.get("kind") if isinstance(payload, dict) else None


def is_pixels_dir(p: Path) -> bool:
    """Whether ``p`` holds raw-pixel evaluation results (see the module docstring)."""
    return p.is_dir() and bool(_pixel_files(p))


def load_pixels_dir(path: str | Path) -> RunData:
    """The raw-pixel baseline of a directory written by ``simclr-tau knn|linear pixels`` as a baseline row."""
    p = Path(path)
    files = _pixel_files(p)
    if not files:
        raise UserError(f"{p}: no raw-pixel results (knn.json / linear.json of `simclr-tau knn pixels`)")
    metrics: Dict[str, Any] = {}
    dataset: Dict[str, Any] = {}
    for f in files:
        try:
            payload = json.loads(f.read_text())
        except ValueError as e:
            raise UserError(f"{f}: invalid JSON ({e}); rerun the evaluation") from None
        metrics.update(payload.get("metrics") or {})
        diag = payload.get("diagnostics") or {}
        metrics.update({f"diag/{k}": diag[k] for k in ("alignment", "uniformity") if k in diag})
        dataset = payload.get("dataset") or dataset
    config = {f"data.{k}": dataset[k] for k in ("name", "root") if k in dataset}
    name = f"{PIXELS} ({dataset['name']})" if "name" in dataset else PIXELS
    return RunData(name=name, source=str(p), config=config, final=final_metrics([], metrics), baseline=PIXELS)


def _architecture(r: RunData) -> str:
    """What a random init depends on: the model section and the data's name, size and channels."""
    keys = sorted(k for k in r.config if k.startswith("model.") or k in ("data.name", "data.image_size", "data.channels"))
    return json.dumps({k: r.config[k] for k in keys}, sort_keys=True, default=str)


def random_init_rows(runs: Sequence[RunData]) -> List[RunData]:
    """One baseline row per distinct random-init result held by ``runs`` (see the module docstring)."""
    out: List[RunData] = []
    seen = set()
    for r in runs:
        final = {new + k[len(old):]: v for k, v in r.final.items()
                 for old, new in RANDOM_INIT_PREFIXES.items() if k.startswith(old)}
        if not final:
            continue
        identity = (_architecture(r), json.dumps(final, sort_keys=True))
        if identity in seen:
            continue
        seen.add(identity)
        backbone = r.config.get("model.backbone")
        config = {k: v for k, v in r.config.items() if k.startswith(("model.", "data."))}
        out.append(RunData(name=f"{RANDOM_INIT} ({backbone})" if backbone else RANDOM_INIT,
                           source=f"{r.source} (its random-init results)", config=config, final=final,
                           baseline=RANDOM_INIT))
    return out
