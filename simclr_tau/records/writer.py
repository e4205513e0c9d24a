"""Run records and the Weights & Biases mirror.

The run directory holds the project's own record, readable by any later tool (``simclr-tau compare``):

- ``config.yaml``: the resolved config;
- ``metrics.jsonl``: one JSON object per logged step/epoch, with ``step`` and ``epoch``;
- ``summary.json``: final metrics, the run name and the flattened config.

W&B is a mirror of the same data. wandb's offline files (``run-*.wandb``) cannot be read back from Python,
so the local record is the source of truth. ``wandb.mode=auto`` runs online when an API key is configured
and offline otherwise. Any W&B failure (no network, bad host, bad key) is reported once as a warning and
never stops training: an online run whose ``wandb.init`` fails (within ``$SIMCLR_TAU_WANDB_INIT_TIMEOUT``
seconds) goes on in W&B offline mode, to be uploaded later with ``wandb sync``; if even that fails, the
local record alone is kept.

Naming convention (:func:`run_tags`): run name ``<method>-<tau mode>-<dataset>-<backbone>-<time>`` (unless
``train.run_name``), W&B group ``<dataset>-<backbone>`` (unless ``wandb.group``), job type ``<method>``, tags
``method:…``, ``tau_mode:…``, ``dataset:…``, ``backbone:…`` (+ ``tau_schedule:…`` for a scheduled τ) and
``wandb.tags``. The config goes to W&B nested: W&B shows it flattened as ``temperature.mode`` etc., and, unlike
literal dotted keys, nested keys can be filtered server-side (``{"config.temperature.mode": "fixed"}``).
``summary.json`` holds, like a W&B run summary, the last logged value of every metric, overlaid by the
evaluation results. See docs/TRACKING.md.

W&B is driven through ``wandb`` directly rather than Accelerate's ``WandBTracker`` (a thin wrapper over
the same ``wandb.init``/``log``): we need resume-by-id, ``define_metric`` and failure isolation, which the
wrapper does not expose; like Accelerate, only the main process talks to W&B.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from simclr_tau.config import flatten
from simclr_tau.fileio import atomic_write

# Seconds wandb.init may wait for the server before the run goes on with the local record only.
INIT_TIMEOUT_ENV = "SIMCLR_TAU_WANDB_INIT_TIMEOUT"


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact visible
    return v


def wandb_mode(requested: str) -> str:
    """Resolve ``wandb.mode``: auto -> online with an API key (env or netrc), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if netrc.is_file() and "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


def run_tags(cfg: Any) -> Dict[str, Any]:
    """The naming / grouping convention shared by run names, W&B groups and tags."""
    tags = {
        "method": cfg.train.method,
        "tau_mode": cfg.temperature.mode,
        "dataset": cfg.data.name,
        "backbone": cfg.model.backbone,
    }
    if cfg.temperature.mode == "scheduled":  # "scheduled" alone does not say cosine from linear
        tags["tau_schedule"] = cfg.temperature.schedule.kind
    return tags


def _init_timeout() -> float:
    try:
        return float(os.environ.get(INIT_TIMEOUT_ENV, 30))
    except ValueError:
        return 30.0


def _nested_config(cfg: Any) -> Dict[str, Any]:
    if isinstance(cfg, dict):
        return dict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


class RunRecord:
    """Writes metrics.jsonl / summary.json (main process only) and mirrors them to W&B when enabled."""

    def __init__(self, run_dir: Path, cfg: Any, run_name: str, is_main: bool = True, wandb_id: Optional[str] = None):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.run_name = run_name
        self.cfg = cfg
        self.wandb_run = None
        self.wandb_id = wandb_id
        self._last: Dict[str, Any] = {}  # last logged value of each metric (W&B's default summary)
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            self._init_wandb()

    def _init_wandb(self, mode: Optional[str] = None) -> None:
        mode = mode or wandb_mode(self.cfg.wandb.mode)
        tags = run_tags(self.cfg)
        try:
            import wandb

            self.wandb_run = wandb.init(
                project=self.cfg.wandb.project or os.environ.get("WANDB_PROJECT", "simclr-tau"),
                entity=self.cfg.wandb.entity or os.environ.get("WANDB_ENTITY"),
                name=self.run_name,
                id=self.wandb_id,
                resume="allow",
                group=self.cfg.wandb.group or f"{tags['dataset']}-{tags['backbone']}",
                job_type=tags["method"],
                tags=[f"{k}:{v}" for k, v in tags.items()] + list(self.cfg.wandb.tags),
                config=_nested_config(self.cfg),
                dir=str(self.run_dir),
                mode=mode,
                settings=wandb.Settings(init_timeout=_init_timeout(), silent=True, console="off"),
            )
            self.wandb_id = self.wandb_run.id
            # τ curves against the optimizer step, everything else too: one x-axis for all panels.
            self.wandb_run.define_metric("*", step_metric="step")
        except Exception as e:  # network, auth, bad host: never block training
            reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            self.wandb_run = None
            if mode == "online":  # server unreachable or key refused: keep a W&B record to upload later
                warnings.warn(f"W&B unreachable ({reason}); continuing with W&B offline: upload the run later "
                              f"with `wandb sync {self.run_dir / 'wandb'}/offline-run-*`", stacklevel=2)
                self._init_wandb("offline")
                return
            warnings.warn(f"W&B disabled for this run ({reason}); the local record in {self.run_dir} is complete",
                          stacklevel=2)

    def log(self, metrics: Mapping[str, Any], step: int, epoch: float) -> None:
        """Append one record. Tensor values are read here (the only host sync of a logging step)."""
        if not self.is_main:
            return
        row = {"step": int(step), "epoch": round(float(epoch), 4)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        self._metrics.write(json.dumps(row) + "\n")
        self._last.update({k: v for k, v in row.items() if k not in ("step", "epoch")})
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(row)
            except Exception as e:
                warnings.warn(f"W&B logging failed, continuing locally: {e}", stacklevel=2)
                self.wandb_run = None

    def log_histogram(self, name: str, values: Any, step: int) -> None:
        """A histogram (per-sample τ) to W&B only; the local record keeps its summary statistics."""
        if self.wandb_run is None:
            return
        try:
            import wandb

            self.wandb_run.log({name: wandb.Histogram(values.detach().float().cpu().numpy()), "step": int(step)})
        except Exception:
            pass

    def update_summary(self, values: Mapping[str, Any]) -> None:
        """Merge the last logged metrics and ``values`` into summary.json (and the W&B run summary)."""
        if not self.is_main:
            return
        path = self.run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        summary.update(self._last)
        summary.update({k: _jsonable(v) for k, v in values.items()})
        summary.setdefault("run_name", self.run_name)
        summary["config"] = flatten(self.cfg)
        if self.wandb_id:
            summary["wandb_id"] = self.wandb_id
        text = json.dumps(summary, indent=2, sort_keys=True)
        atomic_write(path, lambda tmp: tmp.write_text(text))
        if self.wandb_run is not None:
            try:
                self.wandb_run.summary.update({k: _jsonable(v) for k, v in values.items()})
            except Exception:
                pass

    def close(self) -> None:
        if not self.is_main:
            return
        self._metrics.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception:
                pass
