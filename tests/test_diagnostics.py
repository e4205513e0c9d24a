"""Alignment and uniformity (Wang & Isola 2020) against straightforward float64 reference loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from simclr_tau.losses import alignment, uniformity


def _unit(x: torch.Tensor) -> list[torch.Tensor]:
    return [r / r.norm() for r in x.detach().double()]


def reference_alignment(x, y, alpha: float) -> float:
    """Mean over positive pairs of ‖x_i − y_i‖₂^α on the unit sphere."""
    xs, ys = _unit(x), _unit(y)
    return sum(float((a - b).norm()) ** alpha for a, b in zip(xs, ys)) / len(xs)


def reference_uniformity(x, t: float) -> float:
    """log of the mean over distinct pairs i < j of exp(−t ‖x_i − x_j‖₂²) on the unit sphere."""
    xs = _unit(x)
    terms = [math.exp(-t * float(((xs[i] - xs[j]) ** 2).sum())) for i in range(len(xs)) for j in range(i + 1, len(xs))]
    return math.log(sum(terms) / len(terms))


def _data(n: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(dtype), (x + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("n,d", [(1, 3), (5, 3), (16, 8)])
def test_alignment_matches_reference(n, d, alpha, dtype):
    x, y = _data(n, d, dtype, seed=n + d)
    value = alignment(x, y, alpha)
    assert value.ndim == 0 and value.dtype == dtype
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    assert float(value) == pytest.approx(reference_alignment(x, y, alpha), rel=rel)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("t", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("n,d", [(2, 3), (5, 3), (16, 8)])
def test_uniformity_matches_reference(n, d, t, dtype):
    x, _ = _data(n, d, dtype, seed=n * d)
    value = uniformity(x, t)
    assert value.ndim == 0 and value.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float(value) == pytest.approx(reference_uniformity(x, t), rel=tol, abs=tol)


def test_analytic_values():
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    assert float(alignment(x, 2 * x)) == 0.0  # same directions
    assert float(alignment(x, -x)) == pytest.approx(4.0)  # antipodal: ‖x − y‖² = 4
    # Two orthogonal unit vectors: ‖x_1 − x_2‖² = 2, so uniformity = −2t.
    assert float(uniformity(x, t=2.0)) == pytest.approx(-4.0)
    # A collapsed representation has the worst (largest) uniformity, 0.
    assert float(uniformity(torch.ones(6, 4))) == pytest.approx(0.0, abs=1e-6)
    # Pairs i < j only: 3 points, one duplicated -> mean of (1, e^{-4}, e^{-4}) for t = 2 and orthogonal rest.
    three = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert float(uniformity(three)) == pytest.approx(math.log((1 + 2 * math.exp(-4.0)) / 3), rel=1e-6)


def test_gradcheck():
    x, y = _data(4, 3, torch.float64, seed=3)
    x.requires_grad_(), y.requires_grad_()
    assert gradcheck(lambda x, y: alignment(x, y), (x, y))
    assert gradcheck(lambda x: uniformity(x), (x,))
