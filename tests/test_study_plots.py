"""scripts/study_plots.py: the τ study's figures, one line or band per setting. The data preparation against
hand-computed references on small synthetic run records; the drawing by what lands on the axes (the figure
is caught before it is saved) and by the PNG it writes; the hook in the study's report."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
from matplotlib.collections import LineCollection

from simclr_tau.config import flatten, load_config
from simclr_tau.records.run_data import RunData
from test_reproduce import FAKE, K20, LIN, _fake_run, _module

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import study_plots as sp  # noqa: E402
from study_tables import paired_differences  # noqa: E402

OK20, OK200 = "online_knn/top1_k20_t0.07", "online_knn/top1_k200_t0.1"
PNG = b"\x89PNG\r\n\x1a\n"


def _run(name: str, knn: dict | None = None, config: dict | None = None, rows: list | None = None) -> RunData:
    """A run record: ``knn`` {epoch: online kNN k=20} rows between training rows that do not have the key."""
    history = list(rows or [])
    for i, (epoch, v) in enumerate((knn or {}).items()):
        history += [{"step": 100 * i + 50, "epoch": epoch - 0.5, "train/loss": 1.0},
                    {"step": 100 * (i + 1), "epoch": epoch, OK20: v, OK200: v - 3 if isinstance(v, float) else v}]
    return RunData(name, "", config or {"temperature.mode": "fixed"}, {}, history)


# ---- data preparation -------------------------------------------------------------------------------------

THREE = {0: ([1.0, 2.0, 3.0], [80.0, 82.0, 84.0]), 1: ([1.0, 2.0, 3.0], [81.0, 83.0, 86.0]),
         2: ([1.0, 2.0, 3.0], [79.0, 84.0, 85.0])}


def test_seed_band_is_the_mean_with_the_min_max_or_std_band_over_three_seeds() -> None:
    b = sp.seed_band("a", THREE)
    assert (b.setting, b.seeds, b.epochs, b.n) == ("a", [0, 1, 2], [1.0, 2.0, 3.0], [3, 3, 3])
    assert b.mean == pytest.approx([80.0, 83.0, 85.0])
    assert (b.lo, b.hi) == ([79.0, 82.0, 84.0], [81.0, 84.0, 86.0])
    s = sp.seed_band("a", THREE, spread="std")  # each epoch's three values are m - 1, m, m + 1: sample std 1
    assert s.mean == pytest.approx(b.mean)
    assert s.lo == pytest.approx([79.0, 82.0, 84.0]) and s.hi == pytest.approx([81.0, 84.0, 86.0])
    skewed = sp.seed_band("a", {0: ([1.0], [80.0]), 1: ([1.0], [80.0]), 2: ([1.0], [83.0])}, spread="std")
    sd = statistics.stdev([80.0, 80.0, 83.0])
    assert skewed.mean == [81.0] and skewed.lo == pytest.approx([81.0 - sd]) and skewed.hi == pytest.approx([81 + sd])
    assert sp.seed_band("a", {0: ([1.0], [80.0]), 1: ([1.0], [80.0]), 2: ([1.0], [83.0])}).lo == [80.0]
    with pytest.raises(ValueError, match="spread='iqr'"):
        sp.seed_band("a", THREE, spread="iqr")


def test_seed_band_aligns_seeds_of_different_lengths_by_epoch() -> None:
    b = sp.seed_band("a", {
        0: ([1.0, 2.0, 3.0], [80.0, 82.0, 84.0]),
        1: ([2.0000000001, 1.0], [90.0, 70.0]),  # out of order, float noise in the epoch: still epochs 2, 1
        2: ([1.0, 1.0], [60.0, 75.0]),  # a resumed run logged epoch 1 twice: its last value counts
        3: ([], []),  # nothing logged: not one of the band's seeds
    })
    assert b.seeds == [0, 1, 2] and b.epochs == [1.0, 2.0, 3.0] and b.n == [3, 2, 1]
    assert b.mean == pytest.approx([75.0, 86.0, 84.0])  # (80 + 70 + 75) / 3, (82 + 90) / 2, seed 0 alone
    assert b.lo == [70.0, 82.0, None] and b.hi == [80.0, 90.0, None]


def test_a_setting_with_one_seed_is_a_line_without_band() -> None:
    b = sp.seed_band("a", {4: ([1.0, 2.0], [80.0, 81.0])}, spread="std")
    assert b.seeds == [4] and b.mean == [80.0, 81.0] and b.lo == b.hi == [None, None] and b.n == [1, 1]
    assert sp.seed_band("a", {0: ([], [])}) is None


def test_knn_bands_read_the_online_knn_rows_of_each_settings_runs() -> None:
    runs = {"ref": {0: _run("ref-s0", {1.0: 80.0, 2.0: 82.0}), 1: _run("ref-s1", {1.0: 82.0, 2.0: "nan"})},
            "none": {0: _run("none-s0", rows=[{"step": 1, "epoch": 1.0, "train/loss": 2.0}])},
            "b": {2: _run("b-s2", {1.0: 70.0})}}
    assert sp.online_knn_key(runs) == OK20  # k = 20 before k = 200
    k5 = {"x": {0: RunData("x", "", {}, {}, [{"step": 1, "epoch": 1.0, "online_knn/top1_k5_t0.1": 1.0,
                                              "online_knn/top1_k10_t0.07": 1.0}])}}
    assert sp.online_knn_key(k5) == "online_knn/top1_k5_t0.1"  # no k = 20: the smallest k
    bands = sp.knn_bands(runs, OK20)
    assert [b.setting for b in bands] == ["ref", "b"]  # a setting without the key has no band
    ref, b = bands
    assert ref.epochs == [1.0, 2.0] and ref.mean == [81.0, 82.0] and ref.n == [2, 1]  # 'nan' is not a value
    assert (ref.lo, ref.hi) == ([80.0, None], [82.0, None]) and b.seeds == [2] and b.mean == [70.0]
    assert sp.knn_bands(runs, OK200)[0].mean == [78.0, 79.0]
    assert sp.online_knn_key({"none": runs["none"]}) is None


def test_setting_group_sorts_every_study_setting_into_its_family() -> None:
    mod = _module()
    derived, _ = mod.derived_runs("simclr-conditional")
    specs = {**mod.RUNS, **derived}
    expected = {
        sp.FIXED: ["simclr-fixed-0.05", "simclr-fixed-0.07", "simclr-fixed-0.1", "simclr-fixed-0.2", "simclr-fixed-0.5"],
        sp.SCALAR: ["simclr-learnable-log", "simclr-learnable-softplus", "simclr-learnable-relu",
                    "simclr-learnable-log-bounded", "simclr-dro-global", "simclr-dro-global-rho1"],
        sp.PER_SAMPLE: ["simclr-conditional", "simclr-dro-per-sample", "simclr-dro-per-sample-sogclr",
                        "simclr-dro-per-sample-rho1", "simclr-dro-per-sample-sogclr-rho1", "simclr-conditional-dro"],
        sp.SCHEDULED: ["simclr-cosine", "simclr-adaptive"],
        sp.OTHER: ["simclr-dcl-fixed-0.2", "mocov2-fixed-0.2", "mocov2-learnable-log", "mocov2-learnable-log-bounded",
                   "simclr-dcl-conditional", "mocov2-conditional", "simclr-fixed-0.2-outbn",
                   "simclr-learnable-log-bounded-outbn"],
    }
    assert sorted(n for names in expected.values() for n in names) == sorted(specs)
    for group, names in expected.items():
        for name in names:  # the flattened config a run directory's summary.json holds
            spec = specs[name]
            cfg = flatten(load_config(REPO / mod.PRESETS["cpu2"][spec["method"]], spec["overrides"]))
            assert sp.setting_group(cfg) == group, name
    assert sp.setting_group({}) == sp.OTHER  # no config (a record without one): not guessed into a τ family


def test_tau_curve_of_a_scalar_a_per_sample_and_a_fixed_tau() -> None:
    scalar = _run("l", rows=[{"step": s, "epoch": s / 10, "train/tau": 0.2 / (s + 1)} for s in range(3)])
    c = sp.tau_curve("l", 0, scalar)
    assert (c.steps, c.centre, c.lo, c.hi, c.what) == ([0.0, 1.0, 2.0], [0.2, 0.1, 0.2 / 3], None, None, "scalar")
    dro = _run("d", rows=[{"step": s, "train/tau_p50": 0.2, "train/tau_p1": 0.2 - s / 100,
                           "train/tau_p99": 0.2 + s / 50, "train/tau_mean": 0.3} for s in (5, 10)])
    c = sp.tau_curve("d", 1, dro)
    assert (c.seed, c.steps, c.centre) == (1, [5, 10], [0.2, 0.2])
    assert c.lo == pytest.approx([0.15, 0.1]) and c.hi == pytest.approx([0.3, 0.4])
    assert "p1–p99" in c.what  # a constant median with a moving band moves
    cond = _run("c", rows=[{"step": 1, "train/tau_mean": 0.2, "train/tau_min": 0.1, "train/tau_max": 0.3}])
    assert sp.tau_curve("c", 0, cond).lo == [0.1]
    fixed = _run("f", rows=[{"step": s, "train/tau": 0.2} for s in range(3)])
    assert sp.tau_curve("f", 0, fixed) is None and sp.tau_curve("x", 0, _run("x", {1.0: 80.0})) is None
    runs = {"f": {0: fixed}, "l": {3: scalar, 1: _run("l1", rows=[{"step": 0, "train/tau": 0.5},
                                                                  {"step": 1, "train/tau": 0.4}])}}
    (only,) = sp.tau_curves(runs)  # the fixed τ does not move; the learned one from its lowest seed
    assert (only.setting, only.seed, only.centre) == ("l", 1, [0.5, 0.4])


def _rows():
    rows = [{"run": "simclr-fixed-0.2", "seed": s, K20: 80.0 + s, LIN: 85.0} for s in (0, 1, 2)]
    rows += [{"run": "a", "seed": s, K20: v, LIN: 86.0} for s, v in ((0, 81.0), (1, 82.5), (2, 83.0))]
    rows += [{"run": "one", "seed": 1, K20: 79.0, LIN: 84.0}, {"run": "late", "seed": 7, K20: 90.0, LIN: 90.0}]
    return rows


def test_forest_rows_are_the_paired_differences_as_given_in_the_order_asked() -> None:
    diffs = paired_differences(_rows(), [K20, LIN])
    rows, missing = sp.forest_rows(diffs, K20, order=["one", "a"])
    assert [r.setting for r in rows] == ["one", "a"] and missing == ["late"]
    by_run = {d["run"]: d for d in diffs if d["metric"] == K20}
    a = rows[1]
    assert (a.mean, a.lo, a.hi, a.n, a.verdict) == tuple(by_run["a"][k] for k in ("mean", "lo", "hi", "n", "verdict"))
    assert a.mean == pytest.approx(7 / 6) and a.verdict == "better"
    one = rows[0]
    assert (one.mean, one.lo, one.hi, one.n) == (pytest.approx(-2.0), None, None, 1)
    assert [r.setting for r in sp.forest_rows(diffs, LIN)[0]] == ["a", "one"]  # no order: as in diffs
    assert sp.forest_rows(diffs, "knn/top1_k5_t0.1") == ([], [])


# ---- drawing ----------------------------------------------------------------------------------------------

@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, caught before they are closed."""
    caught = []
    save = sp._save

    def keep(fig, path):
        caught.append(fig)
        fig.canvas.draw()
        return save(fig, path)

    monkeypatch.setattr(sp, "_save", keep)
    return caught


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


