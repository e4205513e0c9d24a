"""Held-out classes as out-of-distribution: the AUROC against its pairwise definition (ties included), the
kNN distance and the leave-one-out kNN against brute force, the report on hand-made features."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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
