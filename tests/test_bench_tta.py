"""scripts/bench_tta.py: training seconds from the logged images/s, and the time-to-pixels summary."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_tta.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_tta", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_tta"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_train_seconds_add_each_window_at_its_own_rate() -> None:
    tta = _module()
    rows = [{"step": 10, "train/images_per_s": 100.0}, {"step": 20, "online_knn/top1": 1.0},  # not a timing row
            {"step": 30, "train/images_per_s": 200.0}]
    secs = tta.train_seconds(rows, batch_size=20)
    assert secs == {10: pytest.approx(2.0), 30: pytest.approx(2.0 + 20 * 20 / 200.0)}


def test_summary_finds_the_first_point_at_the_pixel_line_and_the_best() -> None:
    tta = _module()
    curve = [{"epoch": 0.5, "seconds": 60, "knn": 80.0}, {"epoch": 1.0, "seconds": 120, "knn": 86.0},
             {"epoch": 1.5, "seconds": 180, "knn": 85.9}, {"epoch": 2.0, "seconds": 240, "knn": 86.5}]
    s = tta.summarize(curve, pixels=85.69)
    assert s == {"epochs_to_pixels": 1.0, "minutes_to_pixels": 2.0, "best_knn": 86.5, "best_epoch": 2.0}
    none = tta.summarize(curve[:1], pixels=85.69)
    assert none["epochs_to_pixels"] is None and none["minutes_to_pixels"] is None and none["best_knn"] == 80.0
