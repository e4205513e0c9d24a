"""The robust (SogCLR / iSogCLR) temperature objective against slow per-anchor float64 references, autograd,
the interior fixed point KL(p ‖ U) = ρ of the τ update, float32 stability at τ = 0.01, and validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from simclr_tau.losses.dro import moco_margins, robust_terms, simclr_margins, tau_momentum_step
from simclr_tau.losses.nt_xent import nt_xent


def make_margins(b: int, k: int, seed: int, scale: float = 0.5, dtype=torch.float64):
    """Margins h (B, K) in about [−1.5, 0.5] and a mask with 1..K negatives per row (never empty)."""
    g = torch.Generator().manual_seed(seed)
    h = (scale * torch.randn(b, k, generator=g, dtype=torch.float64) - 0.5).clamp(-2, 2)
    mask = torch.rand(b, k, generator=g) < 0.7
    mask[torch.arange(b), torch.randint(k, (b,), generator=g)] = True
    return h.to(dtype), mask


def make_taus(kind: str, b: int, seed: int):
    """(the τ argument, the list of per-anchor τ the reference uses)."""
    if kind == "float":
        return 0.3, [0.3] * b
    if kind == "tensor0d":
        return torch.tensor(0.2, dtype=torch.float64), [0.2] * b
    g = torch.Generator().manual_seed(seed)
    t = 0.05 + torch.rand(b, generator=g, dtype=torch.float64)  # 0.05 .. 1.05
    return t, t.tolist()


def reference_terms(h, taus, rho, mask=None, log_u_prev=None, gamma=1.0):
    """Slow, obviously correct: one anchor at a time in Python floats (float64), log-sum-exp written out.

    Returns lists (objective, kl, grad_tau, log_u). An anchor's ū is g on the batch estimator or on its first
    visit (log_u_prev NaN/−inf), else (1 − γ) ū_prev + γ g.
    """
    out = {"objective": [], "kl": [], "grad_tau": [], "log_u": []}
    for i in range(h.shape[0]):
        tau = taus[i]
        z = [float(h[i, j]) / tau for j in range(h.shape[1]) if mask is None or bool(mask[i, j])]
        m = len(z)
        top = max(z)
        lse = top + math.log(sum(math.exp(v - top) for v in z))
        log_g = lse - math.log(m)
        p = [math.exp(v - lse) for v in z]
        kl = sum(pj * math.log(m * pj) for pj in p if pj > 0)
        prev = None if log_u_prev is None else float(log_u_prev[i])
        if prev is None or not math.isfinite(prev):
            log_u = log_g
        else:  # log((1 − γ) e^prev + γ e^log_g), shifted by the larger exponent
            a, c = math.log1p(-gamma) + prev if gamma < 1 else -math.inf, math.log(gamma) + log_g
            top2 = max(a, c)
            log_u = top2 + math.log(math.exp(a - top2) + math.exp(c - top2))
        weighted = sum(math.exp(v - log_u) * v for v in z) / m  # (1/m) Σ [exp(h/τ)/ū] h/τ
        out["objective"].append(tau * log_u + rho * tau)
        out["kl"].append(kl)
        out["grad_tau"].append(log_u + rho - weighted)
        out["log_u"].append(log_u)
    return out


def reference_objective_autograd(h, tau, rho, mask=None):
    """F_i = τ_i log((1/m_i) Σ_j exp(h_ij/τ_i)) + ρ τ_i, one anchor at a time, differentiable in h and τ."""
    tau = tau.expand(h.shape[0])
    rows = []
    for i in range(h.shape[0]):
        hi = h[i] if mask is None else h[i][mask[i]]
        rows.append(tau[i] * torch.log(torch.exp(hi / tau[i]).mean()) + rho * tau[i])
    return torch.stack(rows)


def prev_table(b: int, seed: int):
    """Stored log ū: finite values around the batch's, with some never-seen anchors (−inf and NaN)."""
    g = torch.Generator().manual_seed(seed)
    prev = torch.randn(b, generator=g, dtype=torch.float64) - 1.0
    prev[0], prev[-1] = float("-inf"), float("nan")
    return prev


