"""MoCo v2 / v3: momentum update, queue (single and real 2-process), shuffle-BN, losses, τ handling.

Unit tests build MoCo around a tiny conv encoder; end-to-end tests go through ``build_moco`` with timm's
``test_resnet``. The multi-process tests spawn 2 real gloo processes once (module fixture) and compare
what they saved in the parent.
"""

from __future__ import annotations

import io
import math
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from simclr_tau.config import load_config
from simclr_tau.errors import UserError
from simclr_tau.losses import info_nce, info_nce_in_batch
from simclr_tau.methods.moco import MoCo, build_moco
from simclr_tau.models import mlp
from simclr_tau.temperature import ConditionalTemperature, FixedTemperature, LearnableTemperature

D = 6  # projection width


def tiny_encoder(bn: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4) if bn else nn.Identity(), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip


def tiny_moco(version: str = "v2", temperature=None, bn: bool = True, seed: int = 0, **kw) -> MoCo:
    torch.manual_seed(seed)
    predictor = mlp(D, 8, D, 2, bn=bn) if version == "v3" else None
    kw.setdefault("queue_size", 16)
    kw.setdefault("total_steps", 10)
    return MoCo(
        tiny_encoder(bn), mlp(4, 8, D, 2, "plain" if version == "v3" else "none", bn=bn), temperature or FixedTemperature(0.2),
        version=version, predictor=predictor, **kw,
    )  # fmt: skip


def conditional_tau(seed: int = 1) -> ConditionalTemperature:
    """A conditional τ whose output really varies per sample (the default init is constant)."""
    torch.manual_seed(seed)
    t = ConditionalTemperature(D, init=0.2, tau_min=0.05, tau_max=1.0, hidden_dim=8, depth=2)
    nn.init.normal_(t.mlp[-1].weight, std=2.0)
    return t


def views(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g)


@torch.no_grad()
def queries_and_keys(model: MoCo, x1, x2):
    """q = [h](g(f(x))), k = g_k(f_k(x)) recomputed outside forward (train-mode BN: same batch, same output)."""
    q1, q2 = model._query(x1), model._query(x2)
    k1 = model.momentum_projector(model.momentum_encoder(x1))
    k2 = model.momentum_projector(model.momentum_encoder(x2))
    return q1, q2, k1, k2


# ---- momentum -------------------------------------------------------------------------------------


def test_key_encoder_is_a_frozen_copy_and_ema_matches_formula():
    model = tiny_moco(momentum=0.9, momentum_cosine=True, total_steps=10)
    q_named = dict(model.encoder.state_dict(), **{f"p.{k}": v for k, v in model.projector.state_dict().items()})
    k_named = dict(model.momentum_encoder.state_dict(), **{f"p.{k}": v for k, v in model.momentum_projector.state_dict().items()})
    assert q_named.keys() == k_named.keys()
    for name in q_named:  # weights AND BN buffers copied at init
        assert torch.equal(q_named[name], k_named[name]), name
    assert all(not p.requires_grad for p in model._key_params())

    # One training step: the query moves, the key encoder gets no gradient.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x1, x2 = views()
    model.before_step(3)
    loss, _ = model(x1, x2)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in model._key_params())
    k_before = [p.detach().clone() for p in model._key_params()]
    q_now = [p.detach().clone() for p in model._query_params()]
    assert any(not torch.equal(a, b) for a, b in zip(k_before, q_now))  # the update below is not trivial

    model.after_step(3)
    m = 1 - (1 - 0.9) * (math.cos(math.pi * 3 / 10) + 1) / 2
    assert model.momentum_at(3) == pytest.approx(m, abs=1e-12)
    for k0, q, k1 in zip(k_before, q_now, model._key_params()):
        torch.testing.assert_close(k1, m * k0 + (1 - m) * q, rtol=0, atol=1e-7)


def test_momentum_schedule_values():
    cos = tiny_moco(momentum=0.99, momentum_cosine=True, total_steps=100)
    assert cos.momentum_at(0) == pytest.approx(0.99)
    assert cos.momentum_at(50) == pytest.approx(0.995)
    assert cos.momentum_at(25) == pytest.approx(1 - 0.01 * (0.5**0.5 + 1) / 2)
    assert cos.momentum_at(100) == pytest.approx(1.0)
    assert cos.momentum_at(150) == pytest.approx(1.0)  # past the end: stays at 1
    flat = tiny_moco(momentum=0.99, momentum_cosine=False, total_steps=100)
    assert [flat.momentum_at(s) for s in (0, 50, 100)] == [0.99, 0.99, 0.99]
    cos.before_step(50)
    _, logs = cos(*views())
    assert float(logs["momentum"]) == pytest.approx(0.995)


