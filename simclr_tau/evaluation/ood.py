"""Out-of-distribution scores of a frozen encoder, and the AUROC that rates any score.

The question (issue 17): pretrain on some classes (``data.classes``), hold the others out, and ask whether a
per-sample τ_i says "this image is unlike the training data" — and whether it says "the kNN will get this one
wrong" on in-distribution images. Every score here follows one convention: **larger = more out-of-distribution
(more uncertain)**, and its AUROC is reported as is: 1 = every positive scores above every negative, 0.5 = no
signal, < 0.5 = the score points the opposite way (never flipped after the fact).

- kNN distance (the baseline; Sun et al. 2022, "Out-of-Distribution Detection with Deep Nearest Neighbors"):
  d(x) = 1 − cos(f(x), f_k), f_k the k-th nearest L2-normalized training feature (k = 20). On unit vectors
  ‖a − b‖² = 2 − 2 cos(a, b), so this ranks images exactly as the paper's Euclidean k-th-neighbour distance.
- τ_i of the run's τ network (``temperature.mode=conditional``, either objective), as is: a high τ flattens
  the image's softmax over negatives, the "uncertain" end (TaU, Zhang et al. 2021).

Positives: held-out-class test images (OOD), or in-distribution test images the weighted kNN (k, T)
misclassifies (ID errors). A τ table (the per-sample dro τ) exists for training images only, so for it the one
in-distribution question left is asked on the training set (:func:`train_error_report`): the leave-one-out
kNN errors, each training image voted by its k nearest *other* training images.

Example:
    >>> import torch
    >>> auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True]))
    0.75
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from simclr_tau.errors import UserError
from simclr_tau.evaluation.knn import knn_search, topk_correct, vote

# Convention, stated once for readers of eval/ood.json.
SCORE_CONVENTION = ("larger = more out-of-distribution / uncertain; kNN distance = 1 - cosine similarity to the k-th "
                    "nearest training feature (L2-normalized); tau = the run's per-image tau as is (high = uncertain); "
                    "AUROC 1 = positives all above, 0.5 = no signal, < 0.5 = the opposite direction")


def auroc(scores: Tensor, is_positive: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``is_positive``: the Mann–Whitney statistic
    U / (n₊ n₋) = P(score of a positive > score of a negative) + ½ P(equal), with ties given their average rank.
    NaN when either class is empty.

    Written here because scikit-learn (``roc_auc_score``) is a test dependency only, not a runtime one; the
    rank formula is O(n log n) and tested against the O(n₊ n₋) pairwise definition, ties included.
    """
    s, p = scores.double().flatten(), is_positive.bool().flatten()
    if s.shape != p.shape:
        raise ValueError(f"auroc: {s.numel()} scores but {p.numel()} labels")
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # average ranks (1-based) with ties sharing their mean rank
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    _, inverse, counts = torch.unique_consecutive(s[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    u = ranks[p].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def knn_distance(train_feats: Tensor, query_feats: Tensor, k: int = 20) -> Tensor:
    """(Q,) 1 − cosine similarity of each query to its k-th nearest training feature (FAISS, exact)."""
    sims, _ = knn_search(train_feats, query_feats, k)
    return 1.0 - sims[:, k - 1]


def _rated(scores: Tensor, positives: Tensor) -> Optional[float]:
    a = auroc(scores, positives)
    return None if a != a else a  # NaN (no positives or no negatives) -> null in the JSON


def ood_report(train_feats: Tensor, train_labels: Tensor, id_feats: Tensor, id_labels: Tensor, ood_feats: Tensor,
               num_classes: int, k: int = 20, T: float = 0.07, tau_id: Optional[Tensor] = None,
               tau_ood: Optional[Tensor] = None) -> Dict[str, Any]:
    """The OOD and ID-error AUROCs of the kNN distance and (when given) of τ, with the ID kNN top-1.

    ``id_labels`` are in the training labels' numbering (``data.classes`` relabelled); ``tau_id`` / ``tau_ood``
    are per-image τ of the ID / OOD images, or None when the run has no τ for unseen images. Keys ending in
    ``_id_error`` rate the score for the ID images the weighted kNN (k, T) misclassifies.
    """
    n_id, n_ood = int(id_feats.shape[0]), int(ood_feats.shape[0])
    if n_id == 0 or n_ood == 0:
        raise UserError(f"OOD evaluation needs in- and out-of-distribution test images; got {n_id} and {n_ood}")
    if (tau_id is None) != (tau_ood is None):
        raise ValueError("give τ of both the ID and the OOD images, or of neither")
    sims, idx = knn_search(train_feats, torch.cat([id_feats, ood_feats]), k)  # (n_id + n_ood, k), one search
    dist = 1.0 - sims[:, k - 1]
    is_ood = torch.cat([torch.zeros(n_id, dtype=torch.bool), torch.ones(n_ood, dtype=torch.bool)])
    correct = topk_correct(vote(sims[:n_id], idx[:n_id], train_labels, k, T, num_classes), id_labels, 1)
    wrong = ~correct
    out: Dict[str, Any] = {
        "n_id": n_id, "n_ood": n_ood, "k": k, "T": T,
        "knn_top1_id": 100.0 * correct.double().mean().item(), "n_knn_errors_id": int(wrong.sum()),
        "auroc_knn_distance": _rated(dist, is_ood),
        "auroc_knn_distance_id_error": _rated(dist[:n_id], wrong),
        "knn_distance_mean": {"id": float(dist[:n_id].mean()), "ood": float(dist[n_id:].mean())},
        "auroc_tau": None, "auroc_tau_id_error": None, "tau_mean": None,
    }
    if tau_id is not None and tau_ood is not None:
        tau = torch.cat([tau_id.flatten(), tau_ood.flatten()]).double()
        if tau.numel() != n_id + n_ood:
            raise ValueError(f"τ of {tau.numel()} images for {n_id + n_ood} test images")
        out.update(auroc_tau=_rated(tau, is_ood), auroc_tau_id_error=_rated(tau[:n_id], wrong),
                   tau_mean={"id": float(tau[:n_id].mean()), "ood": float(tau[n_id:].mean()),
                             "id_correct": float(tau[:n_id][correct].mean()) if correct.any() else None,
                             "id_error": float(tau[:n_id][wrong].mean()) if wrong.any() else None})
    return out


def leave_one_out_search(feats: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Each row's k nearest *other* rows of ``feats``: similarities (N, k) and indices (N, k), descending."""
    n = int(feats.shape[0])
    if k + 1 > n:
        raise UserError(f"knn k={k} needs at least {k + 1} training images for a leave-one-out search; got {n}")
    sims, idx = knn_search(feats, feats, k + 1)
    drop = idx == torch.arange(n).view(-1, 1)  # the image itself, wherever ties placed it
    drop[~drop.any(dim=1), -1] = True  # an exact duplicate pushed it out of the k + 1: drop the farthest
    return sims[~drop].view(n, k), idx[~drop].view(n, k)


def train_error_report(train_feats: Tensor, train_labels: Tensor, num_classes: int, k: int = 20, T: float = 0.07,
                       tau: Optional[Tensor] = None) -> Dict[str, Any]:
    """AUROC of the leave-one-out kNN distance and (when given) of τ_i for the leave-one-out kNN errors on the
    training images, with that kNN's top-1."""
    sims, idx = leave_one_out_search(train_feats, k)
    correct = topk_correct(vote(sims, idx, train_labels, k, T, num_classes), train_labels, 1)
    out: Dict[str, Any] = {
        "n": int(train_feats.shape[0]), "knn_top1": 100.0 * correct.double().mean().item(),
        "n_knn_errors": int((~correct).sum()), "auroc_knn_distance_error": _rated(1.0 - sims[:, k - 1], ~correct),
        "auroc_tau_error": None,
    }
    if tau is not None:
        if tau.numel() != out["n"]:
            raise ValueError(f"τ of {tau.numel()} images for {out['n']} training images")
        out["auroc_tau_error"] = _rated(tau.flatten(), ~correct)
    return out
