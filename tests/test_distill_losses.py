"""Distillation losses against float64 per-sample references: Hinton KD (with its T² factor) and SEED
relational KD (queue + the sample's own teacher embedding); gradients, including into a learnable τ."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from simclr_tau.losses import kd_loss, relational_kd_loss


def _log_softmax(values: list[float]) -> list[float]:
    m = max(values)
    log_z = m + math.log(sum(math.exp(v - m) for v in values))
    return [v - log_z for v in values]


def reference_kd(student, teacher, temps: list[float]) -> float:
    """T_i² · Σ_c p_t (log p_t − log p_s) per sample, averaged over the batch (float64, one row at a time)."""
    total = 0.0
    for s_row, t_row, T in zip(student.double().tolist(), teacher.double().tolist(), temps):
        log_p_s = _log_softmax([v / T for v in s_row])
        log_p_t = _log_softmax([v / T for v in t_row])
        total += T**2 * sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_p_t, log_p_s))
    return total / len(temps)


def reference_relational(student, teacher, queue, taus_s: list[float], taus_t: list[float]) -> float:
    """SEED: per sample, anchors = [queue; own teacher embedding], loss = −Σ_j p^T_j log p^S_j."""
    unit = lambda x: [r / r.norm() for r in x.detach().double()]
    s, t = unit(student), unit(teacher)
    q = unit(queue) if queue is not None else []
    total = 0.0
    for i in range(len(s)):
        anchors = q + [t[i]]
        log_p_s = _log_softmax([float(s[i] @ d) / taus_s[i] for d in anchors])
        log_p_t = _log_softmax([float(t[i] @ d) / taus_t[i] for d in anchors])
        total += -sum(math.exp(lt) * ls for lt, ls in zip(log_p_t, log_p_s))
    return total / len(s)


def make_temp(kind: str, value: float, b: int, dtype: torch.dtype, seed: int = 1):
    if kind == "float":
        return value, [value] * b
    if kind == "tensor0d":
        t = torch.tensor(value, dtype=dtype)
        return t, [float(t)] * b
    g = torch.Generator().manual_seed(seed)
    t = (value * (0.5 + torch.rand(b, generator=g, dtype=torch.float64))).to(dtype)
    return t, t.tolist()


def _close(loss: torch.Tensor, expected: float, dtype: torch.dtype) -> None:
    assert loss.ndim == 0 and loss.dtype == dtype
    if dtype == torch.float64:
        assert float(loss) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    else:
        assert float(loss) == pytest.approx(expected, rel=1e-4, abs=1e-4)


# --- Hinton KD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["float", "tensor0d", "per_sample"])
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("b,c", [(1, 3), (4, 10), (7, 5)])
def test_kd_matches_reference_with_T_squared(b, c, T, kind, dtype):
    g = torch.Generator().manual_seed(b * 10 + c)
    student = (3 * torch.randn(b, c, generator=g, dtype=torch.float64)).to(dtype)
    teacher = (3 * torch.randn(b, c, generator=g, dtype=torch.float64)).to(dtype)
    T_arg, temps = make_temp(kind, T, b, dtype)
    _close(kd_loss(student, teacher, T_arg), reference_kd(student, teacher, temps), dtype)


def test_kd_T_squared_factor_is_present():
    # Without T² the loss at T = 10 would be 100x smaller than T² · KL; check the ratio explicitly.
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(s / 10, 1), torch.log_softmax(t / 10, 1), log_target=True, reduction="batchmean"
    )
    assert float(kd_loss(s, t, 10.0)) == pytest.approx(100 * float(kl), rel=1e-10)


def test_kd_is_zero_for_identical_logits_and_teacher_is_constant():
    s = torch.randn(4, 6, requires_grad=True)
    t = s.detach().clone().requires_grad_()
    loss = kd_loss(s, t, 2.0)
    assert abs(float(loss.detach())) < 1e-6
    (kd_loss(s, t + 1.0, 2.0) + kd_loss(s, 2 * t, 2.0)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


@pytest.mark.parametrize("kind", ["tensor0d", "per_sample"])
def test_kd_gradcheck_student_and_T(kind):
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    T, _ = make_temp(kind, 2.0, 3, torch.float64)
    assert gradcheck(lambda s, T: kd_loss(s, t, T), (s.requires_grad_(), T.requires_grad_()))


def test_kd_rejects_bad_inputs():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"student and teacher logits must both have shape \(B, C\)"):
        kd_loss(s, t[:, :5], 2.0)
    with pytest.raises(ValueError, match=r"T must be a scalar or have shape \(4,\).*got \(6,\)"):
        kd_loss(s, t, torch.ones(6))
    with pytest.raises(ValueError, match=r"T=0 must be > 0"):
        kd_loss(s, t, 0)


# --- SEED relational KD ------------------------------------------------------------------------------


def _seed_inputs(b: int, d: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, d, generator=g, dtype=torch.float64)
    student = teacher + 0.8 * torch.randn(b, d, generator=g, dtype=torch.float64)
    queue = torch.randn(k, d, generator=g, dtype=torch.float64) if k else None
    cast = lambda x: None if x is None else x.to(dtype)
    return cast(student), cast(teacher), cast(queue)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["float", "tensor0d", "per_sample"])
@pytest.mark.parametrize("tau_s,tau_t", [(0.2, 0.07), (0.1, 0.01), (1.0, 0.5)])
@pytest.mark.parametrize("b,k", [(1, 4), (3, 6), (6, 2)])
def test_relational_matches_reference(b, k, tau_s, tau_t, kind, dtype):
    student, teacher, queue = _seed_inputs(b, 8, k, dtype, seed=b + k)
    ts_arg, taus_s = make_temp(kind, tau_s, b, dtype, seed=1)
    tt_arg, taus_t = make_temp(kind, tau_t, b, dtype, seed=2)
    loss = relational_kd_loss(student, teacher, queue, ts_arg, tt_arg)
    expected = reference_relational(student, teacher, queue, taus_s, taus_t)
    if dtype == torch.float64:
        _close(loss, expected, dtype)
    else:  # float32 cosines (~1e-6) scaled by 1/τ
        assert float(loss) == pytest.approx(expected, abs=4e-6 / min(taus_s + taus_t))


def test_relational_without_queue_has_only_the_own_anchor():
    student, teacher, _ = _seed_inputs(4, 8, 0, torch.float64)
    assert float(relational_kd_loss(student, teacher, None, 0.1, 0.05)) == 0.0


def test_relational_gradients_student_only_and_finite_into_learnable_tau():
    student, teacher, queue = _seed_inputs(4, 8, 5, torch.float32)
    student.requires_grad_(), teacher.requires_grad_(), queue.requires_grad_()
    tau_s = torch.tensor(0.1, requires_grad=True)
    relational_kd_loss(student, teacher, queue, tau_s, 0.05).backward()
    assert teacher.grad is None and queue.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # Regression: masking the non-own batch entries with −inf *before* dividing by τ gave a NaN here.
    assert torch.isfinite(tau_s.grad) and float(tau_s.grad) != 0.0


@pytest.mark.parametrize("kind", ["tensor0d", "per_sample"])
def test_relational_gradcheck_student_and_tau(kind):
    student, teacher, queue = _seed_inputs(3, 4, 5, torch.float64, seed=9)
    tau_s, _ = make_temp(kind, 0.2, 3, torch.float64, seed=3)
    tau_t, _ = make_temp(kind, 0.1, 3, torch.float64, seed=4)
    inputs = (student.requires_grad_(), tau_s.requires_grad_(), tau_t.requires_grad_())
    assert gradcheck(lambda s, ts, tt: relational_kd_loss(s, teacher, queue, ts, tt), inputs)


def test_relational_rejects_bad_inputs():
    student, teacher, queue = _seed_inputs(4, 8, 5, torch.float32)
    with pytest.raises(ValueError, match=r"student and teacher embeddings must both be \(B, D\)"):
        relational_kd_loss(student, teacher[:3], queue, 0.1, 0.05)
    with pytest.raises(ValueError, match=r"tau_s must be a scalar or have shape \(4,\)"):
        relational_kd_loss(student, teacher, queue, torch.ones(5), 0.05)
    with pytest.raises(ValueError, match=r"tau_t=-0.1 must be > 0"):
        relational_kd_loss(student, teacher, queue, 0.1, -0.1)