# ---- v2 loss and queue ----------------------------------------------------------------------------


@pytest.mark.parametrize("tau_kind", ["scalar", "per_sample"])
def test_v2_loss_is_info_nce_with_the_pre_forward_queue(tau_kind):
    temperature = FixedTemperature(0.2) if tau_kind == "scalar" else conditional_tau()
    model = tiny_moco("v2", temperature, queue_size=16)
    x1, x2 = views(4)
    q1, _, _, k2 = queries_and_keys(model, x1, x2)
    queue_before = model.queue.clone()
    tau = model.temperature(q1)
    assert tau.shape == (() if tau_kind == "scalar" else (4,))
    if tau_kind == "per_sample":
        assert tau.std() > 1e-3

    loss, logs = model(x1, x2)
    torch.testing.assert_close(loss, info_nce(q1, k2, queue_before, tau), rtol=1e-5, atol=1e-6)
    assert set(logs) == ({"tau"} if tau_kind == "scalar" else {"tau_mean", "tau_min", "tau_max", "tau_std"}) | {"momentum"}
    assert all(v.ndim == 0 for v in logs.values())
    # The current keys were enqueued after the loss: at rows 0..3, pointer at 4, the rest untouched ...
    torch.testing.assert_close(model.queue[:4], F.normalize(k2, dim=1), rtol=0, atol=1e-7)
    assert torch.equal(model.queue[4:], queue_before[4:])
    assert model.queue_ptr.item() == 4
    # ... and the loss is not the one computed with them in the queue.
    assert not torch.allclose(loss, info_nce(q1, k2, model.queue, tau), rtol=1e-4, atol=1e-5)


def test_v2_symmetric_loss_and_enqueue_order():
    model = tiny_moco("v2", conditional_tau(), symmetric=True, queue_size=16)
    x1, x2 = views(4)
    q1, q2, k1, k2 = queries_and_keys(model, x1, x2)
    queue_before = model.queue.clone()
    tau1, tau2 = model.temperature(q1), model.temperature(q2)
    loss, _ = model(x1, x2)
    expected = 0.5 * (info_nce(q1, k2, queue_before, tau1) + info_nce(q2, k1, queue_before, tau2))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.queue[:8], F.normalize(torch.cat([k1, k2]), dim=1), rtol=0, atol=1e-7)
    assert model.queue_ptr.item() == 8


def test_queue_wraps_and_eval_mode_does_not_enqueue():
    model = tiny_moco("v2", queue_size=10)
    ref, ptr = model.queue.clone(), 0
    for step in range(4):  # 4 keys per step into 10 slots: wraps at steps 2 and 4
        x1, x2 = views(4, seed=step)
        k2 = queries_and_keys(model, x1, x2)[3]
        model(x1, x2)
        for row in F.normalize(k2, dim=1):
            ref[ptr], ptr = row, (ptr + 1) % 10
        torch.testing.assert_close(model.queue, ref, rtol=0, atol=1e-7)
        assert model.queue_ptr.item() == ptr
    model.eval()
    before = model.queue.clone()
    model(*views(4, seed=9))
    assert torch.equal(model.queue, before) and model.queue_ptr.item() == ptr


def test_queue_survives_state_dict_round_trip():
    model = tiny_moco("v2", queue_size=10)
    for step in range(3):
        model(*views(4, seed=step))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = tiny_moco("v2", queue_size=10, seed=123)
    assert not torch.equal(fresh.queue, model.queue) and fresh.queue_ptr.item() != model.queue_ptr.item()
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh.queue, model.queue)
    assert fresh.queue_ptr.dtype == torch.long and torch.equal(fresh.queue_ptr, model.queue_ptr)
    assert fresh.queue_ptr.item() == 2  # 12 keys into 10 slots


# ---- v3 -------------------------------------------------------------------------------------------


def test_v3_loss_is_2tau_in_batch_infonce_and_tau_gradient_is_not_pushed_to_zero():
    model = tiny_moco("v3", LearnableTemperature(0.3))
    assert not hasattr(model, "queue")
    x1, x2 = views(4)
    q1, q2, k1, k2 = queries_and_keys(model, x1, x2)  # q through the predictor
    theta = model.temperature.theta

    loss, _ = model(x1, x2)
    loss.backward()
    tau = model.temperature()
    plain = info_nce_in_batch(q1, k2, tau) + info_nce_in_batch(q2, k1, tau)
    torch.testing.assert_close(loss, 2 * tau.detach() * plain, rtol=1e-5, atol=1e-6)
    (g_plain,) = torch.autograd.grad(plain, theta, retain_graph=True)
    torch.testing.assert_close(theta.grad, 2 * tau.detach() * g_plain, rtol=1e-4, atol=1e-7)
    # A non-detached factor would have given a different τ gradient (so this test can tell them apart).
    (g_naive,) = torch.autograd.grad(2 * tau * plain, theta)
    assert not torch.allclose(g_naive, theta.grad, rtol=1e-3, atol=1e-6)


