"""Weighted k-nearest-neighbour classification of frozen features with FAISS.

Protocol (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination";
Caron et al. 2021, DINO): features are L2-normalized, the k training samples of highest cosine
similarity s_j to a query are found with an inner-product index, and each votes for its class with
weight exp(s_j / T):

    score_c(q) = Σ_{j ∈ top-k(q)} exp(s_j / T) · [y_j = c]          prediction = argmax_c score_c

Defaults report DINO's (k=20, T=0.07) and InstDisc's (k=200, T=0.1), top-1 and top-5 in percent.
With ``weighted=False`` every neighbour has weight 1 (majority vote); ties between classes go to the
smallest class index, as scikit-learn's ``KNeighborsClassifier(weights='uniform')`` does.
Ranking for top-5 is a stable descending sort of the scores (ties -> smaller class first).

Indexes: ``flat`` (exact, ``IndexFlatIP``), ``ivf`` (``IndexIVFFlat``, ``nlist`` cells, ``nprobe`` probed;
exact when ``nprobe == nlist``), ``hnsw`` (``IndexHNSWFlat``, approximate).

Example:
    >>> import torch
    >>> train = torch.eye(3).repeat(2, 1); labels = torch.tensor([0, 1, 2, 0, 1, 2])
    >>> knn_classify(train, labels, torch.tensor([[1.0, 0.1, 0.0]]), k=2, T=0.1, num_classes=3).argmax(1)
    tensor([0])
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from simclr_tau.errors import UserError

INDEXES = ("flat", "ivf", "hnsw")
DEFAULT_K = (20, 200)
DEFAULT_T = (0.07, 0.1)


def metric_suffix(k: int, T: Optional[float], weighted: bool = True) -> str:
    """``k20_t0.07`` (weighted) or ``k20_vote`` (majority vote): the key of one kNN setting."""
    return f"k{k}_t{T:g}" if weighted else f"k{k}_vote"


def _as_float32_numpy(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(F.normalize(x.detach().float().cpu(), dim=1).numpy())


def build_index(train: np.ndarray, index: str = "flat", nlist: int = 100, nprobe: int = 10, hnsw_m: int = 32,
                ef_search: int = 128) -> Any:
    """A FAISS inner-product index over the (already L2-normalized) rows of ``train``."""
    import faiss

    d = train.shape[1]
    if index == "flat":
        idx = faiss.IndexFlatIP(d)
    elif index == "ivf":
        nlist = max(1, min(nlist, train.shape[0]))
        quantizer = faiss.IndexFlatIP(d)
        idx = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        idx.train(train)
        idx.nprobe = min(nprobe, nlist)
    elif index == "hnsw":
        idx = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efSearch = ef_search
    else:
        raise UserError(f"knn index={index!r} is not valid; accepted: {', '.join(INDEXES)}")
    idx.add(train)
    return idx


def knn_search(train_feats: Tensor, query_feats: Tensor, k: int, index: str = "flat", **index_kwargs: Any
               ) -> Tuple[Tensor, Tensor]:
    """Cosine similarities (Q, k) (descending) and indices (Q, k) of each query's k nearest training rows.

    Missing neighbours (an approximate index that found fewer than k) have index -1 and similarity -inf.
    """
    n = int(train_feats.shape[0])
    if k < 1:
        raise UserError(f"knn k={k} must be >= 1")
    if k > n:
        raise UserError(f"knn k={k} is larger than the training set ({n} samples); use a smaller --k")
    if train_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(f"train and query features differ in width: {train_feats.shape[1]} vs {query_feats.shape[1]}")
    train, query = _as_float32_numpy(train_feats), _as_float32_numpy(query_feats)
    idx = build_index(train, index, **index_kwargs)
    sims, nn_idx = idx.search(query, k)  # Q x k each, sorted by decreasing similarity
    sims_t, idx_t = torch.from_numpy(sims).double(), torch.from_numpy(nn_idx).long()
    sims_t[idx_t < 0] = -math.inf
    return sims_t, idx_t


def vote(sims: Tensor, nn_idx: Tensor, train_labels: Tensor, k: int, T: Optional[float], num_classes: int,
         weighted: bool = True) -> Tensor:
    """Class scores (Q, C) from the first k columns of a :func:`knn_search` result (float64)."""
    sims, nn_idx = sims[:, :k], nn_idx[:, :k]
    valid = nn_idx >= 0
    labels = train_labels.long().cpu()[nn_idx.clamp_min(0)]  # Q x k
    if weighted:
        if T is None or not T > 0:
            raise UserError(f"knn T={T} must be > 0 for the weighted vote")
        w = torch.exp(sims / T)  # float64: exp(1/0.01) still fits
    else:
        w = torch.ones_like(sims)
    w = torch.where(valid, w, torch.zeros_like(w))
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64)
    return scores.scatter_add_(1, labels, w)  # Q x C


def knn_classify(train_feats: Tensor, train_labels: Tensor, query_feats: Tensor, k: int, T: Optional[float],
                 num_classes: int, weighted: bool = True, index: str = "flat", **index_kwargs: Any) -> Tensor:
    """Weighted (exp(s/T)) or majority-vote kNN scores (Q, C); ``scores.argmax(1)`` is the prediction."""
    sims, nn_idx = knn_search(train_feats, query_feats, k, index, **index_kwargs)
    return vote(sims, nn_idx, train_labels, k, T, num_classes, weighted)


def ranked_classes(scores: Tensor) -> Tensor:
    """Classes by decreasing score, ties broken toward the smaller class index (stable sort)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def topk_correct(scores: Tensor, labels: Tensor, k: int) -> Tensor:
    """Bool (Q,): the true label is among the k best-ranked classes."""
    k = min(k, scores.shape[1])
    return (ranked_classes(scores)[:, :k] == labels.long().view(-1, 1)).any(dim=1)


