"""Held-out classes as out-of-distribution: the AUROC against its pairwise definition (ties included), the
kNN distance against brute force, the report on hand-made features, and ``simclr-tau ood`` on real tiny runs
(6 synthetic classes, pretrained on 4) of a conditional τ (both objectives), a per-sample dro τ and a fixed τ."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simclr_tau.config import load_config
from simclr_tau.errors import UserError
from simclr_tau.evaluation.ood import auroc, knn_distance, leave_one_out_search, ood_report, train_error_report

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "synthetic_tiny.yaml")
SIX_TRAIN_FOUR = ["data.synthetic_classes=6", "data.synthetic_size=96", "data.classes=[0,1,2,3]"]


def pairwise_auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """The definition: P(positive > negative) + ½ P(tie) over all n₊ · n₋ pairs."""
    pos, neg = scores[positives].tolist(), scores[~positives].tolist()
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# ---- auroc -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, levels, seed", [(7, 3, 0), (50, 4, 1), (200, 1000, 2), (301, 2, 3)])
def test_auroc_equals_the_pairwise_definition_with_ties(n: int, levels: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (n,), generator=g).double() / levels  # few levels: many ties
    positives = torch.rand(n, generator=g) < 0.4
    positives[0], positives[1] = True, False  # both classes present
    assert auroc(scores, positives) == pytest.approx(pairwise_auroc(scores, positives), abs=1e-12)


def test_auroc_matches_sklearn_and_its_edge_cases() -> None:
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(4)
    scores = torch.randint(0, 8, (400,), generator=g).double()
    positives = torch.rand(400, generator=g) < torch.sigmoid(scores - 4)
    assert auroc(scores, positives) == pytest.approx(roc_auc_score(positives.numpy(), scores.numpy()), abs=1e-12)
    assert auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([False, False, True])) == 1.0
    assert auroc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([False, False, True])) == 0.0  # reported as is
    assert auroc(torch.ones(5), torch.tensor([True, False, True, False, False])) == 0.5  # all tied: no signal
    assert math.isnan(auroc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])))  # no negatives: undefined
    with pytest.raises(ValueError):
        auroc(torch.ones(3), torch.ones(2, dtype=torch.bool))


# ---- scores on hand-made features --------------------------------------------------------------------

def test_knn_distance_is_one_minus_the_kth_cosine() -> None:
    g = torch.Generator().manual_seed(0)
    train, query = torch.randn(40, 8, generator=g), torch.randn(9, 8, generator=g)
    cos = F.normalize(query, dim=1) @ F.normalize(train, dim=1).T
    expected = 1 - cos.sort(dim=1, descending=True).values[:, 4]
    assert torch.allclose(knn_distance(train, query, k=5), expected.double(), atol=1e-5)


def _clusters(centres: torch.Tensor, n: int, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (centres.repeat_interleave(n, 0) + spread * torch.randn(len(centres) * n, centres.shape[1], generator=g))


def test_report_separates_held_out_clusters_and_rates_tau_as_given() -> None:
    dims = torch.eye(6) * 5  # 6 orthogonal directions: classes 0-3 in distribution, 4-5 held out
    train = _clusters(dims[:4], 30, 0.3, 0)
    train_y = torch.arange(4).repeat_interleave(30)
    id_f, id_y = _clusters(dims[:4], 5, 0.3, 1), torch.arange(4).repeat_interleave(5)
    id_f[0] = dims[1]  # an image of class 0 lying in class 1: the one kNN error
    ood_f = _clusters(dims[4:], 5, 0.3, 2)
    tau_id, tau_ood = torch.full((20,), 0.1), torch.full((10,), 0.5)
    tau_id[0] = 0.3
    r = ood_report(train, train_y, id_f, id_y, ood_f, num_classes=4, k=20, T=0.07, tau_id=tau_id, tau_ood=tau_ood)
    assert r["n_id"] == 20 and r["n_ood"] == 10 and r["n_knn_errors_id"] == 1
    assert r["knn_top1_id"] == pytest.approx(95.0)
    assert r["auroc_knn_distance"] > 0.9  # held-out directions are far from every training feature
    assert r["auroc_tau"] == 1.0 and r["auroc_tau_id_error"] == 1.0
    assert r["tau_mean"]["ood"] == pytest.approx(0.5) and r["tau_mean"]["id_error"] == pytest.approx(0.3)
    flipped = ood_report(train, train_y, id_f, id_y, ood_f, 4, 20, 0.07, -tau_id, -tau_ood)
    assert flipped["auroc_tau"] == 0.0  # a τ pointing the other way reads < 0.5, not flipped back
    none = ood_report(train, train_y, id_f[1:], id_y[1:], ood_f, 4)
    assert none["auroc_tau"] is None and none["auroc_knn_distance_id_error"] is None  # no ID errors: undefined


def brute_force_loo_correct(feats: torch.Tensor, labels: torch.Tensor, k: int, T: float, C: int) -> torch.Tensor:
    """Each image voted by its k most similar other images with weight exp(s / T)."""
    f = F.normalize(feats.double(), dim=1)
    sims = (f @ f.T).fill_diagonal_(-float("inf"))
    s, idx = sims.topk(k, dim=1)
    scores = torch.zeros(len(f), C, dtype=torch.float64).scatter_add_(1, labels[idx], torch.exp(s / T))
    return scores.argmax(1) == labels


def test_leave_one_out_drops_the_image_itself_even_behind_a_duplicate() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 6, generator=g)
    feats[7] = feats[3]  # an exact duplicate: either may come first in the other's list
    sims, idx = leave_one_out_search(feats, 4)
    assert sims.shape == idx.shape == (30, 4)
    assert not (idx == torch.arange(30).view(-1, 1)).any()
    assert 7 in idx[3].tolist() and 3 in idx[7].tolist()
    cos = F.normalize(feats, dim=1) @ F.normalize(feats, dim=1).T
    expected = cos.fill_diagonal_(-2).sort(dim=1, descending=True).values[:, :4]
    assert torch.allclose(sims.float(), expected, atol=1e-5)
    with pytest.raises(UserError, match="at least 31"):
        leave_one_out_search(feats, 30)


def test_train_error_report_matches_a_brute_force_leave_one_out_knn() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat_interleave(20)
    feats = torch.eye(3)[labels] * 1.5 + torch.randn(60, 3, generator=g)  # overlapping: some LOO errors
    tau = torch.rand(60, generator=g)
    r = train_error_report(feats, labels, 3, k=5, T=0.1, tau=tau)
    correct = brute_force_loo_correct(feats, labels, 5, 0.1, 3)
    assert 0 < r["n_knn_errors"] == int((~correct).sum()) and r["n"] == 60
    assert r["knn_top1"] == pytest.approx(100 * correct.double().mean().item())
    assert r["auroc_tau_error"] == pytest.approx(auroc(tau, ~correct))
    assert train_error_report(feats, labels, 3, k=5, T=0.1)["auroc_tau_error"] is None


# ---- simclr-tau ood on real tiny runs -------------------------------------------------------------------

RUNS = {
    "fixed": ["temperature.mode=fixed", "temperature.init=0.2"],
    "conditional": ["temperature.mode=conditional", "temperature.init=0.2", "temperature.hidden_dim=8",
                    "optim.lr=2.0"],
    "conditional-dro": ["temperature.mode=conditional", "temperature.objective=dro", "temperature.init=0.2",
                        "temperature.hidden_dim=8", "optim.lr=2.0"],
    "dro-per-sample": ["temperature.mode=dro", "temperature.dro.per_sample=true", "temperature.init=0.2"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from simclr_tau.train.pretrain import run

    root = tmp_path_factory.mktemp("ood_runs")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        for name, extra in RUNS.items():
            cfg = load_config(TINY, [*SIX_TRAIN_FOUR, f"train.output_dir={root}", f"train.run_name={name}",
                                     "train.max_steps=3", *extra])
            out[name] = run(cfg).run_dir
    return out


def _ood(argv, capsys) -> tuple:
    from simclr_tau.cli import main

    main(["ood", *argv])
    return capsys.readouterr().out


@pytest.mark.parametrize("name", ["conditional", "conditional-dro"])
def test_conditional_tau_run_gets_tau_aurocs_that_match_an_independent_computation(runs, name, capsys) -> None:
    from simclr_tau.data.augment import eval_transform
    from simclr_tau.data.datasets import build_eval_datasets
    from simclr_tau.evaluation.diagnostics import load_method
    from simclr_tau.models.export import load_encoder

    run_dir = runs[name]
    printed = _ood([str(run_dir)], capsys)
    data = json.loads((run_dir / "eval" / "ood.json").read_text())
    assert data["id_classes"] == [0, 1, 2, 3] and data["ood_classes"] == [4, 5]
    assert data["ood_class_names"] == ["class4", "class5"]
    assert data["n_id"] == 16 and data["n_ood"] == 8 and data["k"] == 20
    assert data["auroc_tau_reason"] is None
    for key in ("auroc_knn_distance", "auroc_tau", "auroc_tau_id_error"):
        assert 0.0 <= data[key] <= 1.0
    assert 0.0 <= data["knn_top1_id"] <= 100.0
    # recompute: τ from the checkpoint's τ head, distances from the exported encoder, by brute force
    cfg = load_config(run_dir / "config.yaml")
    full = load_config(run_dir / "config.yaml", ["data.classes=null"])
    train, _ = build_eval_datasets(cfg.data)
    _, test = build_eval_datasets(full.data)
    encoder, meta = load_encoder(run_dir / "encoder.safetensors")
    tf = eval_transform(16, 1, meta["mean"], meta["std"])
    m = load_method(run_dir, cfg, 1)
    with torch.no_grad():
        tau = m.temperature(m.projector(m.encoder(tf(test.images))))
        f_train, f_test = F.normalize(encoder(tf(train.images)), dim=1), F.normalize(encoder(tf(test.images)), dim=1)
    dist = 1 - (f_test @ f_train.T).sort(dim=1, descending=True).values[:, 19]
    is_ood = test.labels >= 4
    assert tau.std() > 0  # the τ head moved: the AUROC is not the all-ties 0.5
    assert data["auroc_tau"] == pytest.approx(auroc(tau, is_ood), abs=1e-6)
    assert data["auroc_knn_distance"] == pytest.approx(auroc(dist, is_ood), abs=1e-6)
    with torch.no_grad():
        tau_train = m.temperature(m.projector(m.encoder(tf(train.images))))
    loo_wrong = ~brute_force_loo_correct(f_train, train.labels, 20, 0.07, 4)
    assert data["train_leave_one_out"]["auroc_tau_error"] == pytest.approx(auroc(tau_train, loo_wrong), abs=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ood/auroc_tau"] == pytest.approx(data["auroc_tau"])
    assert summary["ood/auroc_knn_distance_k20"] == pytest.approx(data["auroc_knn_distance"])
    assert summary["ood/knn_top1_id_k20_t0.07"] == pytest.approx(data["knn_top1_id"])
    label = "τ_i (conditional, dro)" if name == "conditional-dro" else "τ_i (conditional)"
    assert "kNN distance, k=20" in printed and label in printed and "wrote" in printed


@pytest.mark.parametrize("name, reason", [("fixed", "temperature.mode=fixed: no per-sample τ"),
                                          ("dro-per-sample", "n/a (τ_i exists only for training images)")])
def test_runs_without_tau_for_unseen_images_report_null_with_the_reason(runs, name, reason, capsys) -> None:
    run_dir = runs[name]
    printed = _ood([str(run_dir), "--k", "10", "--out", str(run_dir / "ood_k10")], capsys)
    data = json.loads((run_dir / "ood_k10" / "ood.json").read_text())
    assert data["auroc_tau"] is None and data["auroc_tau_id_error"] is None and data["auroc_tau_reason"] == reason
    assert 0.0 <= data["auroc_knn_distance"] <= 1.0 and data["k"] == 10
    assert reason in printed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "ood/auroc_knn_distance_k10" in summary and "ood/auroc_tau" not in summary
    loo = data["train_leave_one_out"]
    if name == "fixed":
        assert loo["auroc_tau_error"] is None and loo["auroc_tau_reason"] == reason
    else:  # the table's τ_i of the training images, against their leave-one-out kNN errors
        from simclr_tau.data.datasets import build_eval_datasets
        from simclr_tau.models.export import load_encoder
        from simclr_tau.train.checkpoint import list_checkpoints, load_checkpoint

        cfg = load_config(run_dir / "config.yaml")
        train, _ = build_eval_datasets(cfg.data)
        table = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["model"]["temperature.tau"]
        encoder, meta = load_encoder(run_dir / "encoder.safetensors")
        from simclr_tau.data.augment import eval_transform

        with torch.no_grad():
            f_train = encoder(eval_transform(16, 1, meta["mean"], meta["std"])(train.images))
        wrong = ~brute_force_loo_correct(f_train, train.labels, 10, 0.07, 4)
        assert table.shape == (64,) and loo["auroc_tau_reason"] is None
        assert loo["auroc_tau_error"] == pytest.approx(auroc(table, wrong), abs=1e-6)
        assert summary["ood/auroc_tau_train_error"] == pytest.approx(loo["auroc_tau_error"])


def test_raw_pixels_separate_the_held_out_patterns(tmp_path, capsys) -> None:
    """Synthetic classes are distinct smooth patterns: held-out ones are far from every training image in pixel
    space, a case built to be separable."""
    _ood(["pixels", "--config", TINY, *SIX_TRAIN_FOUR, "data.synthetic_size=240", "--out", str(tmp_path)], capsys)
    data = json.loads((tmp_path / "ood.json").read_text())
    assert data["n_ood"] == 20 and data["auroc_knn_distance"] > 0.9
    assert data["auroc_tau_reason"] == "no temperature head (pixels / random init)"


@pytest.mark.parametrize("argv, message", [
    (["pixels", "--config", TINY, "data.synthetic_classes=6"], "data.classes is not set"),
    (["pixels", "--config", TINY, "data.synthetic_classes=6", "data.classes=[0,1,2,3,4,5]"], "none is held out"),
])
def test_user_errors_are_one_line(argv, message, capsys) -> None:
    from simclr_tau.cli import main

    with pytest.raises(SystemExit) as e:
        main(["ood", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


def test_changing_the_classes_of_a_run_is_refused(runs, capsys) -> None:
    from simclr_tau.cli import main

    with pytest.raises(SystemExit) as e:
        main(["ood", str(runs["fixed"]), "data.classes=[0,1,2,4]"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "pretrained on data.classes=[0, 1, 2, 3]" in err


def test_help_is_reached_through_simclr_tau(capsys) -> None:
    from simclr_tau.cli import main

    with pytest.raises(SystemExit) as e:
        main(["ood", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: simclr-tau ood ") and "--k" in out
