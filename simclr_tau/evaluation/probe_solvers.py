"""The solvers of the linear probe: a grid of softmax-regression heads fitted at once, as one stacked
(G, F, C) problem (mini-batch SGD / AdamW with a cosine schedule), or one full-batch L-BFGS solve per head.
The protocol around them (validation split, grid, selection) is :mod:`simclr_tau.evaluation.linear_probe`.

Why hand-written SGD / AdamW updates and not torch.optim: one torch.optim over the stacked grid needs one
leaf tensor per head (param groups carry lr / wd) and a torch.stack of them every step; measured (issue 19,
2-core CPU, batch 256 x 512 features x 10 classes, 12-head grid, foreach, 24 param groups) that is 2.1-2.4 vs
1.5 ms/step for SGD and 2.4-2.6 vs 1.6 ms/step for AdamW (1.4-1.6x slower). tests/test_linear_probe.py checks
that these updates equal torch.optim.SGD / AdamW run on each head alone.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


@torch.no_grad()
def _sgd_update(W: Tensor, b: Tensor, state: Dict[str, Tensor], lr: Tensor, wd: Tensor, momentum: float) -> None:
    """torch.optim.SGD (momentum, dampening 0, coupled weight decay on W only), one lr/wd per head."""
    gW = W.grad + wd.view(-1, 1, 1) * W
    state["mW"].mul_(momentum).add_(gW)
    state["mb"].mul_(momentum).add_(b.grad)
    W.sub_(lr.view(-1, 1, 1) * state["mW"])
    b.sub_(lr.view(-1, 1) * state["mb"])


@torch.no_grad()
def _adamw_update(W: Tensor, b: Tensor, state: Dict[str, Tensor], lr: Tensor, wd: Tensor, betas: Tuple[float, float],
                  t: int, eps: float = 1e-8) -> None:
    """torch.optim.AdamW (decoupled weight decay on W only), one lr/wd per head."""
    b1, b2 = betas
    W.mul_(1 - lr.view(-1, 1, 1) * wd.view(-1, 1, 1))
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    for p, m, v, lr_view in ((W, state["mW"], state["vW"], lr.view(-1, 1, 1)), (b, state["mb"], state["vb"], lr.view(-1, 1))):
        m.mul_(b1).add_(p.grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
        p.sub_((lr_view / bc1) * m / denom)


def train_heads_minibatch(
    epoch_batches: Callable[[int], Iterable[Tuple[Tensor, Tensor]]], steps_per_epoch: int, dim: int, num_classes: int,
    grid: Sequence[Tuple[float, float]], cfg: Any, device: torch.device | str = "cpu",
) -> Tuple[Tensor, Tensor]:
    """Train one zero-initialized head per (lr, wd) on the same standardized batches.

    ``epoch_batches(epoch)`` yields ``(x (B, F), y (B,))``; ``cfg`` is a
    :class:`~simclr_tau.evaluation.linear_probe.ProbeConfig` (optimizer, epochs, momentum, betas).
    Returns stacked weights (G, F, C) and biases (G, C).
    """
    G = len(grid)
    lr0 = torch.tensor([g[0] for g in grid], dtype=torch.float32, device=device)
    wd = torch.tensor([g[1] for g in grid], dtype=torch.float32, device=device)
    W = torch.zeros(G, dim, num_classes, device=device, requires_grad=True)
    b = torch.zeros(G, num_classes, device=device, requires_grad=True)
    state = {n: torch.zeros_like(p) for n, p in (("mW", W), ("vW", W), ("mb", b), ("vb", b))}
    total, step = cfg.epochs * steps_per_epoch, 0  # type: ignore[operator]
    for epoch in range(cfg.epochs):  # type: ignore[arg-type]
        for x, y in epoch_batches(epoch):
            x, y = x.to(device), y.to(device)
            logits = torch.einsum("bf,gfc->gbc", x, W) + b[:, None, :]  # G x B x C
            # Σ_g mean_b CE: each head gets exactly the gradient of its own mean loss
            loss = F.cross_entropy(logits.reshape(-1, num_classes), y.repeat(G)) * G
            W.grad = b.grad = None
            loss.backward()
            lr = lr0 * _cosine(step, total)
            if cfg.optimizer == "sgd":
                _sgd_update(W, b, state, lr, wd, cfg.momentum)
            else:
                _adamw_update(W, b, state, lr, wd, cfg.betas, step + 1)
            step += 1
    return W.detach(), b.detach()


@torch.no_grad()
def ce_l2_loss_and_grad(x: Tensor, xT: Tensor, onehot: Tensor, W: Tensor, b: Tensor, wd: float
                        ) -> Tuple[Tensor, Tensor, Tensor]:
    """Loss mean CE(x W + b, y) + wd/2 ||W||² and its gradient, by hand:
    G = (softmax(x W + b) − onehot(y)) / N, dW = xᵀ G + wd W, db = Σ_n G_n (``xT``: x.t() made contiguous)."""
    logp = torch.log_softmax(torch.addmm(b, x, W), dim=1)
    loss = -(logp * onehot).sum() / len(x) + 0.5 * wd * W.pow(2).sum()
    G = logp.exp_().sub_(onehot).div_(len(x))
    return loss, torch.addmm(W, xT, G, beta=wd), G.sum(0)


def train_heads_lbfgs(x: Tensor, y: Tensor, num_classes: int, wds: Sequence[float], iters: int,
                      grad_tol: float = 1e-4) -> List[Tuple[Tensor, Tensor]]:
    """Full-batch L-BFGS on mean CE(x W + b, y) + wd/2 ||W||² (standardized features x), one solve per wd.

    Each head has its own L-BFGS (line search, curvature history, stopping test), in float64: solved as
    one stacked problem (issue 19, item 11), the stiff small-wd heads got the step sizes of the others and
    the stopping tests applied to the sum, leaving their probabilities up to 0.1-0.7 away from the optimum;
    in float32 the loss cannot resolve the flat small-wd optimum either. A head stops when
    max |grad| <= grad_tol · wd (its strong convexity is >= wd, so the weights are then within ~grad_tol of
    the optimum) or after ``iters`` iterations (always for wd = 0, which has no optimum on separable data).
    Returns [(W_g (F, C), b_g (C))] in x's dtype.
    """
    x64, heads = x.double(), []
    # The gradient is written by hand instead of taken by autograd: autograd's grad_W = x64.T @ G reads the
    # transposed (N, F) matrix column by column; with a contiguous copy of x64.T the same product is 5x faster
    # (issue 17: 54k x 256 features, one thread, two other jobs running: 24 vs 132 ms; one evaluation 3x faster; a
    # whole default probe 244 vs 486 s). Same float64 math; only the rounding order of the sums differs, which moves
    # heads stopped by the iteration cap by a few hundredths of a point (converged heads: identical accuracies).
    xT = x64.t().contiguous()
    onehot = F.one_hot(y.long(), num_classes).to(torch.float64)
    for wd in wds:
        W = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
        b = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=iters, max_eval=2 * iters, history_size=20,
                                tolerance_grad=max(grad_tol * wd, 1e-9), tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure(W: Tensor = W, b: Tensor = b, wd: float = wd) -> Tensor:
            loss, W.grad, b.grad = ce_l2_loss_and_grad(x64, xT, onehot, W, b, wd)
            return loss

        opt.step(closure)
        n_iter = opt.state[opt._params[0]]["n_iter"]
        if n_iter >= iters and wd > 0:
            warnings.warn(f"linear probe: the L-BFGS head with wd={wd:g} stopped at the iteration cap ({iters}) "
                          "before its gradient tolerance; raise --epochs for its exact optimum", RuntimeWarning, stacklevel=2)
        heads.append((W.detach().to(x.dtype), b.detach().to(x.dtype)))
    return heads