def _legend(ax) -> list:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_plot_knn_bands_draws_a_panel_per_family_with_the_reference_and_pixels_in_each(tmp_path, figures) -> None:
    bands = [sp.seed_band("simclr-fixed-0.2", THREE), sp.seed_band("simclr-fixed-0.5", {0: THREE[0]}),
             sp.seed_band("simclr-learnable-log", {0: THREE[1], 1: ([1.0], [90.0])})]
    groups = {"simclr-fixed-0.2": sp.FIXED, "simclr-fixed-0.5": sp.FIXED, "simclr-learnable-log": sp.SCALAR}
    path = sp.plot_knn_bands(bands, groups, tmp_path / "k.png", OK20, pixels=85.69)
    assert path == tmp_path / "k.png" and _png(path)
    axes = [ax for ax in figures[0].axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [sp.FIXED, sp.SCALAR]
    for ax in axes:
        labels = _legend(ax)
        assert "simclr-fixed-0.2 (reference, seeds 0,1,2)" in labels and "raw pixels 85.69 % (offline kNN)" in labels
        ref = next(line for line in ax.get_lines() if line.get_label().startswith("simclr-fixed-0.2"))
        assert list(ref.get_ydata()) == pytest.approx([80.0, 83.0, 85.0])
        assert ax.get_ylim()[0] < 79.0 and ax.get_ylim()[1] > 90.0  # every band and seed of every panel fits
    assert "simclr-learnable-log (seeds 0,1; dotted: not every seed)" in _legend(axes[1])
    assert "simclr-fixed-0.5 (seed 0)" in _legend(axes[0])
    assert "band = min–max over seeds (none for one seed)" in figures[0]._suptitle.get_text()
    assert sp.plot_knn_bands([], groups, tmp_path / "none.png", OK20) is None and not (tmp_path / "none.png").exists()


def test_plot_titles_are_wrapped_to_stay_inside_a_one_panel_figure(tmp_path, figures) -> None:
    # one family (the 24-epoch study's two settings): a figure one panel wide, and the longest titles
    bands = [sp.seed_band("simclr-fixed-0.2", THREE), sp.seed_band("simclr-learnable-log", {0: THREE[1]})]
    groups = {"simclr-fixed-0.2": sp.OTHER, "simclr-learnable-log": sp.OTHER}
    note = "online kNN on a bank of 10000 training images; the raw-pixel line is the offline kNN on all 60000"
    sp.plot_knn_bands(bands, groups, tmp_path / "k.png", OK20, pixels=85.69, note=note)
    sp.plot_tau_curves([sp.TauCurve("simclr-learnable-log", 0, [0, 1], [0.2, 0.05], None, None, "scalar")],
                       {"simclr-learnable-log": sp.OTHER}, tmp_path / "t.png")
    for fig in figures:
        title = fig._suptitle
        fig.canvas.draw()
        box, page = title.get_window_extent(), fig.bbox
        assert page.x0 <= box.x0 and box.x1 <= page.x1, (title.get_text(), box, page)
        assert "\n" in title.get_text()  # it did need wrapping
    assert "band = min–max over seeds" in figures[0]._suptitle.get_text().replace("\n", " ")


def test_plot_tau_curves_uses_a_log_axis_only_where_tau_spans_a_decade(tmp_path, figures) -> None:
    curves = [sp.TauCurve("simclr-learnable-log", 0, [0, 1], [0.2, 0.012], None, None, "scalar"),
              sp.TauCurve("simclr-dro-per-sample", 0, [0, 1], [0.2, 0.25], [0.19, 0.2], [0.21, 0.3], "median, p1–p99")]
    groups = {"simclr-learnable-log": sp.SCALAR, "simclr-dro-per-sample": sp.PER_SAMPLE}
    assert _png(sp.plot_tau_curves(curves, groups, tmp_path / "t.png"))
    scalar, per_sample = [ax for ax in figures[0].axes if ax.get_visible()]
    assert (scalar.get_title(), scalar.get_yscale(), per_sample.get_yscale()) == (sp.SCALAR, "log", "linear")
    assert "simclr-dro-per-sample (seed 0; per-sample: median, p1–p99)" in _legend(per_sample)
    assert len(per_sample.collections) == 1 and not scalar.collections  # the quantile band, for the per-sample τ
    ticks = {t.get_text() for t in scalar.get_yticklabels(which="both") if t.get_text()}
    assert {"0.02", "0.05", "0.1"} <= ticks and not any("10^" in t for t in ticks)
    assert sp.plot_tau_curves([], groups, tmp_path / "none.png") is None


def test_plot_paired_forest_draws_each_interval_and_a_single_seed_without_one(tmp_path, figures) -> None:
    diffs = paired_differences(_rows(), [K20, LIN])
    path = sp.plot_paired_forest(diffs, [K20, LIN], tmp_path / "f.png", order=["a", "one"])
    assert _png(path)
    fig = figures[0]
    knn, lin = [ax for ax in fig.axes if ax.get_visible()]
    assert (knn.get_title(), lin.get_title()) == ("kNN k=20 T=0.07", "linear probe")
    assert [t.get_text() for t in knn.get_yticklabels()] == ["a", "one"]
    a = next(d for d in diffs if d["run"] == "a" and d["metric"] == K20)
    (bar,) = [c for c in knn.collections if isinstance(c, LineCollection)]  # the one interval: setting a, row 0
    assert list(bar.get_segments()[0][:, 0]) == pytest.approx([a["lo"], a["hi"]])
    assert list(bar.get_segments()[0][:, 1]) == [0.0, 0.0]
    texts = [t.get_text() for t in knn.texts]
    assert "-2.00 (1 seed)" in texts and f"+1.17 [{a['lo']:+.2f}, {a['hi']:+.2f}] n=3" in texts
    assert any(list(line.get_xdata()) == [0, 0] for line in knn.get_lines())  # the line at 0
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "one common seed: no interval" in legend
    assert "not drawn, no seed in common with the reference: late" in fig._suptitle.get_text()
    assert sp.plot_paired_forest([d for d in diffs if d["run"] == "late"], [K20], tmp_path / "n.png") is None


def test_plot_paired_forest_names_a_setting_missing_from_one_panel_only_for_that_panel(tmp_path, figures) -> None:
    # a report built mid-run: "half" has its kNN on seeds 0, 1 but no linear probe yet
    rows = _rows() + [{"run": "half", "seed": s, K20: 81.0 + s, LIN: None} for s in (0, 1)]
    path = sp.plot_paired_forest(paired_differences(rows, [K20, LIN]), [K20, LIN], tmp_path / "f.png")
    assert _png(path)
    knn, lin = [ax for ax in figures[0].axes if ax.get_visible()]
    assert "half" in [t.get_text() for t in knn.get_yticklabels()]
    title = figures[0]._suptitle.get_text().replace("\n", " ")
    assert "not drawn, no seed in common with the reference: late" in title  # in no panel
    assert "not drawn in one panel, no common seed with that metric yet: linear probe: half" in title
    assert "reference: half" not in title and "late, half" not in title


def test_write_study_plots_writes_the_three_figures_or_says_why_not(tmp_path) -> None:
    runs = {"simclr-fixed-0.2": {s: _run(f"r{s}", {1.0: 80.0 + s, 2.0: 81.0}) for s in (0, 1)},
            "simclr-learnable-log": {0: _run("l", {1.0: 82.0}, {"temperature.mode": "learnable"},
                                             [{"step": 1, "train/tau": 0.2}, {"step": 2, "train/tau": 0.1}])}}
    written, notes = sp.write_study_plots(runs, paired_differences(_rows(), [K20]), [K20], tmp_path / "p",
                                          pixels={"knn/top1_k20_t0.07": 85.69})
    assert [p.name for p in written] == ["knn_vs_epoch.png", "tau_vs_step.png", "paired_differences.png"]
    assert all(_png(p) for p in written) and notes == []
    bare = {"simclr-fixed-0.2": {0: _run("f", rows=[{"step": 1, "epoch": 1.0, "train/tau": 0.2}])}}
    written, notes = sp.write_study_plots(bare, [], [K20], tmp_path / "q")
    assert written == [] and [n.split(":")[0] for n in notes] == ["kNN vs epoch", "τ vs step", "paired differences"]
    assert all("skipped (" in n for n in notes) and not list((tmp_path / "q").iterdir())


def test_the_study_report_writes_the_plots_and_lists_them(tmp_path) -> None:
    for name, (knn, lin, _) in FAKE.items():
        for seed in (0, 1, 2):
            _fake_run(tmp_path, f"{name}-s{seed}", {K20: knn[seed], LIN: lin[seed]}, [50.0])
    _fake_run(tmp_path, "simclr-adaptive-s0", {}, [50.0])  # pretrained, not evaluated: not in the figures
    mod = _module()
    assert mod.main(["--preset", "cpu2", "--out", str(tmp_path), "--report-only", "--no-baselines", "--no-ood",
                     "--only", *FAKE, "simclr-adaptive"]) == 0
    md = (tmp_path / "results.md").read_text()
    assert ("Plots, one line per setting: `plots/knn_vs_epoch.png`, `plots/paired_differences.png`; one line per "
            "run: `compare/`") in md
    assert "- τ vs step: skipped (no setting's τ moves (all fixed, or no τ logged))" in md  # the fakes log no τ
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["plots"] == ["plots/knn_vs_epoch.png", "plots/paired_differences.png"]
    assert all(_png(tmp_path / p) for p in res["plots"])
