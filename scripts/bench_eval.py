"""Benchmarks of the evaluation code, every figure measured in one run of this script.

    python scripts/bench_eval.py knn       [--n-train 60000 --n-query 10000 --dim 512 --k 20]
    python scripts/bench_eval.py probe     [--root /usr/share/datasets/fashion-mnist --n 5000 --epochs 1]
    python scripts/bench_eval.py full      [--root ... --n 5000 --encoder runs/x/encoder.safetensors]
    python scripts/bench_eval.py baselines [--root ...]          (Fashion-MNIST raw-pixel baselines)
    python scripts/bench_eval.py all       [...]

knn:       FAISS IndexFlatIP kNN vs scikit-learn brute-force KNeighborsClassifier (cosine) on random
           features: time to neighbours + predictions for all queries, and their agreement.
probe:     time per epoch of the linear probe on cached features vs the augmented probe (random-resized
           crop + flip re-encoded by the frozen encoder every epoch), on Fashion-MNIST (--n training images).
full:      one evaluation of an encoder (default: random-init resnet10t, small stem) on Fashion-MNIST:
           features of train + test, kNN (k=20/200), cached-feature linear probe (L-BFGS grid) + calibration.
baselines: Xiao et al. 2017 (Fashion-MNIST paper, Table 3 / benchmark/runner.py) classical baselines on
           raw pixels with the benchmark's preprocessing (StandardScaler fitted on train), scikit-learn:
           KNeighborsClassifier(n_neighbors=5, p=1, weights='distance')  [paper: 0.854]
           LogisticRegression(C=1, penalty='l1', one-vs-rest, liblinear)  [paper: 0.842]
           plus our evaluator on pixels in [0, 1]: majority-vote cosine kNN (k=5) and the L-BFGS probe.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, installed or not (as bench_train.py)

FMNIST = "/usr/share/datasets/fashion-mnist"


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_knn(args: argparse.Namespace) -> Dict[str, float]:
    import faiss
    from sklearn.neighbors import KNeighborsClassifier

    from simclr_tau.evaluation.knn import knn_classify

    g = torch.Generator().manual_seed(0)
    c = 10
    train = torch.randn(args.n_train, args.dim, generator=g)
    labels = torch.randint(0, c, (args.n_train,), generator=g)
    query = torch.randn(args.n_query, args.dim, generator=g)
    faiss.omp_set_num_threads(torch.get_num_threads())
    scores, t_faiss = _timed(lambda: knn_classify(train, labels, query, args.k, None, c, weighted=False))
    clf = KNeighborsClassifier(n_neighbors=args.k, metric="cosine", algorithm="brute")
    pred, t_sk = _timed(lambda: clf.fit(train.numpy(), labels.numpy()).predict(query.numpy()))
    agree = (scores.argmax(1).numpy() == pred).mean()
    print(f"[knn] {args.n_train} x {args.dim} train, {args.n_query} queries, k={args.k}, {torch.get_num_threads()} threads")
    print(f"[knn] faiss IndexFlatIP: {t_faiss:.2f} s   sklearn brute (cosine): {t_sk:.2f} s   "
          f"speed-up x{t_sk / t_faiss:.1f}   prediction agreement {100 * agree:.2f}%")
    return {"faiss_s": t_faiss, "sklearn_s": t_sk, "speedup": t_sk / t_faiss, "agreement": float(agree)}


def _fmnist(args: argparse.Namespace):
    from simclr_tau.data.datasets import TensorImageDataset, load_fashion_mnist

    train, test = load_fashion_mnist(args.root, "train"), load_fashion_mnist(args.root, "test")
    if args.n:
        train = TensorImageDataset(train.images[: args.n], train.labels[: args.n], train.classes)
        test = TensorImageDataset(test.images[: max(args.n // 6, 100)], test.labels[: max(args.n // 6, 100)], test.classes)
    return train, test


def _encoder(args: argparse.Namespace):
    from simclr_tau.config import load_config
    from simclr_tau.models.encoder import build_encoder
    from simclr_tau.models.export import load_encoder

    if args.encoder:
        enc, meta = load_encoder(args.encoder)
        return enc, meta["image_size"], meta["mean"], meta["std"], args.encoder
    torch.manual_seed(0)
    stem = "small stem" if args.small_stem else "ImageNet stem"
    enc, _ = build_encoder(load_config(None, [f"model.backbone={args.backbone}", f"model.small_stem={args.small_stem}"]).model, 1)
    return enc.eval(), 28, [0.2860], [0.3530], f"random-init {args.backbone} ({stem})"


def bench_probe(args: argparse.Namespace) -> Dict[str, float]:
    from simclr_tau.data.augment import eval_transform
    from simclr_tau.evaluation.features import extract_features
    from simclr_tau.evaluation.linear_probe import ProbeConfig, augmented_view_transform, linear_probe, linear_probe_augmented

    train, test = _fmnist(args)
    enc, size, mean, std, name = _encoder(args)
    tf = eval_transform(size, 1, mean, std)
    (tr_f, tr_y), t_feat_tr = _timed(lambda: extract_features(enc, train, tf, args.batch_size))
    (te_f, te_y), t_feat_te = _timed(lambda: extract_features(enc, test, tf, args.batch_size))
    cfg = ProbeConfig(optimizer="sgd", epochs=args.epochs, lrs=[0.1], wds=[0.0], batch_size=256)
    fast, t_fast = _timed(lambda: linear_probe(tr_f, tr_y, te_f, te_y, 10, cfg))
    aug = augmented_view_transform(size, mean, std)
    slow, t_aug = _timed(lambda: linear_probe_augmented(enc, train, aug, tr_f, tr_y, te_f, te_y, 10, cfg))
    per_fast, per_aug = t_fast / args.epochs, t_aug / args.epochs
    print(f"[probe] {name} on Fashion-MNIST, {len(train)} train / {len(test)} test, {args.epochs} epoch(s), SGD batch 256")
    print(f"[probe] one-off clean features: {t_feat_tr + t_feat_te:.2f} s ({len(train) / t_feat_tr:.0f} img/s)")
    print(f"[probe] cached-feature epoch: {per_fast:.3f} s   augmented epoch: {per_aug:.2f} s   ratio x{per_aug / per_fast:.0f}")
    print(f"[probe] test top-1 after {args.epochs} epoch(s): cached {fast.metrics['test_top1']:.2f}  augmented {slow.metrics['test_top1']:.2f}")
    return {"cached_epoch_s": per_fast, "augmented_epoch_s": per_aug, "ratio": per_aug / per_fast,
            "features_s": t_feat_tr + t_feat_te}


def bench_full(args: argparse.Namespace) -> Dict[str, float]:
    from simclr_tau.data.augment import eval_transform
    from simclr_tau.evaluation.calibration import calibrate
    from simclr_tau.evaluation.features import extract_features
    from simclr_tau.evaluation.knn import knn_eval
    from simclr_tau.evaluation.linear_probe import ProbeConfig, linear_probe

    train, test = _fmnist(args)
    enc, size, mean, std, name = _encoder(args)
    tf = eval_transform(size, 1, mean, std)
    t0 = time.perf_counter()
    tr_f, tr_y = extract_features(enc, train, tf, args.batch_size)
    te_f, te_y = extract_features(enc, test, tf, args.batch_size)
    t1 = time.perf_counter()
    ks = [k for k in (20, 200) if k <= len(train)]
    knn = knn_eval(tr_f, tr_y, te_f, te_y, ks, [0.07, 0.1][: len(ks)], num_classes=10)
    t2 = time.perf_counter()
    probe = linear_probe(tr_f, tr_y, te_f, te_y, 10, ProbeConfig(optimizer="lbfgs"))
    calib = calibrate(probe.val_logits, probe.val_labels, probe.test_logits, probe.test_labels)
    t3 = time.perf_counter()
    n_img = len(train) + len(test)
    print(f"[full] {name}: {len(train)} train / {len(test)} test images")
    print(f"[full] features {t1 - t0:.1f} s ({n_img / (t1 - t0):.0f} img/s)   kNN {t2 - t1:.2f} s   "
          f"linear probe (L-BFGS, {len(probe.metrics['grid'])} wd) + calibration {t3 - t2:.1f} s   total {t3 - t0:.1f} s")
    full_est = (t1 - t0) * 70000 / n_img + (t3 - t1)
    print(f"[full] kNN {', '.join(f'{k}: {v:.2f}' for k, v in knn.items() if k.startswith('top1'))}   "
          f"linear test {probe.metrics['test_top1']:.2f}   ECE {100 * calib['test']['ece_before']:.2f}% -> "
          f"{100 * calib['test']['ece_after']:.2f}% (T={calib['T']:.2f})")
    if args.n:
        print(f"[full] extrapolated to all 70000 images at this feature throughput: ~{full_est / 60:.0f} min")
    return {"features_s": t1 - t0, "knn_s": t2 - t1, "probe_s": t3 - t2, "total_s": t3 - t0}


def bench_baselines(args: argparse.Namespace) -> Dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    from simclr_tau.data.datasets import load_fashion_mnist
    from simclr_tau.evaluation.knn import knn_eval
    from simclr_tau.evaluation.linear_probe import ProbeConfig, linear_probe

    train, test = load_fashion_mnist(args.root, "train"), load_fashion_mnist(args.root, "test")
    x = train.images.flatten(1).float().div(255)  # raw pixels in [0, 1]
    xt = test.images.flatten(1).float().div(255)
    y, yt = train.labels, test.labels
    out: Dict[str, float] = {}
    scaler = StandardScaler().fit(x.numpy())  # the benchmark's preprocessing (benchmark/runner.py)
    xs, xts = scaler.transform(x.numpy()), scaler.transform(xt.numpy())
    if not args.skip_sklearn:
        knn = KNeighborsClassifier(n_neighbors=5, p=1, weights="distance", algorithm="brute", n_jobs=-1)
        acc, t = _timed(lambda: knn.fit(xs, y.numpy()).score(xts, yt.numpy()))
        print(f"[baselines] sklearn KNeighborsClassifier(n_neighbors=5, p=1, weights='distance'), StandardScaler: "
              f"{100 * acc:.2f}%  (paper 85.4)  [{t:.0f} s]")
        out["sklearn_knn5_l1_distance"] = 100 * acc
        import sklearn

        # penalty='l1' is spelled l1_ratio=1 from scikit-learn 1.8 on (the old spelling warns)
        l1 = {"l1_ratio": 1.0} if tuple(int(v) for v in sklearn.__version__.split(".")[:2]) >= (1, 8) else {"penalty": "l1"}
        lr = OneVsRestClassifier(LogisticRegression(C=1.0, solver="liblinear", **l1))
        acc, t = _timed(lambda: lr.fit(xs, y.numpy()).score(xts, yt.numpy()))
        print(f"[baselines] sklearn LogisticRegression(C=1, penalty='l1', one-vs-rest, liblinear), StandardScaler: "
              f"{100 * acc:.2f}%  (paper 84.2)  [{t:.0f} s]")
        out["sklearn_logreg_c1_l1_ovr"] = 100 * acc
    res, t = _timed(lambda: knn_eval(x, y, xt, yt, ks=[5], Ts=[None], num_classes=10, weighted=False))
    print(f"[baselines] ours, majority-vote cosine kNN k=5 on [0,1] pixels: {res['top1_k5_vote']:.2f}%  [{t:.1f} s]")
    out["ours_knn5_vote_cosine"] = res["top1_k5_vote"]
    res, t = _timed(lambda: knn_eval(x, y, xt, yt, ks=[20, 200], Ts=[0.07, 0.1], num_classes=10))
    print(f"[baselines] ours, weighted cosine kNN on [0,1] pixels: k=20,T=0.07 {res['top1_k20_t0.07']:.2f}%  "
          f"k=200,T=0.1 {res['top1_k200_t0.1']:.2f}%  [{t:.1f} s]")
    out.update({f"ours_{k}": v for k, v in res.items() if k.startswith("top1")})
    probe, t = _timed(lambda: linear_probe(x, y, xt, yt, 10, ProbeConfig(optimizer="lbfgs")))
    m = probe.metrics
    print(f"[baselines] ours, L-BFGS softmax probe on [0,1] pixels (standardized, wd chosen on val = {m['chosen']['wd']:g}): "
          f"test {m['test_top1']:.2f}% (val {m['val_top1']:.2f}%)  [{t:.0f} s]")
    out["ours_linear_lbfgs"] = m["test_top1"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("knn", "probe", "full", "baselines", "all"))
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--n-query", type=int, default=10000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--root", default=FMNIST)
    p.add_argument("--n", type=int, default=None, help="Fashion-MNIST: use the first n training images (test: n/6)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--no-small-stem", dest="small_stem", action="store_false",
                   help="random-init backbone with the ImageNet stem (the main job's fmnist_simclr_cpu architecture)")
    p.add_argument("--encoder", default=None, help="an encoder.safetensors to evaluate instead of a random-init backbone")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-sklearn", action="store_true", help="baselines: only our evaluator")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    benches = {"knn": bench_knn, "probe": bench_probe, "full": bench_full, "baselines": bench_baselines}
    for name, fn in benches.items():
        if args.what in (name, "all"):
            fn(args)


if __name__ == "__main__":
    main()
