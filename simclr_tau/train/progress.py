"""What a run shows while it trains (main process only), and the summary it ends with (:func:`run_summary`).

While it trains:

- on a terminal (stdout and stderr both TTYs): a tqdm bar, with loss / τ / images/s of the last log step;
- otherwise (batch jobs, SLURM logs, ``| tee``), where a bar's carriage-return frames would fill the log:
  one plain line per log step (every ``train.log_every`` steps and at epoch ends) on stdout::

      step 40/400 (epoch 1.00)  loss 4.812  tau 0.1  images/s 312

- ``train.progress=false``: nothing (the end-of-run summary is printed by the command line regardless).

A long pause that is not training (the online kNN) is announced, on the bar or as a line, so a run does
not look stalled.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence

from simclr_tau.models.export import TIMM_CONFIG


def is_terminal() -> bool:
    """Whether stdout and stderr (the bar's stream) are both terminals."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _label(key: str) -> str:
    name = key.split("/")[-1]
    return "images/s" if name == "images_per_s" else name


def _value(key: str, value: Any) -> str:
    v = float(value)
    return f"{v:.0f}" if key.endswith("images_per_s") else f"{v:.4g}"


class Progress:
    """The bar or the log lines of one run; a no-op when not ``enabled``.

    ``keys``: the metrics shown (those present at a log step, in this order).
    """

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, keys: Sequence[str]) -> None:
        self.total, self.keys, self.enabled = total, tuple(keys), enabled
        self.bar = None
        self.postfix: Dict[str, str] = {}
        if enabled and is_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=desc)

    def advance(self) -> None:
        """One optimizer step done."""
        if self.bar is not None:
            self.bar.update(1)

    def show(self, step: int, epoch: float, metrics: Mapping[str, Any]) -> None:
        """The metrics of a log step: the bar's postfix, or one line."""
        shown = [(k, metrics[k]) for k in self.keys if k in metrics]
        if self.bar is not None:
            self.postfix = {k.split("/")[-1]: _value(k, v) for k, v in shown}
            self.bar.set_postfix(self.postfix)
        elif self.enabled:
            fields = "  ".join(f"{_label(k)} {_value(k, v)}" for k, v in shown)
            print(f"step {step}/{self.total} (epoch {epoch:.2f})  {fields}", flush=True)

    def busy(self, step: int, what: str) -> None:
        """Announce a pause of the training steps (``what``: e.g. "online kNN")."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"{what} ...", refresh=True)
        elif self.enabled:
            print(f"step {step}/{self.total}: {what} ...", flush=True)

    def done(self, what: str, results: Mapping[str, Any], seconds: float) -> None:
        """The end of a pause :meth:`busy` announced, with its first result."""
        first = next(iter(results.items()), None)
        shown = f" {first[0].split('/')[-1]} {float(first[1]):.4g}" if first is not None else ""
        if self.bar is not None:
            self.bar.set_postfix(self.postfix)
        elif self.enabled:
            print(f"{what}:{shown} ({seconds:.1f} s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- the end of a run ----------------------------------------------------------------------------------

# (metric, label) of every τ a run may log: a global τ, per-sample τ (the mean), distillation's τ_s / τ_t / T
TAU_METRICS = (("train/tau", "tau"), ("train/tau_mean", "tau mean"), ("train/tau_s", "tau_s"),
               ("train/tau_t", "tau_t"), ("train/T", "T"))


def last_values(run_dir: Path) -> Dict[str, Any]:
    """The last logged value of every metric in ``run_dir/metrics.jsonl`` (``epoch`` included)."""
    last: Dict[str, Any] = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                last.update(json.loads(line))
            except ValueError:  # a half-written last line
                pass
    return last


def _num(value: Any, fmt: str = ".4g") -> str:
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return str(value)


def run_summary(result: Any, command: str) -> str:
    """The lines a finished run ends with: final loss and τ, the last online kNN if it was logged, where the
    encoder went and the next command (``result``: a :class:`~simclr_tau.train.session.RunResult`;
    ``command``: ``pretrain`` or ``distill``, for the resume hint of a stopped run)."""
    run_dir, last = result.run_dir, last_values(result.run_dir)
    parts = [f"final loss {_num(last['train/loss'])}"] if "train/loss" in last else []
    parts += [f"{label} {_num(last[key])}" for key, label in TAU_METRICS if key in last]
    knn = next((k for k in last if k.startswith("online_knn/top1")), None)
    if knn is not None:
        parts.append(f"online kNN {knn.split('/', 1)[1]} {_num(last[knn], '.2f')}%")
    if result.stopped_early:
        head = f"stopped at step {result.step}/{result.total_steps}"
        tail = [f"checkpoint: {run_dir / 'checkpoints'} (continue: simclr-tau {command} CONFIG "
                f"train.run_name={run_dir.name} --resume auto)"]
    else:
        epochs = _num(last.get("epoch", 0), ".3g")
        head = f"done: {result.step} steps ({epochs} epoch{'' if epochs == '1' else 's'})"
        encoder = run_dir / "encoder.safetensors"
        if not encoder.is_file():
            where = "encoder: not written"
        elif (run_dir / TIMM_CONFIG).is_file():  # written by the export where plain timm rebuilds the encoder
            where = f"encoder: {encoder} (timm: timm.create_model('local-dir:{run_dir}', pretrained=True))"
        else:
            where = f"encoder: {encoder} (load_encoder only: plain timm cannot build its stem)"
        tail = [where,
                f"next: simclr-tau knn {run_dir}"]
    return "\n".join([f"{head}: {', '.join(parts)}" if parts else head, *tail[:1], f"run directory: {run_dir}",
                      *tail[1:]])
