"""The solvers of the linear probe: a grid of softmax-regression heads fitted at once, as one stacked
(G, F, C) problem (mini-batch SGD / AdamW with a cosine schedule) or one full-batch L-BFGS solve.
The protocol around them (validation split, grid, selection) is :mod:`simclr_tau.evaluation.linear_probe`.
"""

from __future__ import annotations

import math
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


def train_heads_lbfgs(x: Tensor, y: Tensor, num_classes: int, wds: Sequence[float], iters: int
                      ) -> List[Tuple[Tensor, Tensor]]:
    """Full-batch L-BFGS on Σ_g [mean CE(x W_g + b_g, y) + wd_g/2 ||W_g||²] (standardized features x).

    The heads of the weight-decay grid are solved as one problem: the objective is a sum of independent
    strictly convex terms (for wd_g > 0), so its minimizer is every head's own minimizer, and one
    ``x @ [W_1 .. W_G]`` per evaluation reads the (N, F) features once instead of G times (the solve is
    memory-bound on that read). Returns [(W_g (F, C), b_g (C))].
    """
    G, C = len(wds), num_classes
    W = torch.zeros(x.shape[1], G * C, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(G * C, dtype=x.dtype, device=x.device, requires_grad=True)
    wd = torch.tensor(list(wds), dtype=x.dtype, device=x.device).repeat_interleave(C)  # per column
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=iters, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")
    targets = y[:, None].expand(-1, G)  # N x G: every head has the same labels

    def closure() -> Tensor:
        opt.zero_grad()
        logits = (x @ W + b).view(-1, G, C).transpose(1, 2)  # N x C x G: cross_entropy's class dim is 1
        loss = F.cross_entropy(logits, targets) * G + 0.5 * (wd * W.pow(2)).sum()  # Σ_g mean_n CE
        loss.backward()
        return loss

    opt.step(closure)
    W, b = W.detach(), b.detach()
    return [(W[:, g * C:(g + 1) * C].contiguous(), b[g * C:(g + 1) * C].clone()) for g in range(G)]
