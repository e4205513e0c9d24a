"""Read runs of a W&B project through the public API into :class:`simclr_tau.records.run_data.RunData`.

``--filter KEY=VALUE`` becomes a W&B (MongoDB-style) filter: a config key (``temperature.mode=fixed`` ->
``{"config.temperature.mode": "fixed"}``; our runs log their config nested, which W&B can filter on),
``tags=tau_mode:fixed`` (a tag the run carries), or a run field (``group``, ``jobType``, ``state``,
``display_name``, ``createdAt``, ...) and explicit ``config.*`` / ``summary_metrics.*`` keys as given.
Several filters must all hold (``$and``). Values are parsed as numbers / booleans / null where they look so.

History is read per curve with ``run.scan_history(keys=[...])`` (unsampled; only rows holding every key),
so an online-kNN row and a training row logged at the same step stay separate, as in metrics.jsonl.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from simclr_tau.records.run_data import RunData, final_metrics, is_metric
from simclr_tau.config import flatten
from simclr_tau.errors import UserError

RUN_FIELDS = ("group", "jobType", "job_type", "state", "display_name", "displayName", "name", "createdAt",
              "username", "host", "sweep")


def parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def build_filters(items: Sequence[str]) -> Dict[str, Any]:
    """``["temperature.mode=fixed", "tags=dataset:cifar10"]`` -> a W&B runs filter (``{}`` for none)."""
    clauses: List[Dict[str, Any]] = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--filter '{item}' is not of the form KEY=VALUE (e.g. temperature.mode=fixed)")
        if key in ("tag", "tags"):
            clauses.append({"tags": {"$in": [value]}})
        elif key in RUN_FIELDS or key.startswith(("config.", "summary_metrics.")):
            clauses.append({key: parse_value(value)})
        else:
            clauses.append({f"config.{key}": parse_value(value)})
    if not clauses:
        return {}
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _as_dict(obj: Any) -> Dict[str, Any]:
    if obj is None:
        return {}
    if hasattr(obj, "_json_dict"):  # wandb's HTTPSummary
        obj = obj._json_dict
    return dict(obj.items()) if hasattr(obj, "items") else dict(obj)


def _curves(summary: Dict[str, Any]) -> List[List[str]]:
    """Key groups to scan: each group is one plotted series (with its band)."""
    groups = [["train/loss"]]
    if "train/tau" in summary:
        groups.append(["train/tau"])
    if "train/tau_mean" in summary:
        groups.append([k for k in ("train/tau_mean", "train/tau_min", "train/tau_max") if k in summary])
    groups += [[k] for k in summary if k.startswith("online_knn/top1_")]  # the per-epoch curves
    return groups


def read_run(run: Any, source: str, extra: Sequence[str] = ()) -> RunData:
    """One public-API run -> RunData (config flattened like summary.json's, history of the plotted keys)."""
    summary = _as_dict(run.summary)
    config = {k: v for k, v in flatten(_as_dict(run.config)).items() if not k.startswith("_")}
    x = "step" if "step" in summary else "_step"  # our runs log their optimizer step as "step"
    history: List[Dict[str, Any]] = []
    for keys in _curves(summary) + [[k] for k in extra if k in summary]:
        wanted = [x, *keys] + (["epoch"] if "epoch" in summary else [])
        for row in run.scan_history(keys=wanted):
            row = {k: row.get(k) for k in wanted}
            row["step"] = row.pop(x)
            history.append(row)
    summary_metrics = {k: v for k, v in summary.items() if is_metric(k)}
    return RunData(name=str(run.name or run.id), source=f"wandb:{source}/{run.id}", config=config,
                   final=final_metrics(history, summary_metrics), history=history)


def load_wandb_runs(path: str, filters: Sequence[str] = (), extra: Sequence[str] = ()) -> List[RunData]:
    """All runs of ``ENTITY/PROJECT`` (or ``PROJECT`` of the default entity) matching ``filters``."""
    parts = path.strip("/").split("/")
    if not path or len(parts) > 2 or not all(parts):
        raise UserError(f"--wandb {path!r}: expected ENTITY/PROJECT (or PROJECT)")
    query = build_filters(filters)
    import wandb

    try:
        api = wandb.Api(timeout=30)
        runs = list(api.runs(path.strip("/"), filters=query or None))
        out = [read_run(r, path.strip("/"), extra) for r in runs]
    except UserError:
        raise
    except Exception as e:  # auth, network, unknown project: all fixed on the user's side
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"W&B API: cannot read runs of {path} ({type(e).__name__}: {first}); "
                        f"check WANDB_API_KEY, WANDB_BASE_URL and the project path") from None
    if not out:
        raise UserError(f"W&B project {path} has no runs{' matching ' + str(query) if query else ''}")
    return out