@pytest.mark.parametrize("estimator", ["batch", "sogclr", "first_visit"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("tau_kind", ["float", "tensor0d", "per_anchor"])
@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_matches_per_anchor_reference(estimator, masked, tau_kind, rho):
    b, k = 6, 9
    h, mask = make_margins(b, k, seed=11)
    mask = mask if masked else None
    tau, taus = make_taus(tau_kind, b, seed=12)
    prev, gamma = None, 1.0
    if estimator == "sogclr":
        prev, gamma = prev_table(b, seed=13), 0.3
    elif estimator == "first_visit":
        prev, gamma = torch.full((b,), float("-inf"), dtype=torch.float64), 0.3
    terms = robust_terms(h, tau, rho, neg_mask=mask, log_u_prev=prev, gamma=gamma)
    ref = reference_terms(h, taus, rho, mask, prev, gamma)
    for name in ("objective", "kl", "grad_tau", "log_u"):
        got = getattr(terms, name)
        assert got.shape == (b,) and got.dtype == torch.float64 and not got.requires_grad, name
        assert got.tolist() == pytest.approx(ref[name], rel=1e-10, abs=1e-12), name
    if estimator == "first_visit":  # never seen: exactly the batch estimator
        batch = robust_terms(h, tau, rho, neg_mask=mask)
        assert torch.equal(terms.log_u, batch.log_u)
    if estimator == "sogclr":  # the stored value really enters (guards against ignoring log_u_prev)
        batch = robust_terms(h, tau, rho, neg_mask=mask)
        assert (terms.log_u[1:-1] - batch.log_u[1:-1]).abs().min() > 1e-3


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("rho", [0.1, 1.0])
def test_grad_tau_is_autograd_of_objective_and_rho_minus_kl(masked, rho):
    h, mask = make_margins(7, 10, seed=21)
    mask = mask if masked else None
    tau = (0.1 + torch.rand(7, generator=torch.Generator().manual_seed(22), dtype=torch.float64)).requires_grad_()
    (dF_dtau,) = torch.autograd.grad(reference_objective_autograd(h, tau, rho, mask).sum(), tau)
    terms = robust_terms(h, tau, rho, neg_mask=mask)
    assert torch.allclose(terms.grad_tau, dF_dtau, rtol=1e-10, atol=1e-12)
    assert torch.allclose(terms.grad_tau, rho - terms.kl, rtol=1e-10, atol=1e-12)
    assert (terms.kl >= 0).all() and (terms.grad_tau != 0).all()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("tau_kind", ["float", "per_anchor"])
def test_encoder_gradient(masked, tau_kind):
    b = 6
    h, mask = make_margins(b, 8, seed=31)
    m_mask = mask if masked else torch.ones_like(mask)
    tau, taus = make_taus(tau_kind, b, seed=32)
    tau_col = torch.as_tensor(taus, dtype=torch.float64)[:, None]
    z = (h / tau_col).masked_fill(~m_mask, float("-inf"))
    rho = 0.2
    # Batch estimator: the softmax weights p_ij, which is also autograd of Σ F_i (τ held constant).
    hb = h.clone().requires_grad_()
    terms = robust_terms(hb, tau, rho, neg_mask=mask if masked else None)
    assert terms.encoder_loss.requires_grad and torch.allclose(terms.encoder_loss, terms.objective, rtol=1e-12)
    (grad,) = torch.autograd.grad(terms.encoder_loss.sum(), hb)
    assert torch.allclose(grad, torch.softmax(z, dim=1), rtol=1e-10, atol=1e-14)
    hr = h.clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(reference_objective_autograd(hr, tau_col[:, 0], rho, m_mask).sum(), hr)
    assert torch.allclose(grad, grad_ref, rtol=1e-10, atol=1e-14)
    # SogCLR: the detached weights exp(h/τ) / (m ū), with ū the updated estimate.
    hs = h.clone().requires_grad_()
    terms = robust_terms(hs, tau, rho, neg_mask=mask if masked else None, log_u_prev=prev_table(b, 33), gamma=0.4)
    (grad,) = torch.autograd.grad(terms.encoder_loss.sum(), hs)
    m = m_mask.sum(dim=1, keepdim=True).double()
    expected = torch.exp(z) / (m * terms.log_u.exp()[:, None])
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(grad, torch.softmax(z, dim=1), atol=1e-3)  # the stale ū really changes them


def test_tau_with_grad_is_detached():
    h, _ = make_margins(4, 5, seed=41)
    tau = torch.full((4,), 0.3, dtype=torch.float64, requires_grad=True)
    terms = robust_terms(h.requires_grad_(), tau, 0.1)
    terms.encoder_loss.sum().backward()
    assert tau.grad is None and h.grad is not None


def reference_simclr_margins(u_local, candidates, offset):
    two_n, c = u_local.shape[0], candidates.shape[0]
    n = two_n // 2
    h = torch.zeros(two_n, c, dtype=torch.float64)
    mask = torch.zeros(two_n, c, dtype=torch.bool)
    for i in range(two_n):
        pos = offset + (i + n) % two_n
        s_pos = float(u_local[i] @ candidates[pos])
        for j in range(c):
            h[i, j] = float(u_local[i] @ candidates[j]) - s_pos
            mask[i, j] = j != offset + i and j != pos
    return h, mask


def unit_views(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = z1 + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return F.normalize(z1, dim=1), F.normalize(z2, dim=1)


@pytest.mark.parametrize("n", [1, 3])
def test_simclr_margins_two_rank_layout(n):
    z1_0, z2_0 = unit_views(n, 5, seed=51)
    z1_1, z2_1 = unit_views(n, 5, seed=52)
    candidates = torch.cat([z1_0, z2_0, z1_1, z2_1]).requires_grad_()  # rank-major: [z1_r; z2_r]
    u_local = torch.cat([z1_1, z2_1]).requires_grad_()  # rank 1's anchors
    h, mask = simclr_margins(u_local, candidates, offset=2 * n)
    h_ref, mask_ref = reference_simclr_margins(u_local.detach(), candidates.detach(), 2 * n)
    assert h.shape == (2 * n, 4 * n) and torch.equal(mask, mask_ref)
    assert torch.allclose(h, h_ref, rtol=0, atol=1e-12)
    assert (mask.sum(dim=1) == 4 * n - 2).all()
    (h * torch.rand(h.shape, generator=torch.Generator().manual_seed(53), dtype=torch.float64)).sum().backward()
    assert u_local.grad.abs().sum() > 0 and candidates.grad.abs().sum() > 0


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_simclr_margins_one_rank_agree_with_nt_xent(tau):
    # ℓ_i = log(1 + Σ_j exp(h_ij/τ)) = softplus(log m + log g_i): the same positives and negatives as nt_xent.
    z1, z2 = unit_views(4, 6, seed=54)
    u = torch.cat([z1, z2])
    h, mask = simclr_margins(u, u, offset=0)
    terms = robust_terms(h, tau, 0.0, neg_mask=mask)
    m = mask.sum(dim=1).double()
    loss = F.softplus(m.log() + terms.log_u).mean()
    assert float(loss) == pytest.approx(float(nt_xent(z1, z2, tau)), rel=1e-10)


def test_moco_margins_match_loop():
    g = torch.Generator().manual_seed(61)
    q, k, queue = (F.normalize(torch.randn(s, 4, generator=g, dtype=torch.float64), dim=1) for s in (3, 3, 7))
    q.requires_grad_()
    k.requires_grad_()
    h = moco_margins(q, k, queue)
    qd, kd = q.detach(), k.detach()
    expected = [[float(qd[i] @ queue[j]) - float(qd[i] @ kd[i]) for j in range(7)] for i in range(3)]
    assert h.shape == (3, 7)
    assert torch.allclose(h.detach(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    h.sum().backward()
    assert q.grad.abs().sum() > 0 and k.grad is None  # keys are constants, as in MoCo


def kl_of_tau(h_row: torch.Tensor, tau: float) -> float:
    log_p = torch.log_softmax(h_row / tau, dim=0)
    return float((log_p.exp() * (log_p + math.log(h_row.numel()))).sum())


def bisect_root(h_row: torch.Tensor, rho: float, lo: float = 1e-3, hi: float = 100.0) -> float:
    """The τ with KL(p_τ ‖ U) = ρ; KL decreases in τ, so bisect (in log τ) in float64."""
    assert kl_of_tau(h_row, lo) > rho > kl_of_tau(h_row, hi)
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if kl_of_tau(h_row, mid) > rho else (lo, mid)
    return math.sqrt(lo * hi)


def fixed_batch():
    """4 anchors x 32 negatives, all margins < 0 (every positive scores above its negatives)."""
    g = torch.Generator().manual_seed(71)
    return -(0.05 + 0.4 * torch.rand(4, 32, generator=g, dtype=torch.float64)) * torch.tensor([[1.0], [0.5], [2.0], [1.0]])


@pytest.mark.parametrize("rho", [0.1, 0.3, 1.0])
def test_tau_update_converges_to_kl_equals_rho(rho):
    h = fixed_batch()
    roots = torch.tensor([bisect_root(row, rho) for row in h], dtype=torch.float64)
    tau_min, tau_max = 0.005, 1.0
    assert (roots > 2 * tau_min).all() and (roots < tau_max / 2).all()
    hh = torch.cat([h, h])  # rows 0-3 start above their root, rows 4-7 below
    tau = torch.tensor([tau_max] * 4 + [tau_min] * 4, dtype=torch.float64)
    momentum = torch.zeros_like(tau)
    for _ in range(1200):
        grad = robust_terms(hh, tau, rho).grad_tau
        tau, momentum = tau_momentum_step(tau, momentum, grad, eta=0.03, beta=0.9, tau_min=tau_min, tau_max=tau_max)
    assert torch.allclose(tau, torch.cat([roots, roots]), rtol=1e-3, atol=0)
    assert robust_terms(hh, tau, rho).kl.tolist() == pytest.approx([rho] * 8, abs=1e-3)


def test_plain_nt_xent_log_tau_runs_to_its_lower_bound():
    # Same batch with the positive logit in the softmax: −log(e^{s⁺/τ} / (e^{s⁺/τ} + Σ e^{s⁻/τ})) is
    # log(1 + Σ_j e^{h_j/τ}), decreasing as τ → 0 when h < 0: no interior optimum, unlike the robust objective.
    h = fixed_batch()
    tau_min = 0.02
    log_tau = torch.tensor(math.log(0.5), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([log_tau], lr=1.0)
    for _ in range(300):
        opt.zero_grad()
        F.softplus(torch.logsumexp(h / log_tau.exp(), dim=1)).mean().backward()
        opt.step()
        with torch.no_grad():
            log_tau.clamp_(min=math.log(tau_min))
    assert math.exp(log_tau.item()) == pytest.approx(tau_min, rel=1e-9)


@pytest.mark.parametrize("estimator", ["batch", "sogclr"])
def test_small_tau_float32_matches_float64(estimator):
    g = torch.Generator().manual_seed(81)
    h64 = (4 * torch.rand(8, 20, generator=g, dtype=torch.float64) - 2.0)  # h ∈ [−2, 2], h/τ up to 200
    h64[0, 0] = 2.0
    prev = None if estimator == "batch" else torch.tensor([150.0, -50.0, 0.0, 300.0, float("-inf"), 10.0, 190.0, 1.0])
    h32 = h64.float().requires_grad_()
    t32 = robust_terms(h32, 0.01, 0.5, log_u_prev=prev, gamma=0.1)
    t64 = robust_terms(h32.detach().double(), 0.01, 0.5, log_u_prev=None if prev is None else prev.double(), gamma=0.1)
    t32.encoder_loss.sum().backward()
    assert t32.log_u.dtype == torch.float32 and torch.isfinite(h32.grad).all()
    for name in ("objective", "kl", "grad_tau", "log_u", "encoder_loss"):
        a, b = getattr(t32, name).detach(), getattr(t64, name)
        assert torch.isfinite(a).all(), name
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-4), name


def test_bf16_margins_compute_in_float32():
    h, _ = make_margins(4, 6, seed=91, dtype=torch.bfloat16)
    assert robust_terms(h, 0.1, 0.1).grad_tau.dtype == torch.float32


def test_validation_errors():
    h, mask = make_margins(4, 6, seed=95)
    with pytest.raises(ValueError, match="h must have shape"):
        robust_terms(h[0], 0.1, 0.1)
    with pytest.raises(ValueError, match=r"tau must be a scalar or have shape \(4,\)"):
        robust_terms(h, torch.full((5,), 0.1), 0.1)
    for bad in (0.0, -0.1, torch.tensor([0.1, 0.1, 0.0, 0.1])):
        with pytest.raises(ValueError, match="tau"):
            robust_terms(h, bad, 0.1)
    with pytest.raises(ValueError, match="rho"):
        robust_terms(h, 0.1, -0.1)
    for gamma in (0.0, 1.5):
        with pytest.raises(ValueError, match="gamma"):
            robust_terms(h, 0.1, 0.1, gamma=gamma)
    with pytest.raises(ValueError, match="neg_mask"):
        robust_terms(h, 0.1, 0.1, neg_mask=mask[:, :3])
    empty = mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match="without negatives"):
        robust_terms(h, 0.1, 0.1, neg_mask=empty)
    with pytest.raises(ValueError, match="log_u_prev"):
        robust_terms(h, 0.1, 0.1, log_u_prev=torch.zeros(3))
    u = torch.randn(4, 3)
    with pytest.raises(ValueError, match="u_local"):
        simclr_margins(torch.randn(3, 3), u, 0)
    with pytest.raises(ValueError, match="candidates"):
        simclr_margins(u, torch.randn(8, 2), 0)
    with pytest.raises(ValueError, match="offset"):
        simclr_margins(u, torch.randn(8, 3), 6)
    with pytest.raises(ValueError, match="q and k"):
        moco_margins(torch.randn(3, 4), torch.randn(2, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="queue"):
        moco_margins(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 3))
    t, m = torch.full((3,), 0.1), torch.zeros(3)
    with pytest.raises(ValueError, match="share one shape"):
        tau_momentum_step(t, m, torch.zeros(2), 0.1, 0.9, 0.01, 1.0)
    for kw in (dict(eta=0.0), dict(beta=0.0), dict(beta=1.1), dict(tau_min=0.0), dict(tau_min=2.0)):
        args = dict(eta=0.1, beta=0.9, tau_min=0.01, tau_max=1.0) | kw
        with pytest.raises(ValueError):
            tau_momentum_step(t, m, m, **args)


def test_momentum_step_formula_and_projection():
    tau, mom, grad = torch.tensor([0.5, 0.02, 0.9]), torch.tensor([0.1, 0.0, -1.0]), torch.tensor([1.0, 2.0, -3.0])
    tau_new, mom_new = tau_momentum_step(tau, mom, grad, eta=0.1, beta=0.8, tau_min=0.01, tau_max=1.0)
    assert mom_new.tolist() == pytest.approx([0.82, 1.6, -2.6])
    assert tau_new.tolist() == pytest.approx([0.5 - 0.082, 0.01, 1.0])  # the last two hit the bounds
