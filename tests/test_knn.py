"""kNN evaluation against a brute-force torch reference and scikit-learn, approximate indexes, the
feature cache, distributed feature extraction with real processes, and online kNN."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from simclr_tau.data.augment import eval_transform
from simclr_tau.data.datasets import TensorImageDataset, make_synthetic
from simclr_tau.errors import UserError
from simclr_tau.evaluation.features import (
    PixelEncoder, cache_key, cached_features, dataset_identity, extract_features, module_digest,
)
from simclr_tau.evaluation.knn import knn_classify, knn_eval, online_knn, ranked_classes

REPO = Path(__file__).resolve().parents[1]


def reference_knn_scores(train: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, k: int, T: float | None,
                         num_classes: int) -> torch.Tensor:
    """Slow, obviously correct: all cosine similarities, full sort, first k, vote exp(s/T) (or 1) per neighbour."""
    t = F.normalize(train.double(), dim=1)
    q = F.normalize(query.double(), dim=1)
    scores = torch.zeros(len(q), num_classes, dtype=torch.float64)
    for i in range(len(q)):
        sims = t @ q[i]  # N
        order = torch.sort(sims, descending=True).indices[:k]
        for j in order.tolist():
            w = 1.0 if T is None else float(torch.exp(sims[j] / T))
            scores[i, labels[j]] += w
    return scores


def _random_problem(n=300, q=60, d=16, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g), torch.randn(q, d, generator=g),
            torch.randint(0, c, (q,), generator=g), c)


@pytest.mark.parametrize("k,T", [(1, 0.07), (5, 0.07), (20, 0.07), (20, 0.5), (200, 0.1)])
def test_weighted_knn_matches_bruteforce(k, T):
    train, labels, query, qlabels, c = _random_problem()
    ours = knn_classify(train, labels, query, k, T, c)
    ref = reference_knn_scores(train, labels, query, k, T, c)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=0.0)
    assert torch.equal(ours.argmax(1), ref.argmax(1))
    # top-5 sets: identical rankings of the reference scores
    assert torch.equal(ranked_classes(ours)[:, :5].sort(1).values, ranked_classes(ref)[:, :5].sort(1).values)


def test_knn_eval_reports_reference_top1_top5():
    train, labels, query, qlabels, c = _random_problem(seed=1)
    res = knn_eval(train, labels, query, qlabels, ks=(10, 50), Ts=(0.07, 0.2), num_classes=c)
    for k, T in ((10, 0.07), (50, 0.2)):
        ref = reference_knn_scores(train, labels, query, k, T, c)
        order = torch.sort(ref, dim=1, descending=True, stable=True).indices
        top1 = 100.0 * (order[:, 0] == qlabels).double().mean().item()
        top5 = 100.0 * (order[:, :5] == qlabels[:, None]).any(1).double().mean().item()
        assert res[f"top1_k{k}_t{T:g}"] == pytest.approx(top1, abs=1e-9)
        assert res[f"top5_k{k}_t{T:g}"] == pytest.approx(top5, abs=1e-9)
    assert set(res) == {"top1_k10_t0.07", "top5_k10_t0.07", "top1_k50_t0.2", "top5_k50_t0.2"}


@pytest.mark.parametrize("k", [1, 2, 4, 7, 10])
def test_majority_vote_matches_sklearn(k):
    from sklearn.neighbors import KNeighborsClassifier

    train, labels, query, _, c = _random_problem(n=200, q=150, d=8, c=5, seed=2)  # continuous: no distance ties
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(train.numpy(), labels.numpy())
    expected = torch.from_numpy(clf.predict(query.numpy()))
    scores = knn_classify(train, labels, query, k, None, c, weighted=False)
    assert torch.equal(scores.argmax(1), expected)
    if k in (2, 4):  # even k: class-count ties happen, so the tie rule (smallest class) is exercised
        top = scores.max(1, keepdim=True).values
        assert ((scores == top).sum(1) > 1).any()


def test_ivf_probing_every_cell_is_exact_and_hnsw_close():
    train, labels, query, _, c = _random_problem(n=400, q=80, seed=3)
    flat = knn_classify(train, labels, query, 10, 0.1, c)
    ivf = knn_classify(train, labels, query, 10, 0.1, c, index="ivf", nlist=8, nprobe=8)
    torch.testing.assert_close(ivf, flat, rtol=1e-5, atol=0.0)
    hnsw = knn_classify(train, labels, query, 10, 0.1, c, index="hnsw")
    assert (hnsw.argmax(1) == flat.argmax(1)).double().mean() >= 0.95


def test_k_larger_than_train_is_a_user_error():
    train, labels, query, _, c = _random_problem(n=30)
    with pytest.raises(UserError, match=r"k=31 is larger than the training set \(30 samples\)"):
        knn_classify(train, labels, query, 31, 0.1, c)


# ---- features --------------------------------------------------------------------------------------

class CountingEncoder(nn.Module):
    """A tiny conv encoder that counts how many images it encoded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.images_seen = 0

    def forward(self, x):
        self.images_seen += x.shape[0]
        return self.net(x)


