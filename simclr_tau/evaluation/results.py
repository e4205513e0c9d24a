"""Where evaluation results go: ``<out>/*.json`` (written atomically) and the run's ``summary.json`` (and its
W&B summary) through :class:`~simclr_tau.records.writer.RunRecord`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict

from simclr_tau.evaluation.targets import Target
from simclr_tau.fileio import atomic_write


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def write_json(path: Path, payload: Dict[str, Any]) -> Path:
    text = json.dumps(_json_safe(payload), indent=2, sort_keys=True)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def update_run_summary(t: Target, values: Dict[str, Any]) -> None:
    """Merge ``values`` into the run's summary.json (and its W&B run) with :class:`RunRecord`."""
    if t.run_dir is None or not values:
        return
    from simclr_tau.config import load_config
    from simclr_tau.records.writer import RunRecord

    path = t.run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    # the summary keeps the run's own config; only the W&B switch comes from this command's overrides
    record_cfg = load_config(t.run_dir / "config.yaml")
    record_cfg.wandb = t.cfg.wandb
    record = RunRecord(t.run_dir, record_cfg, summary.get("run_name") or t.run_dir.name, wandb_id=summary.get("wandb_id"))
    try:
        record.update_summary({k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    finally:
        record.close()
