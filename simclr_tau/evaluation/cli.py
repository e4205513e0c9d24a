"""``simclr-tau knn``, ``simclr-tau linear`` and ``simclr-tau ood``: evaluate a frozen encoder (the command lines;
what a TARGET is: :mod:`simclr_tau.evaluation.targets`, where results go: :mod:`simclr_tau.evaluation.results`).

    simclr-tau knn TARGET [a.b=value ...] [--random-init] [--k 20 200] [--t 0.07 0.1] [--out DIR] [--batch-size N]
    simclr-tau linear TARGET [a.b=value ...] [--mode fast|augmented] [--optimizer sgd|adamw|lbfgs] [--epochs N] ...
    simclr-tau ood TARGET [a.b=value ...] [--k 20] [--t 0.07] [--out DIR]   (a run pretrained with data.classes)
    accelerate launch eval/knn.py TARGET ...            (features sharded over processes)

TARGET is a run directory (config.yaml + encoder.safetensors), an ``encoder.safetensors`` (its run's
config.yaml next to it is used, else ``--config`` YAML or ``--data NAME``), or ``pixels`` (the raw-pixel
baseline; the data come from ``--config`` / ``--data`` / overrides). Overrides ``a.b=value`` apply to the
run's config (e.g. ``data.root=/usr/share/datasets/fashion-mnist``). ``--random-init`` evaluates the same
architecture with fresh seeded weights (the baseline a pretrained encoder must beat).

Outputs: ``<run>/eval/knn.json`` (``knn_random_init.json``), ``<run>/eval/linear.json`` + ``reliability.png``,
``<run>/eval/ood.json`` (the scores: :mod:`simclr_tau.evaluation.ood`),
features cached in ``<run>/eval/cache/``; headline numbers merged into ``<run>/summary.json`` (and the
run's W&B summary) under ``knn/...``, ``diag/...``, ``linear/...``, ``calib/...``, ``ood/...``. Accuracies are percent.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from simclr_tau.config.ranges import KNN_ARGS, LINEAR_ARGS, check_args
from simclr_tau.errors import UserError, exit_on_user_error
from simclr_tau.evaluation.results import update_run_summary, write_json
from simclr_tau.evaluation.targets import Target, load_data, resolve_target, target_features
from simclr_tau.fileio import check_writable_dir


def _accelerator() -> Any:
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="run directory, encoder.safetensors, or 'pixels'")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value (e.g. data.root=...)")
    p.add_argument("--config", default=None, help="YAML config for the data (encoder files outside a run, pixels)")
    p.add_argument("--data", default=None, help="dataset name shortcut (= data.name=NAME)")
    p.add_argument("--random-init", action="store_true", help="same architecture, fresh random weights (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default <run>/eval)")
    p.add_argument("--batch-size", type=int, default=None, help="feature-extraction batch (default eval.batch_size)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for feature extraction")
    p.add_argument("--no-cache", action="store_true", help="recompute features instead of using <out>/cache")
    p.add_argument("--no-progress", action="store_true")


def _timed_features(t: Target, args: argparse.Namespace, accelerator: Any, train_ds: Any, test_ds: Any,
                    batch_size: int) -> Tuple[Any, Any, Any, Any, Any, float]:
    """Train and test features of the target (cached unless --no-cache), and the seconds it took."""
    t0 = time.perf_counter()
    feats = target_features(t, train_ds, test_ds, batch_size, accelerator, not args.no_cache, args.num_workers,
                            t.cfg.train.progress and not args.no_progress)
    return (*feats, time.perf_counter() - t0)


def _setup(args: argparse.Namespace) -> Tuple[Target, Any, Any, Any, int]:
    t = resolve_target(args.target, args.config, args.data, args.overrides, args.random_init, args.seed, args.out)
    check_writable_dir(t.out_dir, "--out")  # before the features are computed, not after
    accelerator = _accelerator()
    t.encoder.to(accelerator.device)
    train_ds, test_ds = load_data(t)
    batch_size = args.batch_size or t.cfg.eval.batch_size
    return t, accelerator, train_ds, test_ds, batch_size


# ---- knn ---------------------------------------------------------------------------------------------

def build_knn_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simclr-tau knn", description="Weighted kNN (FAISS) evaluation of a frozen encoder.")
    _common_args(p)
    p.add_argument("--k", type=int, nargs="+", default=None, help="neighbours (default eval.knn_k: 20 200)")
    p.add_argument("--t", type=float, nargs="+", default=None, help="vote temperature per k (default eval.knn_t: 0.07 0.1)")
    p.add_argument("--vote", action="store_true", help="unweighted majority vote instead of exp(s/T) weights")
    p.add_argument("--index", default="flat", choices=("flat", "ivf", "hnsw"))
    p.add_argument("--nlist", type=int, default=100, help="ivf: number of cells")
    p.add_argument("--nprobe", type=int, default=10, help="ivf: cells probed per query")
    p.add_argument("--no-diagnostics", action="store_true", help="skip alignment/uniformity and conditional-τ analysis")
    p.add_argument("--diag-n", type=int, default=1000, help="test images used for alignment/uniformity")
    return p


def _ks_ts(args: argparse.Namespace, cfg: Any) -> Tuple[List[int], List[Optional[float]]]:
    ks = list(args.k) if args.k else list(cfg.eval.knn_k)
    ts = list(args.t) if args.t else (list(cfg.eval.knn_t) if not args.k else [])
    if not ts:
        ts = [0.07] * len(ks)
    if len(ts) == 1 and len(ks) > 1:
        ts = ts * len(ks)
    if len(ts) != len(ks):
        raise UserError(f"--k has {len(ks)} values but --t has {len(ts)}; give one T per k (or a single T)")
    return ks, ts


@exit_on_user_error
def knn_main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    from simclr_tau.evaluation.diagnostics import knn_diagnostics
    from simclr_tau.evaluation.knn import knn_eval, metric_suffix

    args = build_knn_parser().parse_intermixed_args(argv)
    check_args(args, KNN_ARGS)
    t, accelerator, train_ds, test_ds, batch_size = _setup(args)
    ks, ts = _ks_ts(args, t.cfg)
    if max(ks) > len(train_ds):
        raise UserError(f"knn k={max(ks)} is larger than the training set ({len(train_ds)} samples); use a smaller --k")
    tr_f, tr_y, te_f, te_y, hits, t_feat = _timed_features(t, args, accelerator, train_ds, test_ds, batch_size)
    if not accelerator.is_main_process:
        return {}
    C = train_ds.num_classes
    weighted = not args.vote
    t1 = time.perf_counter()
    res = knn_eval(tr_f, tr_y, te_f, te_y, ks, ts, num_classes=C, weighted=weighted, index=args.index,
                   **({"nlist": args.nlist, "nprobe": args.nprobe} if args.index == "ivf" else {}))
    t_knn = time.perf_counter() - t1
    prefix = "knn_random_init" if t.random_init else "knn"
    results = [{"k": k, "T": T if weighted else None, "top1": res[f"top1_{metric_suffix(k, T, weighted)}"],
                "top5": res[f"top5_{metric_suffix(k, T, weighted)}"]} for k, T in zip(ks, ts)]
    payload: Dict[str, Any] = {
        "target": t.description, "kind": t.kind, "random_init": t.random_init,
        "dataset": {"name": t.cfg.data.name, "root": t.cfg.data.root, "n_train": len(train_ds), "n_test": len(test_ds),
                    "num_classes": C},
        "feature_dim": int(tr_f.shape[1]), "index": args.index, "weighted": weighted, "results": results,
        "metrics": {f"{prefix}/{k}": v for k, v in res.items()}, "cache_hit": hits,
        "seconds": {"features": t_feat, "knn": t_knn},
    }
    summary_values = dict(payload["metrics"])
    if not args.no_diagnostics:
        payload["diagnostics"] = knn_diagnostics(t, accelerator, test_ds, tr_f, tr_y, te_f, te_y, ks[0], ts[0],
                                                 weighted, C, batch_size, args.diag_n, args.seed)
        dprefix = "diag_random_init" if t.random_init else "diag"
        d = payload["diagnostics"]
        summary_values.update({f"{dprefix}/alignment": d["alignment"], f"{dprefix}/uniformity": d["uniformity"]})
        if "auroc_tau_vs_knn_error" in d.get("conditional_tau", {}):
            summary_values[f"{dprefix}/tau_auroc"] = d["conditional_tau"]["auroc_tau_vs_knn_error"]
    name = "knn_random_init.json" if t.random_init else "knn.json"
    path = write_json(t.out_dir / name, payload)
    update_run_summary(t, summary_values)
    _print_knn(t, payload, path)
    return payload


def _print_knn(t: Target, payload: Dict[str, Any], path: Path) -> None:
    ds = payload["dataset"]
    print(f"kNN  {t.description}  on {ds['name']} ({ds['n_train']} train / {ds['n_test']} test), "
          f"{payload['feature_dim']}-d features, index={payload['index']}")
    print(f"{'k':>6} {'T':>6} {'top-1':>7} {'top-5':>7}")
    for r in payload["results"]:
        T = f"{r['T']:g}" if r["T"] is not None else "vote"
        print(f"{r['k']:>6} {T:>6} {r['top1']:>7.2f} {r['top5']:>7.2f}")
    d = payload.get("diagnostics")
    if d:
        line = f"alignment {d['alignment']:.4f}  uniformity {d['uniformity']:.4f}"
        ct = d.get("conditional_tau", {})
        if "auroc_tau_vs_knn_error" in ct:
            line += f"  τ-AUROC(kNN errors) {ct['auroc_tau_vs_knn_error']:.3f}"
        print(line)
    print(f"wrote {path}", flush=True)


# ---- linear ------------------------------------------------------------------------------------------

def build_linear_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simclr-tau linear",
                                description="Linear probe (hyperparameters chosen on a validation split) + calibration.")
    _common_args(p)
    p.add_argument("--mode", default="fast", choices=("fast", "augmented"),
                   help="fast: cached features; augmented: random-resized-crop + flip views re-encoded every epoch")
    p.add_argument("--optimizer", default=None, choices=("sgd", "adamw", "lbfgs"), help="default: lbfgs (fast), sgd (augmented)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (lbfgs: iterations)")
    p.add_argument("--lr", type=float, nargs="+", default=None, help="learning-rate grid")
    p.add_argument("--wd", type=float, nargs="+", default=None, help="weight-decay grid")
    p.add_argument("--probe-batch-size", type=int, default=256, help="sgd/adamw mini-batch (0 = full batch)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="training images held out to choose hyperparameters")
    p.add_argument("--no-stratify", action="store_true", help="random instead of class-stratified validation split")
    p.add_argument("--retrain-full", action="store_true", help="retrain the chosen setting on train + val for the test number")
    p.add_argument("--crop-scale-min", type=float, default=0.08, help="augmented mode: random-resized-crop scale (min, 1)")
    return p


@exit_on_user_error
def linear_main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    from simclr_tau.evaluation.calibration import calibrate
    from simclr_tau.evaluation.linear_probe import (ProbeConfig, augmented_view_transform, linear_probe,
                                                    linear_probe_augmented)

    args = build_linear_parser().parse_intermixed_args(argv)
    check_args(args, LINEAR_ARGS)
    optimizer = args.optimizer or ("lbfgs" if args.mode == "fast" else "sgd")
    if args.mode == "augmented" and optimizer == "lbfgs":
        raise UserError("--mode augmented recomputes features every epoch: use --optimizer sgd or adamw")
    pcfg = ProbeConfig(optimizer=optimizer, epochs=args.epochs, lrs=args.lr, wds=args.wd, batch_size=args.probe_batch_size,
                       val_fraction=args.val_fraction, stratified=not args.no_stratify, seed=args.seed,
                       retrain_full=args.retrain_full).resolved()
    t, accelerator, train_ds, test_ds, batch_size = _setup(args)
    if args.mode == "augmented" and accelerator.num_processes > 1:
        raise UserError("--mode augmented runs in one process; launch without multiple processes (or use --mode fast)")
    tr_f, tr_y, te_f, te_y, hits, t_feat = _timed_features(t, args, accelerator, train_ds, test_ds, batch_size)
    if not accelerator.is_main_process:
        return {}
    C = train_ds.num_classes
    t1 = time.perf_counter()
    if args.mode == "fast":
        result = linear_probe(tr_f, tr_y, te_f, te_y, C, pcfg)
    else:
        aug = augmented_view_transform(t.image_size, t.mean, t.std, args.crop_scale_min)
        result = linear_probe_augmented(t.encoder, train_ds, aug, tr_f, tr_y, te_f, te_y, C, pcfg, args.num_workers,
                                        t.cfg.train.progress and not args.no_progress)
    t_probe = time.perf_counter() - t1
    suffix = "_random_init" if t.random_init else ""
    png = t.out_dir / f"reliability{suffix}.png"
    calib = calibrate(result.val_logits, result.val_labels, result.test_logits, result.test_labels, png)
    payload: Dict[str, Any] = {
        "target": t.description, "kind": t.kind, "random_init": t.random_init,
        "dataset": {"name": t.cfg.data.name, "root": t.cfg.data.root, "n_train": len(train_ds), "n_test": len(test_ds),
                    "num_classes": C},
        "feature_dim": int(tr_f.shape[1]), "probe": result.metrics, "calibration": calib, "cache_hit": hits,
        "seconds": {"features": t_feat, "probe": t_probe},
    }
    m, ct = result.metrics, calib["test"]
    lp, cp = f"linear{suffix}", f"calib{suffix}"
    payload["metrics"] = {
        f"{lp}/train_top1": m["train_top1"], f"{lp}/val_top1": m["val_top1"], f"{lp}/test_top1": m["test_top1"],
        f"{lp}/test_top5": m["test_top5"], f"{cp}/ece_before": ct["ece_before"], f"{cp}/ece_after": ct["ece_after"],
        f"{cp}/nll_before": ct["nll_before"], f"{cp}/nll_after": ct["nll_after"], f"{cp}/T": calib["T"],
    }
    path = write_json(t.out_dir / f"linear{suffix}.json", payload)
    update_run_summary(t, payload["metrics"])
    print(f"linear probe ({args.mode}, {optimizer})  {t.description}  on {t.cfg.data.name}: "
          f"train {m['train_top1']:.2f}  val {m['val_top1']:.2f}  test {m['test_top1']:.2f} (top-5 {m['test_top5']:.2f})  "
          f"chosen lr={m['chosen']['lr']:g} wd={m['chosen']['wd']:g}")
    print(f"calibration (test): ECE {100 * ct['ece_before']:.2f}% -> {100 * ct['ece_after']:.2f}%  "
          f"NLL {ct['nll_before']:.4f} -> {ct['nll_after']:.4f}  T = {calib['T']:.3f}")
    print(f"wrote {path} and {png}", flush=True)
    return payload


# ---- ood ---------------------------------------------------------------------------------------------

def build_ood_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simclr-tau ood",
        description="Held-out classes as out-of-distribution: AUROC of the per-image τ and of the kNN distance "
                    "(to the k-th nearest training feature) for OOD test images and for in-distribution kNN errors.")
    _common_args(p)
    p.add_argument("--k", type=int, default=20, help="the neighbour whose distance is the score, and the kNN's k (20)")
    p.add_argument("--t", type=float, default=0.07, help="vote temperature of the in-distribution kNN (0.07)")
    return p


def _held_out(t: Target) -> Tuple[List[int], Any]:
    """The run's in-distribution classes (``data.classes``) and the full (unfiltered) test split."""
    import copy

    from simclr_tau.config import load_config
    from simclr_tau.data.datasets import build_eval_datasets

    classes = t.cfg.data.classes
    if classes is None:
        raise UserError(f"{t.description}: data.classes is not set, so no class is held out; pretrain with "
                        "e.g. data.classes=[0,1,2,3,4,5,6,7] (the other classes are then out-of-distribution)")
    if t.run_dir is not None:
        trained = load_config(t.run_dir / "config.yaml").data.classes
        if trained is not None and sorted(trained) != sorted(classes):
            raise UserError(f"{t.run_dir} was pretrained on data.classes={list(trained)}: evaluating it with "
                            f"data.classes={list(classes)} would call classes it trained on out-of-distribution")
    full = copy.deepcopy(t.cfg.data)
    full.classes = None
    _, full_test = build_eval_datasets(full)
    if len(set(classes)) == full_test.num_classes:
        raise UserError(f"data.classes={list(classes)} lists every class of {t.cfg.data.name}: none is held out")
    return sorted(int(c) for c in classes), full_test


