"""Gradient reversal (Ganin & Lempitsky, ICML 2015) and the cosine λ ramp of curriculum temperature
distillation (CTKD, Li et al., AAAI 2023, "Curriculum Temperature for Knowledge Distillation").

A gradient-reversal layer is the identity forward and multiplies the incoming gradient by −λ backward.
Put behind a learnable distillation temperature T, it turns one optimizer step into a min-max game:
the student descends the distillation loss while T *ascends* it (T searches for the hardest softening),
with a strength λ that grows as training goes on (an easy-to-hard curriculum):

    λ(step) = λ_min + ½(λ_max − λ_min)(1 − cos(π · min(step / ramp_steps, 1)))

which is CTKD's λ_n = λ_min + ½(λ_max − λ_min)(1 + cos((1 + min(n / E, 1)) π)) written per step.
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import torch
from torch import Tensor, nn


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, lambd: float) -> Tensor:
        ctx.lambd = lambd
        return x.view_as(x)  # a new tensor object: autograd must see an op to reverse its gradient

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        return -ctx.lambd * grad, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    """Identity forward; gradient × (−λ) backward.

    Example:
        >>> t = torch.tensor(2.0, requires_grad=True)
        >>> (grad_reverse(t, 0.5) ** 2).backward()   # d(t²)/dt = 4, reversed and scaled
        >>> float(t.grad)
        -2.0
    """
    return _GradReverse.apply(x, float(lambd))


class GradientReversal(nn.Module):
    """:func:`grad_reverse` with a settable factor ``lambd`` (the training loop updates it every step)."""

    def __init__(self, lambd: float = 1.0) -> None:
        super().__init__()
        self.lambd = float(lambd)

    def forward(self, x: Tensor) -> Tensor:
        return grad_reverse(x, self.lambd)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd:g}"

    # λ travels with checkpoints (it is recomputed from the step anyway, but a state_dict is self-describing)
    def get_extra_state(self) -> dict:
        return {"lambd": self.lambd}

    def set_extra_state(self, state: dict) -> None:
        self.lambd = float(state["lambd"])


def cosine_ramp(step: int, ramp_steps: int, lo: float, hi: float) -> float:
    """λ from ``lo`` at step 0 to ``hi`` at ``ramp_steps`` (and after), along half a cosine.

    Example:
        >>> [round(cosine_ramp(s, 4, 0.0, 1.0), 4) for s in (0, 1, 2, 4, 9)]
        [0.0, 0.1464, 0.5, 1.0, 1.0]
    """
    if ramp_steps < 1:
        raise ValueError(f"ramp_steps={ramp_steps} must be >= 1")
    frac = min(max(step, 0) / ramp_steps, 1.0)
    return lo + 0.5 * (hi - lo) * (1.0 - math.cos(math.pi * frac))