def _num_classes(*labels: Tensor) -> int:
    return int(max(int(l.max()) for l in labels if l.numel())) + 1


def knn_eval(
    train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
    ks: Sequence[int] = DEFAULT_K, Ts: Sequence[Optional[float]] = DEFAULT_T, num_classes: Optional[int] = None,
    weighted: bool = True, index: str = "flat", **index_kwargs: Any,
) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (percent) for each (k, T) pair: ``{"top1_k20_t0.07": ..., "top5_k20_t0.07": ...}``.

    One index search with max(k); each setting reads its first k neighbours.
    """
    ks = [int(k) for k in ks]
    Ts = list(Ts) if weighted else [None] * len(ks)
    if len(ks) != len(Ts):
        raise UserError(f"knn: {len(ks)} values of k but {len(Ts)} values of T (give one T per k)")
    if not ks:
        raise UserError("knn: no k given")
    C = num_classes if num_classes is not None else _num_classes(train_labels, test_labels)
    sims, nn_idx = knn_search(train_feats, test_feats, max(ks), index, **index_kwargs)
    out: Dict[str, float] = {}
    for k, T in zip(ks, Ts):
        scores = vote(sims, nn_idx, train_labels, k, T, C, weighted)
        key = metric_suffix(k, T, weighted)
        out[f"top1_{key}"] = 100.0 * topk_correct(scores, test_labels, 1).double().mean().item()
        out[f"top5_{key}"] = 100.0 * topk_correct(scores, test_labels, 5).double().mean().item()
    return out


def online_knn(
    encoder: torch.nn.Module, train_ds: Any, test_ds: Any, transform: Callable, k: int | Sequence[int] = 20,
    T: float | Sequence[float] = 0.07, subset: Optional[int] = None, accelerator: Any = None,
    batch_size: int = 512, seed: int = 0,
) -> Dict[str, float]:
    """kNN accuracy and RankMe of the current encoder during training:
    ``{"knn/top1_k20_t0.07": ..., "knn/top5_k20_t0.07": ..., ..., "rankme": ...}``.

    The first value is the first setting's top-1 (a plateau τ schedule monitors it); ``"rankme"`` comes
    last: :func:`simclr_tau.evaluation.rankme.rankme` of the test split's features, the raw encoder output
    that the kNN queries are made of (the kNN L2-normalizes its own copy), so no second pass is needed.
    ``subset``: use a fixed random subset (seeded) of that many training images as the memory bank.
    The encoder's train/eval mode is restored. Every process returns the same numbers (the features are
    gathered on every process).
    """
    from torch.utils.data import Subset

    from simclr_tau.evaluation.features import extract_features
    from simclr_tau.evaluation.rankme import rankme

    ks = [k] if isinstance(k, int) else list(k)
    Ts = [T] * len(ks) if isinstance(T, (int, float)) else list(T)
    bank = train_ds
    if subset is not None and subset < len(train_ds):
        g = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(train_ds), generator=g)[:subset].sort().values
        bank = Subset(train_ds, chosen.tolist())
        images = getattr(train_ds, "images", None)
        if images is not None:  # keep the fast batched path of in-memory datasets
            from simclr_tau.data.datasets import TensorImageDataset

            bank = TensorImageDataset(images[chosen], train_ds.labels[chosen], train_ds.classes)
    tr_f, tr_y = extract_features(encoder, bank, transform, batch_size, accelerator)
    te_f, te_y = extract_features(encoder, test_ds, transform, batch_size, accelerator)
    C = getattr(test_ds, "num_classes", None) or _num_classes(tr_y, te_y)
    res = knn_eval(tr_f, tr_y, te_f, te_y, ks, Ts, num_classes=C)
    out = {f"knn/{name}": v for name, v in res.items()}
    out["rankme"] = rankme(te_f)  # last: the first key stays a top-1
    return out
