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
``train.run_name``), W&B group: the experiment (:func:`default_group`, unless ``wandb.group``), job type ``<method>``, tags
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
from typing import Any, Dict, Mapping, Optional, Tuple

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


DEFAULT_BASE_URL = "https://api.wandb.ai"


def wandb_base_url() -> str:
    """The W&B server wandb will talk to: ``WANDB_BASE_URL``, else ``base_url`` in wandb's settings file
    (``$WANDB_CONFIG_DIR/settings``, default ``~/.config/wandb/settings``, written by ``wandb login --host``),
    else api.wandb.ai."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"].rstrip("/")
    import configparser

    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    parser = configparser.ConfigParser()
    try:
        parser.read(config_dir / "settings")
        url = parser.get("default", "base_url", fallback="")
    except (configparser.Error, OSError):
        url = ""
    return url.rstrip("/") or DEFAULT_BASE_URL


def _netrc_key(base_url: str) -> Optional[str]:
    """The API key ``wandb login`` stored for ``base_url``'s host: wandb's own netrc lookup, else the
    standard library's reading of ``$NETRC`` / ``~/.netrc``."""
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return read_netrc_auth(host=base_url)
    except Exception:  # an older/newer wandb without this module, or a key it finds malformed
        pass
    import netrc
    from urllib.parse import urlsplit

    path = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        auth = netrc.netrc(str(path)).authenticators(urlsplit(base_url).hostname or base_url)
    except (OSError, netrc.NetrcParseError):
        return None
    return auth[2] if auth else None


def wandb_mode_reason(requested: str) -> Tuple[str, str]:
    """Resolve ``wandb.mode`` and say why: auto -> online with an API key for the configured host
    (``WANDB_API_KEY``, or a netrc entry for the host of :func:`wandb_base_url`), else offline."""
    if requested != "auto":
        return requested, f"wandb.mode={requested}"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], f"WANDB_MODE={os.environ['WANDB_MODE']}"
    if os.environ.get("WANDB_API_KEY"):
        return "online", "WANDB_API_KEY is set"
    base_url = wandb_base_url()
    host = base_url.split("://", 1)[-1]
    if _netrc_key(base_url):
        return "online", f"API key for {host} from wandb login"
    return "offline", f"no API key for {host}"


def wandb_mode(requested: str) -> str:
    """Resolve ``wandb.mode`` (:func:`wandb_mode_reason` without the reason)."""
    return wandb_mode_reason(requested)[0]


def default_group(cfg: Any) -> str:
    """The W&B group: ``wandb.group``, else the experiment, i.e. what the runs of one τ study share:
    ``<method>-<dataset>-<backbone>-<epochs>ep-bs<batch>`` (``scripts/tau_sweep.py`` sets ``wandb.group`` to its
    ``--name``). The τ setting is not part of it: the run name and the ``tau_mode:`` tag say it. A group holds
    every τ of one experiment, so average in the W&B UI only after also grouping by ``config.temperature.mode``."""
    if cfg.wandb.group:
        return str(cfg.wandb.group)
    tags = run_tags(cfg)
    return f"{tags['method']}-{tags['dataset']}-{tags['backbone']}-{cfg.train.epochs}ep-bs{cfg.train.batch_size}"


def wandb_status_line(mode: str, reason: str, run: Any, run_dir: Path) -> str:
    """The one line a run prints about W&B: its mode and why, where the W&B run lives, and for an offline run
    the command that uploads it."""
    if mode == "online" and run is not None:
        return f"W&B: online ({reason}): {getattr(run, 'url', None) or run_dir / 'wandb'}"
    if mode == "offline" and run is not None:
        sync_dir = getattr(getattr(run, "settings", None), "sync_dir", None) or f"{run_dir / 'wandb'}/offline-run-*"
        return f"W&B: offline ({reason}): {sync_dir}; upload later with `wandb sync {sync_dir}`"
    return f"W&B: disabled ({reason}); the local record in {run_dir} is complete"


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
        self.status_line: Optional[str] = None  # the one line about W&B printed at the start
        self._last: Dict[str, Any] = {}  # last logged value of each metric (W&B's default summary)
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.wandb.enabled:
            mode, reason = wandb_mode_reason(cfg.wandb.mode)
            if mode != "disabled":
                self._init_wandb(mode, reason)
            if self.status_line is None:
                self.status_line = wandb_status_line("disabled", reason, None, self.run_dir)
            print(self.status_line, flush=True)

    def _init_wandb(self, mode: str, reason: str) -> None:
        tags = run_tags(self.cfg)
        try:
            import wandb

            self.wandb_run = wandb.init(
                project=self.cfg.wandb.project or os.environ.get("WANDB_PROJECT", "simclr-tau"),
                entity=self.cfg.wandb.entity or os.environ.get("WANDB_ENTITY"),
                name=self.run_name,
                id=self.wandb_id,
                resume="allow",
                group=default_group(self.cfg),
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
            self.status_line = wandb_status_line(mode, reason, self.wandb_run, self.run_dir)
        except Exception as e:  # network, auth, bad host: never block training
            reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            self.wandb_run = None
            if mode == "online":  # server unreachable or key refused: keep a W&B record to upload later
                warnings.warn(f"W&B unreachable ({reason}); continuing with W&B offline: upload the run later "
                              f"with `wandb sync {self.run_dir / 'wandb'}/offline-run-*`", stacklevel=2)
                self._init_wandb("offline", "online failed")
                return
            warnings.warn(f"W&B disabled for this run ({reason}); the local record in {self.run_dir} is complete",
                          stacklevel=2)
            self.status_line = wandb_status_line("disabled", f"wandb.init failed: {reason}", None, self.run_dir)

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