def _split(ds, n_train):
    return (TensorImageDataset(ds.images[:n_train], ds.labels[:n_train], ds.classes),
            TensorImageDataset(ds.images[n_train:], ds.labels[n_train:], ds.classes))


def test_extract_features_order_mode_and_dtype():
    ds = make_synthetic(23, 3, 8)
    enc = CountingEncoder().train()
    f, y = extract_features(enc, ds, eval_transform(8, 1, [0.5], [0.25]), batch_size=5)
    assert f.dtype == torch.float32 and f.shape == (23, 16) and torch.equal(y, ds.labels)
    assert enc.training  # restored
    enc.eval()
    with torch.no_grad():
        one = enc(eval_transform(8, 1, [0.5], [0.25])(ds.images[7])[None])[0]
    torch.testing.assert_close(f[7], one)


def test_feature_cache_hits_and_keys(tmp_path):
    ds = make_synthetic(40, 4, 8)
    other = make_synthetic(40, 4, 8, seed=5)
    enc = CountingEncoder()
    tf = eval_transform(8, 1, [0.5], [0.25])
    tid = {"kind": "eval", "image_size": 8, "mean": [0.5], "std": [0.25]}
    eid = "module:" + module_digest(enc)
    did = dataset_identity(ds, "synthetic", "data", "train")
    kw = dict(cache_dir=tmp_path, encoder_id=eid, batch_size=16)
    f1, y1, hit1 = cached_features(enc, ds, tf, dataset_id=did, transform_id=tid, **kw)
    seen = enc.images_seen
    f2, y2, hit2 = cached_features(enc, ds, tf, dataset_id=did, transform_id=tid, **kw)
    assert (hit1, hit2) == (False, True)
    assert seen == 40 and enc.images_seen == 40  # the second call never ran the encoder
    assert torch.equal(f1, f2) and torch.equal(y1, y2)
    assert len(list(tmp_path.glob("train-*.pt"))) == 1
    # anything that changes the features changes the key
    base = cache_key(eid, did, tid)
    assert cache_key(eid, dataset_identity(other, "synthetic", "data", "train"), tid) != base
    assert cache_key(eid, dataset_identity(ds, "synthetic", "data", "test"), tid) != base
    assert cache_key(eid, did, {**tid, "mean": [0.4]}) != base
    with torch.no_grad():
        enc.net[0].weight.add_(1.0)
    assert cache_key("module:" + module_digest(enc), did, tid) != base
    _, _, hit3 = cached_features(enc, ds, eval_transform(8, 1, [0.4], [0.25]), dataset_id=did,
                                 transform_id={**tid, "mean": [0.4]}, **kw)
    assert not hit3 and enc.images_seen == 80


def test_online_knn_with_pixels_beats_chance():
    train, test = _split(make_synthetic(240, 4, 12), 180)
    tf = eval_transform(12, 1, [0.5], [0.25])
    res = online_knn(PixelEncoder(), train, test, tf, k=5, T=0.1)
    assert set(res) == {"knn/top1_k5_t0.1", "knn/top5_k5_t0.1", "rankme"}
    assert res["knn/top1_k5_t0.1"] > 60.0  # chance is 25%
    sub = online_knn(PixelEncoder(), train, test, tf, k=[5, 20], T=[0.07, 0.1], subset=60)
    assert sub["knn/top1_k20_t0.1"] > 40.0
    with pytest.raises(UserError, match="k=61"):
        online_knn(PixelEncoder(), train, test, tf, k=61, T=0.1, subset=60)


@pytest.mark.slow
def test_distributed_extraction_matches_single_process(tmp_path):
    """Two real gloo processes, 37 samples in batches of 4: padded duplicates are dropped, order is kept."""
    script = tmp_path / "mp.py"
    script.write_text(textwrap.dedent("""
        import sys, torch
        from accelerate import Accelerator
        from simclr_tau.data.augment import eval_transform
        from simclr_tau.data.datasets import make_synthetic
        from simclr_tau.evaluation.features import extract_features
        torch.manual_seed(0)
        enc = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
        ds = make_synthetic(37, 3, 8)
        acc = Accelerator(cpu=True)
        tf = eval_transform(8, 1, [0.5], [0.25])
        f, y = extract_features(enc, ds, tf, batch_size=4, accelerator=acc)
        ref, _ = extract_features(enc, ds, tf, batch_size=64)
        assert acc.num_processes == 2
        assert f.shape == ref.shape and torch.equal(y, ds.labels), (f.shape, y)
        assert torch.allclose(f, ref, atol=1e-6)
        open(sys.argv[1] + f"/rank{acc.process_index}.ok", "w").close()
        torch.distributed.destroy_process_group()  # a group left to the interpreter's exit can abort ("terminate called")
    """))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "rank0.ok").is_file() and (tmp_path / "rank1.ok").is_file()  # both ranks passed the checks