def test_v3_per_sample_tau_uses_its_detached_mean():
    model = tiny_moco("v3", conditional_tau())
    x1, x2 = views(4)
    q1, q2, k1, k2 = queries_and_keys(model, x1, x2)
    tau = model.temperature(torch.cat([q1, q2]))
    t1, t2 = tau.chunk(2)
    loss, _ = model(x1, x2)
    expected = 2 * tau.mean() * (info_nce_in_batch(q1, k2, t1) + info_nce_in_batch(q2, k1, t2))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# ---- build_moco, config, bad input ----------------------------------------------------------------


def moco_cfg(method: str, *overrides: str):
    return load_config(None, [
        f"train.method={method}", "model.backbone=test_resnet", "model.proj_hidden_dim=16", "model.proj_dim=8",
        "moco.queue_size=24", "moco.pred_hidden_dim=16", "temperature.hidden_dim=8", *overrides,
    ])  # fmt: skip


def test_bad_config_values_raise_user_error_naming_the_field():
    with pytest.raises(UserError, match="moco.queue_size"):
        load_config(None, ["moco.queue_size=0"])
    with pytest.raises(UserError, match="moco.momentum"):
        load_config(None, ["moco.momentum=1.5"])
    cfg = moco_cfg("mocov2")
    cfg.moco.queue_size = 0  # bypassing load_config's validation
    with pytest.raises(UserError, match="moco.queue_size"):
        build_moco(cfg, 1, 10, 100)
    cfg = moco_cfg("mocov2")
    cfg.moco.momentum = -0.1
    with pytest.raises(UserError, match="moco.momentum"):
        build_moco(cfg, 1, 10, 100)
    with pytest.raises(UserError, match="moco.queue_size"):
        tiny_moco(queue_size=0)
    with pytest.raises(UserError, match="moco.momentum"):
        tiny_moco(momentum=1.5)
    # Smaller than the global batch is fine (the queue wraps; tested above).
    tiny_moco(queue_size=1)(*views(4))


