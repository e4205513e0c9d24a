"""NT-Xent (SimCLR) against a slow per-anchor float64 reference, analytic values, symmetry, input
validation, gradcheck (embeddings and τ) and bf16 autocast at a small τ."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

from simclr_tau.losses import nt_xent

TAUS = (0.01, 0.07, 0.5, 1.0)


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, taus: list[float]) -> float:
    """Slow, obviously correct NT-Xent: one anchor at a time, log-sum-exp written out, float64.

    Anchors are the rows of [z1; z2]; anchor i's positive is row (i + N) mod 2N; its candidates are all
    rows except itself; ``taus[i]`` is anchor i's temperature.
    """
    z = torch.cat([z1, z2]).detach().double()
    u = [row / row.norm() for row in z]
    two_n = len(u)
    n = two_n // 2
    total = 0.0
    for i in range(two_n):
        positive = (i + n) % two_n
        logits = {k: float(u[i] @ u[k]) / taus[i] for k in range(two_n) if k != i}
        m = max(logits.values())
        log_sum_exp = m + math.log(sum(math.exp(v - m) for v in logits.values()))
        total += log_sum_exp - logits[positive]
    return total / two_n


def make_pairs(n: int, dim: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, dim, generator=g, dtype=torch.float64)
    z2 = z1 + 0.7 * torch.randn(n, dim, generator=g, dtype=torch.float64)  # correlated views
    return z1.to(dtype), z2.to(dtype)


def make_tau(kind: str, tau: float, num_anchors: int, dtype: torch.dtype, seed: int = 1):
    """(the τ argument to pass, the list of per-anchor τ values the reference uses)."""
    if kind == "float":
        return tau, [tau] * num_anchors
    if kind == "tensor0d":
        t = torch.tensor(tau, dtype=dtype)
        return t, [float(t)] * num_anchors
    g = torch.Generator().manual_seed(seed)
    t = (tau * (0.5 + torch.rand(num_anchors, generator=g, dtype=torch.float64))).to(dtype)  # τ/2 .. 3τ/2
    return t, t.tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau_kind", ["float", "tensor0d", "per_anchor"])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("dim", [3, 16])
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_matches_per_anchor_reference(n, dim, tau, tau_kind, dtype):
    z1, z2 = make_pairs(n, dim, dtype, seed=n * 100 + dim)
    tau_arg, taus = make_tau(tau_kind, tau, 2 * n, dtype)
    loss = nt_xent(z1, z2, tau_arg)
    expected = reference_nt_xent(z1, z2, taus)
    assert loss.ndim == 0 and loss.dtype == dtype
    if dtype == torch.float64:
        assert float(loss) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    else:
        # float32 cosines carry ~1e-6 absolute error; a logit is cos/τ, and cross-entropy moves by at most
        # 2x the largest logit change (its gradient has L1 norm <= 2).
        assert float(loss) == pytest.approx(expected, rel=0, abs=4e-6 / min(taus))


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_identical_embeddings_give_log_2n_minus_1(n, tau):
    z = torch.full((n, 16), 0.3)  # every anchor sees 2N-1 candidates with the same logit 1/τ
    assert float(nt_xent(z, z.clone(), tau)) == pytest.approx(math.log(2 * n - 1), abs=1e-5)
    per_anchor = torch.linspace(tau, 2 * tau, 2 * n)  # any τ_i: all logits of a row are still equal
    assert float(nt_xent(z, z.clone(), per_anchor)) == pytest.approx(math.log(2 * n - 1), abs=1e-5)


@pytest.mark.parametrize("tau", TAUS)
def test_orthonormal_views_analytic(tau):
    # z1 = z2 = distinct one-hot rows: positive cosine 1, the 2N-2 negatives cosine 0, so
    # ℓ = −1/τ + log(e^{1/τ} + 2N − 2) = log(1 + (2N − 2) e^{−1/τ}).
    n = 5
    z = torch.eye(n, 8, dtype=torch.float64) * 3.0
    expected = math.log1p((2 * n - 2) * math.exp(-1.0 / tau))
    assert float(nt_xent(z, z.clone(), tau)) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("tau", TAUS)
def test_symmetric_in_the_two_views(tau):
    z1, z2 = make_pairs(6, 16, torch.float64, seed=3)
    assert float(nt_xent(z1, z2, tau)) == pytest.approx(float(nt_xent(z2, z1, tau)), rel=1e-12)
    per_anchor, _ = make_tau("per_anchor", tau, 12, torch.float64)
    swapped = torch.cat([per_anchor[6:], per_anchor[:6]])  # τ_i travels with its anchor
    assert float(nt_xent(z1, z2, per_anchor)) == pytest.approx(float(nt_xent(z2, z1, swapped)), rel=1e-12)


def test_invariant_to_embedding_scale():
    z1, z2 = make_pairs(4, 8, torch.float64)
    assert float(nt_xent(3.0 * z1, 0.2 * z2, 0.1)) == pytest.approx(float(nt_xent(z1, z2, 0.1)), rel=1e-12)


def test_gather_flag_is_a_no_op_without_distributed():
    z1, z2 = make_pairs(4, 8, torch.float64)
    assert float(nt_xent(z1, z2, 0.1, gather=False)) == float(nt_xent(z1, z2, 0.1, gather=True))


@pytest.mark.parametrize("bad_shape", [(4,), (8, 1), (9,), (2, 4)])
def test_per_anchor_tau_of_wrong_shape_is_rejected(bad_shape):
    z1, z2 = make_pairs(4, 8, torch.float32)
    with pytest.raises(ValueError) as info:
        nt_xent(z1, z2, torch.full(bad_shape, 0.1))
    msg = str(info.value)
    assert "tau" in msg and "(8,)" in msg and str(tuple(bad_shape)) in msg


@pytest.mark.parametrize("tau", [0.0, -0.1])
def test_non_positive_float_tau_is_rejected(tau):
    z1, z2 = make_pairs(4, 8, torch.float32)
    with pytest.raises(ValueError, match=r"tau=.* must be > 0"):
        nt_xent(z1, z2, tau)


def test_mismatched_views_are_rejected():
    with pytest.raises(ValueError, match=r"z1 and z2 must both have shape \(N, D\)"):
        nt_xent(torch.randn(4, 8), torch.randn(5, 8), 0.1)
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        nt_xent(torch.randn(4), torch.randn(4), 0.1)


@pytest.mark.parametrize("tau_kind", ["tensor0d", "per_anchor"])
def test_gradcheck_embeddings_and_tau(tau_kind):
    z1, z2 = make_pairs(3, 4, torch.float64, seed=7)
    tau, _ = make_tau(tau_kind, 0.2, 6, torch.float64)
    inputs = (z1.requires_grad_(), z2.requires_grad_(), tau.requires_grad_())
    assert gradcheck(nt_xent, inputs)


def test_gradcheck_small_tau():
    z1, z2 = make_pairs(3, 4, torch.float64, seed=8)
    tau = torch.tensor(0.03, dtype=torch.float64, requires_grad=True)
    assert gradcheck(nt_xent, (z1.requires_grad_(), z2.requires_grad_(), tau), eps=1e-7, atol=1e-4)


def _bf16_and_fp32_runs(tau: float):
    torch.manual_seed(0)
    model = nn.Linear(32, 16)
    # Inputs around a shared direction: cosines differ by ~1e-2, so at τ = 0.01 the softmax is not
    # saturated (loss ~3 of at most log 31) and gradients are O(1): the regime where precision matters.
    base = torch.randn(1, 32)
    x1 = base + 0.1 * torch.randn(16, 32)
    x2 = x1 + 0.05 * torch.randn(16, 32)
    runs = {}
    for name, enabled in (("bf16", True), ("fp32", False)):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            z1, z2 = model(x1), model(x2)
            loss = nt_xent(z1, z2, tau)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        runs[name] = (loss.detach(), grads, z1.detach(), z2.detach())
    return runs


def test_bf16_autocast_small_tau_is_finite_and_close_to_fp32():
    tau = 0.01
    runs = _bf16_and_fp32_runs(tau)
    loss_b, grad_b, z1_b, z2_b = runs["bf16"]
    loss_f, grad_f, z1_f, z2_f = runs["fp32"]
    assert z1_b.dtype == torch.bfloat16 and z1_f.dtype == torch.float32  # autocast really was on / off
    assert loss_b.dtype == torch.float32
    assert torch.isfinite(loss_b) and torch.isfinite(grad_b).all()

    # The loss itself runs in float32 under autocast: it equals the float32 loss of the bf16 embeddings.
    # (Logits in bf16 would be off by ~0.1-0.5 at τ = 0.01: bf16 spacing between 64 and 128 is 0.5.)
    assert float(loss_b) == pytest.approx(float(nt_xent(z1_b.float(), z2_b.float(), tau)), rel=1e-6, abs=1e-6)

    # What remains is the bf16 rounding of the model's output. Cross-entropy moves by at most twice the
    # largest logit change, and a logit is a cosine over τ, so |ΔL| <= 2 max|Δcos| / τ (a theorem, not a
    # tuned number). Here that bound is ~0.06; bf16 keeps 8 significant bits (relative rounding 2^-9),
    # so a 1% relative tolerance on a loss of ~3 is the same order and still far from saturation tricks.
    def cosines(a, b):
        u = F.normalize(torch.cat([a, b]).float(), dim=1)
        return u @ u.T

    bound = 2 * (cosines(z1_b, z2_b) - cosines(z1_f, z2_f)).abs().max() / tau
    assert abs(float(loss_b - loss_f)) <= float(bound)
    assert float(loss_f) > 1.0  # not saturated: the comparison below is meaningful
    assert float(loss_b) == pytest.approx(float(loss_f), rel=0.01)
    # Gradients (O(1) here): same direction and size up to bf16 rounding of the activations (~1%).
    assert float(grad_f.norm()) > 0.1
    assert float(F.cosine_similarity(grad_b, grad_f, dim=0)) > 0.99
    assert float((grad_b - grad_f).norm() / grad_f.norm()) < 0.1
