"""Linear probe: separable data is solved, hyperparameters are chosen on the validation split only,
the stacked per-head optimizers are exactly torch's SGD / AdamW, the split is stratified and seeded,
label-set mismatches are user errors, and the augmented mode re-encodes views with a frozen encoder."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from simclr_tau.data.augment import eval_transform
from simclr_tau.data.datasets import TensorImageDataset, make_synthetic
from simclr_tau.errors import UserError
from simclr_tau.evaluation.features import extract_features
from simclr_tau.evaluation.linear_probe import (
    ProbeConfig, augmented_view_transform, linear_probe, linear_probe_augmented, split_train_val,
)
from simclr_tau.evaluation.probe_solvers import train_heads_minibatch


def _blobs(n_per_class, c=4, d=16, spread=0.3, seed=0, noise_seed=None):
    """Gaussian classes around centers drawn with ``seed``; ``noise_seed`` draws another sample of the same classes."""
    centers = 3.0 * torch.randn(c, d, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(1000 + seed if noise_seed is None else noise_seed)
    y = torch.arange(c).repeat_interleave(n_per_class)
    x = centers[y] + spread * torch.randn(len(y), d, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


@pytest.mark.parametrize("optimizer", ["lbfgs", "sgd", "adamw"])
def test_separable_features_are_solved(optimizer):
    x, y = _blobs(100)
    xt, yt = _blobs(25, noise_seed=7)  # same classes, fresh samples
    cfg = ProbeConfig(optimizer=optimizer, epochs=20 if optimizer != "lbfgs" else 50, batch_size=64)
    res = linear_probe(x, y, xt, yt, num_classes=4, cfg=cfg)
    assert res.metrics["test_top1"] >= 99.0
    assert res.metrics["train_top1"] >= 99.0
    assert res.metrics["n_val"] == 40 and res.metrics["n_train"] == 360
    assert res.test_logits.shape == (100, 4) and res.val_logits.shape == (40, 4)


def test_selection_never_looks_at_the_test_labels():
    x, y = _blobs(150, c=3, d=8, spread=5.0, seed=1)  # overlapping classes: settings differ on validation
    xt, yt = _blobs(60, c=3, d=8, spread=5.0, seed=1, noise_seed=7)
    cfg = ProbeConfig(optimizer="sgd", epochs=5, lrs=[1e-3, 0.3], wds=[0.0, 0.3], batch_size=32)
    a = linear_probe(x, y, xt, yt, 3, cfg)
    permuted = yt[torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))]
    b = linear_probe(x, y, xt, permuted, 3, cfg)
    assert len({row["val_top1"] for row in a.metrics["grid"]}) > 1  # the choice is not a tie
    assert a.metrics["grid"] == b.metrics["grid"]
    assert a.metrics["chosen"] == b.metrics["chosen"]
    assert a.metrics["val_top1"] == b.metrics["val_top1"] and a.metrics["train_top1"] == b.metrics["train_top1"]
    assert a.metrics["test_top1"] != b.metrics["test_top1"]  # the test labels do matter for the test number
    best = max(a.metrics["grid"], key=lambda r: r["val_top1"])
    assert a.metrics["chosen"] == {"lr": best["lr"], "wd": best["wd"]}


def _reference_heads(batches, dim, c, grid, cfg, total):
    """Each head trained alone by torch.optim (W decayed, b not) with a per-step cosine lr."""
    out = []
    for lr, wd in grid:
        W = torch.zeros(dim, c, requires_grad=True)
        b = torch.zeros(c, requires_grad=True)
        groups = [{"params": [W], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}]
        opt = (torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum) if cfg.optimizer == "sgd"
               else torch.optim.AdamW(groups, lr=lr, betas=cfg.betas))
        step = 0
        for epoch in range(cfg.epochs):
            for xb, yb in batches(epoch):
                for gr in opt.param_groups:
                    gr["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                opt.zero_grad()
                F.cross_entropy(xb @ W + b, yb).backward()
                opt.step()
                step += 1
        out.append((W.detach(), b.detach()))
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_stacked_heads_equal_torch_optimizers(optimizer):
    x, y = _blobs(30, c=3, d=6, spread=1.5)

    def batches(epoch):
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(y), 16):
            yield x[perm[i:i + 16]], y[perm[i:i + 16]]

    cfg = ProbeConfig(optimizer=optimizer, epochs=3).resolved()
    grid = [(0.05, 0.0), (0.2, 1e-2), (0.01, 0.1)]
    steps = math.ceil(len(y) / 16)
    W, b = train_heads_minibatch(batches, steps, 6, 3, grid, cfg)
    for i, (Wr, br) in enumerate(_reference_heads(batches, 6, 3, grid, cfg, cfg.epochs * steps)):
        torch.testing.assert_close(W[i], Wr, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[i], br, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(W[0], W[1])


def test_split_is_stratified_disjoint_and_seeded():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    tr, va = split_train_val(y, 0.1, seed=3)
    assert torch.bincount(y[va]).tolist() == [5, 3, 2]
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(tr) + len(va) == 100
    tr2, va2 = split_train_val(y, 0.1, seed=3)
    assert torch.equal(va, va2)
    assert not torch.equal(va, split_train_val(y, 0.1, seed=4)[1])
    assert len(split_train_val(y, 0.2, seed=0, stratified=False)[1]) == 20


def test_label_set_mismatch_is_a_user_error():
    x, y = _blobs(20, c=5)
    with pytest.raises(UserError, match=r"test labels span classes 0..4 but the probe has 3 classes"):
        linear_probe(x[y < 3], y[y < 3], x, y, num_classes=3, cfg=ProbeConfig(epochs=5))
    res = linear_probe(x[y < 3], y[y < 3], x[y < 3], y[y < 3], num_classes=3, cfg=ProbeConfig(epochs=5))
    with pytest.raises(UserError, match="the probe has 3 classes"):
        res.head.accuracy(x, y)
    with pytest.raises(UserError, match="lbfgs needs fixed features"):
        linear_probe_augmented(nn.Flatten(), None, None, x, y, x, y, 5, ProbeConfig(optimizer="lbfgs"))


class FrozenProbeEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten())
        self.images_seen = 0
        self.modes = set()

    def forward(self, x):
        self.images_seen += x.shape[0]
        self.modes.add(self.training)
        return self.net(x)


def test_augmented_mode_reencodes_views_with_a_frozen_encoder():
    ds = make_synthetic(160, 4, 12)
    train = TensorImageDataset(ds.images[:120], ds.labels[:120], ds.classes)
    test = TensorImageDataset(ds.images[120:], ds.labels[120:], ds.classes)
    enc = FrozenProbeEncoder().train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    clean = eval_transform(12, 1, [0.5], [0.25])
    tr_f, tr_y = extract_features(enc, train, clean, 64)
    te_f, te_y = extract_features(enc, test, clean, 64)
    seen = enc.images_seen
    cfg = ProbeConfig(optimizer="sgd", epochs=3, lrs=[0.1], wds=[0.0], batch_size=32)
    aug = augmented_view_transform(12, [0.5], [0.25], crop_scale_min=0.5)
    res = linear_probe_augmented(enc, train, aug, tr_f, tr_y, te_f, te_y, 4, cfg)
    assert enc.images_seen - seen == 3 * 108  # every epoch re-encodes the 108 training (non-validation) images
    assert enc.modes == {False} and enc.training  # encoded in eval mode, mode restored
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # frozen, BN stats included
    assert res.metrics["mode"] == "augmented" and res.metrics["test_top1"] > 50.0  # chance is 25%
    # same seed, same result: the augmentation draws are seeded
    res2 = linear_probe_augmented(enc, train, aug, tr_f, tr_y, te_f, te_y, 4, cfg)
    assert torch.equal(res.head.weight, res2.head.weight)


@pytest.mark.parametrize("c,d,spread", [(4, 16, 4.0), (5, 50, 6.0)])
def test_lbfgs_heads_match_sklearn_on_nearly_separable_features(c, d, spread):
    """Every wd of the default L-BFGS grid reaches its own optimum: sklearn's multinomial LogisticRegression
    with C = 1 / (N · wd) minimizes N · (mean CE + wd/2 ||W||²), intercept unpenalized. Nearly separable
    classes make the small-wd heads stiff (the grid solved as one stacked problem missed by 0.04-0.75)."""
    from sklearn.linear_model import LogisticRegression

    from simclr_tau.evaluation.linear_probe import _fit_grid, feature_stats

    x, y = _blobs(100, c=c, d=d, spread=spread)
    xt, _ = _blobs(50, c=c, d=d, spread=spread, noise_seed=7)
    mean, std = feature_stats(x)
    x, xt = (x - mean) / std, (xt - mean) / std
    cfg = ProbeConfig().resolved()  # the probe's defaults: its wd grid, iteration cap and solver
    assert 0.0 not in cfg.wds and len(cfg.wds) >= 3
    heads = _fit_grid(x, y, c, cfg, cfg.grid())
    for (W, b), wd in zip(heads, cfg.wds):
        ref = LogisticRegression(C=1.0 / (len(y) * wd), tol=1e-10, max_iter=100_000).fit(x.double().numpy(), y.numpy())
        p_ref = torch.from_numpy(ref.predict_proba(xt.double().numpy()))
        assert (torch.softmax(xt @ W + b, 1).double() - p_ref).abs().max() < 1e-3, wd


def test_lbfgs_hand_written_gradient_equals_autograd():
    """The L-BFGS closure's loss and gradient (written by hand for speed) equal autograd's on the same objective."""
    from simclr_tau.evaluation.probe_solvers import ce_l2_loss_and_grad

    g = torch.Generator().manual_seed(3)
    x = torch.randn(97, 13, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (97,), generator=g)
    W = torch.randn(13, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    wd = 0.037
    ref = torch.nn.functional.cross_entropy(x @ W + b, y) + 0.5 * wd * W.pow(2).sum()
    ref.backward()
    onehot = torch.nn.functional.one_hot(y, 6).double()
    loss, gW, gb = ce_l2_loss_and_grad(x, x.t().contiguous(), onehot, W.detach(), b.detach(), wd)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(gW, W.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gb, b.grad, rtol=1e-10, atol=1e-14)