@exit_on_user_error
def ood_main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    from simclr_tau.data.augment import eval_transform
    from simclr_tau.evaluation.diagnostics import image_tau, training_tau
    from simclr_tau.evaluation.knn import metric_suffix
    from simclr_tau.evaluation.ood import SCORE_CONVENTION, ood_report, train_error_report
    from simclr_tau.evaluation.targets import PIXELS

    args = build_ood_parser().parse_intermixed_args(argv)
    t, accelerator, train_ds, id_test, batch_size = _setup(args)
    id_classes, full_test = _held_out(t)
    if args.k + 1 > len(train_ds):
        raise UserError(f"--k {args.k} needs more than {args.k} training images (got {len(train_ds)}); use a smaller --k")
    tr_f, tr_y, te_f, te_y, hits, t_feat = _timed_features(t, args, accelerator, train_ds, full_test, batch_size)
    if not accelerator.is_main_process:
        return {}
    t1 = time.perf_counter()
    is_id = torch.isin(te_y, torch.tensor(id_classes))  # the filtered test split is these rows, in this order
    assert int(is_id.sum()) == len(id_test)
    tau = tau_train = None
    why = why_train = "no temperature head (pixels / random init)"
    if t.kind != PIXELS and not t.random_init:
        clean = eval_transform(t.image_size, t.channels, t.mean, t.std)
        tau, why = image_tau(t.run_dir, t.cfg, full_test, clean, t.channels, batch_size, accelerator.device)
        tau_train, why_train = training_tau(t.run_dir, t.cfg, train_ds, clean, t.channels, batch_size,
                                            accelerator.device)
    C, k, T = train_ds.num_classes, args.k, args.t
    report = ood_report(tr_f, tr_y, te_f[is_id], id_test.labels, te_f[~is_id], C, k, T,
                        None if tau is None else tau[is_id], None if tau is None else tau[~is_id])
    train_loo = train_error_report(tr_f, tr_y, C, k, T, tau_train)
    train_loo["auroc_tau_reason"] = why_train if tau_train is None else None
    names = full_test.classes
    ood_classes = [c for c in range(full_test.num_classes) if c not in id_classes]
    payload: Dict[str, Any] = {
        "target": t.description, "kind": t.kind, "random_init": t.random_init,
        "dataset": {"name": t.cfg.data.name, "root": t.cfg.data.root, "n_train": len(train_ds)},
        "id_classes": id_classes, "id_class_names": [names[c] for c in id_classes],
        "ood_classes": ood_classes, "ood_class_names": [names[c] for c in ood_classes],
        "temperature": {"mode": t.cfg.temperature.mode, "objective": t.cfg.temperature.objective,
                        "per_sample_table": bool(t.cfg.temperature.mode == "dro" and t.cfg.temperature.dro.per_sample)},
        **report, "auroc_tau_reason": why if tau is None else None,
        "train_leave_one_out": train_loo, "score_convention": SCORE_CONVENTION, "cache_hit": hits,
        "seconds": {"features": t_feat, "scores": time.perf_counter() - t1},
    }
    prefix = "ood_random_init" if t.random_init else "ood"
    payload["metrics"] = {name: v for name, v in {
        f"{prefix}/auroc_knn_distance_k{k}": report["auroc_knn_distance"],
        f"{prefix}/auroc_knn_distance_id_error_k{k}": report["auroc_knn_distance_id_error"],
        f"{prefix}/auroc_knn_distance_train_error_k{k}": train_loo["auroc_knn_distance_error"],
        f"{prefix}/auroc_tau": report["auroc_tau"], f"{prefix}/auroc_tau_id_error": report["auroc_tau_id_error"],
        f"{prefix}/auroc_tau_train_error": train_loo["auroc_tau_error"],
        f"{prefix}/knn_top1_id_{metric_suffix(k, T)}": report["knn_top1_id"]}.items() if v is not None}
    path = write_json(t.out_dir / f"{prefix}.json", payload)
    update_run_summary(t, payload["metrics"])
    _print_ood(payload, path)
    return payload