@pytest.mark.parametrize("method", ["mocov2", "mocov3"])
@pytest.mark.parametrize("mode", ["fixed", "learnable", "conditional", "scheduled"])
def test_every_tau_mode_trains(method, mode):
    overrides = [f"temperature.mode={mode}", "temperature.tau_min=0.05", "temperature.tau_max=0.5"]
    if mode == "scheduled":
        overrides += ["temperature.schedule.kind=linear", "temperature.schedule.start=0.5", "temperature.schedule.end=0.1"]
    torch.manual_seed(0)
    model = build_moco(moco_cfg(method, *overrides), in_chans=1, steps_per_epoch=2, total_steps=4)
    assert (model.predictor is not None) == (method == "mocov3")
    if method == "mocov3":  # MoCo v3: projector ends with a BN without affine; the key branch has no predictor
        assert isinstance(model.projector[-1], nn.BatchNorm1d) and not model.projector[-1].affine
        assert not any("predictor" in n for n, _ in model.named_modules() if n.startswith("momentum"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    taus, keys = [], [p.clone() for p in model._key_params()]
    for step in range(2):
        x1, x2 = views(4, seed=step)
        model.before_step(step)
        opt.zero_grad()
        loss, logs = model(x1.repeat(1, 1, 2, 2), x2.repeat(1, 1, 2, 2))  # 16 x 16 images
        assert torch.isfinite(loss)
        loss.backward()
        if mode in ("learnable", "conditional"):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.temperature.parameters())
        opt.step()
        model.after_step(step)
        taus.append(float(logs.get("tau", logs.get("tau_mean"))))
    assert any(not torch.equal(a, b) for a, b in zip(keys, model._key_params()))  # EMA moved the key encoder
    if mode == "fixed":
        assert taus == pytest.approx([0.1, 0.1])
    if mode == "scheduled":
        assert taus[0] == pytest.approx(0.5) and taus[1] < taus[0]
    if mode == "learnable":
        assert 0.05 <= float(model.temperature().detach()) <= 0.5  # projected into the bounds


# ---- real 2-process runs (gloo) -------------------------------------------------------------------

WORLD, N_LOCAL = 2, 4  # global batch 8


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {}
        # Queue: K=12 (8 does not divide 12: wraps mid-batch) and K=5 (< global batch), under DDP.
        for size, steps in ((12, 3), (5, 2)):
            model = tiny_moco("v2", queue_size=size, shuffle_bn=True, seed=0)  # same init on every rank
            initial = model.queue.clone()
            enqueued = []
            enqueue = model._dequeue_and_enqueue
            model._dequeue_and_enqueue = lambda k, f=enqueue: (enqueued.append(F.normalize(k, dim=1)), f(k))[1]
            ddp = DDP(model)
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
            for step in range(steps):
                x1, x2 = views(N_LOCAL, seed=100 * rank + step)  # different data per rank
                model.before_step(step)
                opt.zero_grad()
                loss, _ = ddp(x1, x2)
                loss.backward()
                opt.step()
                model.after_step(step)
            out[f"queue{size}"] = dict(initial=initial, keys=enqueued, queue=model.queue.clone(), ptr=model.queue_ptr.clone())

        # Shuffle-BN with a batch-independent key encoder (eval-mode BN): keys come back in order.
        model = tiny_moco("v2", shuffle_bn=True, seed=0)
        torch.manual_seed(7 + rank)  # different local RNG streams: the broadcast must make them agree
        x = views(N_LOCAL, seed=200 + rank)[0]
        model.momentum_encoder.eval(), model.momentum_projector.eval()
        with torch.no_grad():
            plain = model.momentum_projector(model.momentum_encoder(x))
        out["eval_keys_shuffled"], out["eval_keys_plain"] = model._keys(x), plain
        # Train-mode BN: the per-rank batch composition changes, so the keys do.
        model.momentum_encoder.train(), model.momentum_projector.train()
        torch.manual_seed(11 + rank)  # rank-specific: only the broadcast makes ranks agree
        x_shuffled, idx_unshuffle = model._batch_shuffle_ddp(x)
        out["x"], out["x_shuffled"], out["idx_unshuffle"] = x, x_shuffled, idx_unshuffle
        out["x_back"] = model._batch_unshuffle_ddp(x_shuffled.flatten(1), idx_unshuffle)
        torch.manual_seed(11 + rank)  # the same permutation again, inside _keys
        with torch.no_grad():
            out["train_keys_shuffled"] = model._keys(x)
            out["train_keys_plain"] = model.momentum_projector(model.momentum_encoder(x))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moco_ddp")
    ctx = mp.spawn(_worker, args=(WORLD, str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process MoCo run timed out")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("size,steps", [(12, 3), (5, 2)])
def test_queue_holds_gathered_keys_in_rank_order(two_process_results, size, steps):
    r0, r1 = (res[f"queue{size}"] for res in two_process_results)
    assert torch.equal(r0["initial"], r1["initial"])
    ref, ptr = r0["initial"].clone(), 0
    for step in range(steps):
        k0, k1 = r0["keys"][step], r1["keys"][step]
        assert not torch.equal(k0, k1)
        for row in torch.cat([k0, k1]):  # rank 0's keys, then rank 1's
            ref[ptr], ptr = row, (ptr + 1) % size
    for r in (r0, r1):
        assert torch.equal(r["queue"], ref)
        assert r["ptr"].item() == ptr == (WORLD * N_LOCAL * steps) % size


@pytest.mark.slow
def test_shuffle_bn_returns_every_key_to_its_sample(two_process_results):
    for res in two_process_results:
        torch.testing.assert_close(res["eval_keys_shuffled"], res["eval_keys_plain"], rtol=1e-5, atol=1e-6)
        assert torch.equal(res["x_back"], res["x"].flatten(1))
    r0, r1 = two_process_results
    assert torch.equal(r0["idx_unshuffle"], r1["idx_unshuffle"])  # one permutation for all ranks
    # The shuffled slices are a permutation of the global batch, and not the identity split.
    before, after = torch.cat([r0["x"], r1["x"]]).flatten(1), torch.cat([r0["x_shuffled"], r1["x_shuffled"]]).flatten(1)
    assert torch.equal(after[r0["idx_unshuffle"]], before)
    local = {tuple(row.tolist()) for row in r0["x"].flatten(1)}
    assert local != {tuple(row.tolist()) for row in r0["x_shuffled"].flatten(1)}
    # With train-mode BN the key encoder really saw other batch statistics.
    for res in two_process_results:
        assert not torch.allclose(res["train_keys_shuffled"], res["train_keys_plain"], rtol=1e-3, atol=1e-4)
