"""InfoNCE (MoCo v2 queue, MoCo v3 in-batch) against slow per-query float64 references, gradient flow
(queries only), input validation and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from simclr_tau.losses import info_nce, info_nce_in_batch

TAUS = (0.01, 0.07, 0.5, 1.0)


def _unit(rows: torch.Tensor) -> list[torch.Tensor]:
    return [r / r.norm() for r in rows.detach().double()]


def _nll(positive_logit: float, logits: list[float]) -> float:
    """−log softmax of ``positive_logit`` among ``logits`` (which contain it), log-sum-exp written out."""
    m = max(logits)
    return m + math.log(sum(math.exp(v - m) for v in logits)) - positive_logit


def reference_info_nce(q, k, queue, taus: list[float]) -> float:
    """MoCo v2: query i's candidates are its key k_i (the positive) followed by every queue entry."""
    qs, ks = _unit(q), _unit(k)
    negatives = _unit(queue) if queue is not None else []
    total = 0.0
    for i, qi in enumerate(qs):
        pos = float(qi @ ks[i]) / taus[i]
        logits = [pos] + [float(qi @ nj) / taus[i] for nj in negatives]
        total += _nll(pos, logits)
    return total / len(qs)


def reference_info_nce_in_batch(q, k, taus: list[float]) -> float:
    """MoCo v3: query i's candidates are all keys of the batch; the positive is k_i."""
    qs, ks = _unit(q), _unit(k)
    total = 0.0
    for i, qi in enumerate(qs):
        logits = [float(qi @ kj) / taus[i] for kj in ks]
        total += _nll(logits[i], logits)
    return total / len(qs)


def make_inputs(n: int, dim: int, queue_size: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, dim, generator=g, dtype=torch.float64)
    k = q + 0.7 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    queue = torch.randn(queue_size, dim, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), queue.to(dtype)


def make_tau(kind: str, tau: float, n: int, dtype: torch.dtype):
    if kind == "float":
        return tau, [tau] * n
    if kind == "tensor0d":
        t = torch.tensor(tau, dtype=dtype)
        return t, [float(t)] * n
    g = torch.Generator().manual_seed(1)
    t = (tau * (0.5 + torch.rand(n, generator=g, dtype=torch.float64))).to(dtype)
    return t, t.tolist()


def _check(loss: torch.Tensor, expected: float, dtype: torch.dtype, taus: list[float]) -> None:
    assert loss.ndim == 0 and loss.dtype == dtype
    if dtype == torch.float64:
        assert float(loss) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    else:  # float32 cosines (~1e-6) over τ, cross-entropy 2-Lipschitz in the largest logit change
        assert float(loss) == pytest.approx(expected, rel=0, abs=4e-6 / min(taus))


GRID = pytest.mark.parametrize("n,dim", [(1, 3), (2, 3), (5, 16), (8, 3), (8, 16), (2, 16)])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau_kind", ["float", "tensor0d", "per_query"])
@pytest.mark.parametrize("tau", TAUS)
@GRID
def test_queue_matches_reference(n, dim, tau, tau_kind, dtype):
    q, k, queue = make_inputs(n, dim, queue_size=7, dtype=dtype, seed=n * 10 + dim)
    tau_arg, taus = make_tau(tau_kind, tau, n, dtype)
    _check(info_nce(q, k, queue, tau_arg), reference_info_nce(q, k, queue, taus), dtype, taus)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau_kind", ["float", "tensor0d", "per_query"])
@pytest.mark.parametrize("tau", TAUS)
@GRID
def test_in_batch_matches_reference(n, dim, tau, tau_kind, dtype):
    q, k, _ = make_inputs(n, dim, queue_size=1, dtype=dtype, seed=n * 10 + dim)
    tau_arg, taus = make_tau(tau_kind, tau, n, dtype)
    _check(info_nce_in_batch(q, k, tau_arg), reference_info_nce_in_batch(q, k, taus), dtype, taus)


def test_without_queue_only_the_positive_remains():
    q, k, _ = make_inputs(4, 8, 1, torch.float64)
    assert float(info_nce(q, k, None, 0.1)) == 0.0  # softmax over a single logit


def test_identical_keys_and_queue_give_log_k_plus_1():
    q = torch.full((3, 8), 0.5)
    queue = torch.full((6, 8), 2.0)  # same direction: all 1 + 6 logits equal 1/τ
    assert float(info_nce(q, q.clone(), queue, 0.01)) == pytest.approx(math.log(7), abs=1e-5)
    assert float(info_nce_in_batch(q, q.clone(), 0.01)) == pytest.approx(math.log(3), abs=1e-5)


def test_gradient_flows_into_queries_only():
    q, k, queue = make_inputs(4, 8, 5, torch.float64)
    q.requires_grad_(), k.requires_grad_(), queue.requires_grad_()
    info_nce(q, k, queue, 0.1).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None  # MoCo: keys and queue are constants
    q.grad = None
    info_nce_in_batch(q, k, 0.1).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and k.grad is None


@pytest.mark.parametrize("bad_shape", [(8,), (4, 1), (3,)])
def test_per_query_tau_of_wrong_shape_is_rejected(bad_shape):
    q, k, queue = make_inputs(4, 8, 5, torch.float32)
    for call in (lambda t: info_nce(q, k, queue, t), lambda t: info_nce_in_batch(q, k, t)):
        with pytest.raises(ValueError) as info:
            call(torch.full(bad_shape, 0.1))
        msg = str(info.value)
        assert "tau" in msg and "(4,)" in msg and str(tuple(bad_shape)) in msg


def test_bad_shapes_and_tau_are_rejected():
    q, k, queue = make_inputs(4, 8, 5, torch.float32)
    with pytest.raises(ValueError, match=r"q and k must both have shape \(N, D\)"):
        info_nce(q, k[:3], queue, 0.1)
    with pytest.raises(ValueError, match=r"queue must have shape \(K, 8\)"):
        info_nce(q, k, queue[:, :5], 0.1)
    with pytest.raises(ValueError, match=r"q and k must both have shape \(N, D\)"):
        info_nce_in_batch(q, k[:, :5], 0.1)
    with pytest.raises(ValueError, match=r"tau=0.0 must be > 0"):
        info_nce(q, k, queue, 0.0)
    with pytest.raises(ValueError, match=r"tau=-1 must be > 0"):
        info_nce_in_batch(q, k, -1)


@pytest.mark.parametrize("tau_kind", ["tensor0d", "per_query"])
def test_gradcheck_queries_and_tau(tau_kind):
    q, k, queue = make_inputs(3, 4, 5, torch.float64, seed=5)
    tau, _ = make_tau(tau_kind, 0.2, 3, torch.float64)
    q.requires_grad_(), tau.requires_grad_()
    assert gradcheck(lambda q, t: info_nce(q, k, queue, t), (q, tau))
    assert gradcheck(lambda q, t: info_nce_in_batch(q, k, t), (q, tau))