def _print_ood(p: Dict[str, Any], path: Path) -> None:
    def cell(v: Optional[float], width: int) -> str:
        return f"{v:>{width}.3f}" if v is not None else f"{'–':>{width}}"

    loo, tm = p["train_leave_one_out"], p["temperature"]
    print(f"OOD  {p['target']}  on {p['dataset']['name']}: in-distribution classes {p['id_classes']} "
          f"({p['dataset']['n_train']} train / {p['n_id']} test), held out {p['ood_classes']} ({p['n_ood']} test)")
    print(f"{'score (larger = more OOD)':<26} {'AUROC: OOD':>10} {'ID kNN error':>13} {'train kNN error (LOO)':>22}")
    print(f"{'kNN distance, k=%d' % p['k']:<26} {cell(p['auroc_knn_distance'], 10)} "
          f"{cell(p['auroc_knn_distance_id_error'], 13)} {cell(loo['auroc_knn_distance_error'], 22)}")
    label = f"τ_i ({tm['mode']}{', dro' if tm['objective'] == 'dro' else ''})"
    print(f"{label:<26} {cell(p['auroc_tau'], 10)} {cell(p['auroc_tau_id_error'], 13)} {cell(loo['auroc_tau_error'], 22)}")
    for what, reason in (("test images", p["auroc_tau_reason"]), ("training images", loo["auroc_tau_reason"])):
        if reason:
            print(f"  τ_i of the {what}: {reason}")
    print(f"kNN top-1 (k={p['k']}, T={p['T']:g}): {p['knn_top1_id']:.2f}% on the in-distribution test images "
          f"({p['n_knn_errors_id']} wrong), {loo['knn_top1']:.2f}% leave-one-out on the training images")
    print(f"wrote {path}", flush=True)
