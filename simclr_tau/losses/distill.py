"""Distillation losses driven by a temperature.

- :func:`kd_loss`: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network":
  T² · KL(softmax(t / T) ‖ softmax(s / T)), averaged over the batch. The T² keeps the gradient
  magnitude independent of T (the soft-target gradients scale as 1/T²).
- :func:`relational_kd_loss`: SEED, Fang et al. ICLR 2021, "SEED: Self-supervised Distillation for
  Visual Representation": over a queue of teacher embeddings D = {d_j} plus the teacher's own embedding
  of the sample, p^T = softmax(t·D / τ_t), p^S = softmax(s·D / τ_s), loss = −Σ_j p^T_j log p^S_j.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from simclr_tau.losses.nt_xent import TauLike, check_tau, upcast


def _col(tau: Tensor | float) -> Tensor | float:
    """A per-sample τ of shape (B,) as a column (B, 1) so it scales its row."""
    if isinstance(tau, Tensor) and tau.ndim == 1:
        return upcast(tau)[:, None]
    return tau


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: TauLike) -> Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), batchmean. ``T``: float, 0-d or shape (B,).

    The teacher is treated as a constant (detached). A per-sample T scales each row and its own T².
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"student and teacher logits must both have shape (B, C); got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    T = check_tau(T, student_logits.shape[0], "T")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        Tc = _col(T)
        log_p_s = F.log_softmax(upcast(student_logits) / Tc, dim=1)
        log_p_t = F.log_softmax(upcast(teacher_logits.detach()) / Tc, dim=1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # B
        t2 = Tc.squeeze(1) ** 2 if isinstance(Tc, Tensor) and Tc.ndim == 2 else Tc**2
        return (t2 * kl).mean()


def relational_kd_loss(
    student: Tensor, teacher: Tensor, queue: Optional[Tensor], tau_s: TauLike, tau_t: TauLike
) -> Tensor:
    """SEED relational distillation of student embeddings (B, D) toward teacher embeddings (B, D).

    ``queue`` (K, D) holds past teacher embeddings; the sample's own teacher embedding is appended as
    one more anchor, as in SEED. All embeddings are L2-normalized here; teacher and queue are detached.
    """
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(f"student and teacher embeddings must both be (B, D); got {tuple(student.shape)} and {tuple(teacher.shape)}")
    tau_s = check_tau(tau_s, student.shape[0], "tau_s")
    tau_t = check_tau(tau_t, student.shape[0], "tau_t")
    with torch.autocast(device_type=student.device.type, enabled=False):
        s = F.normalize(upcast(student), dim=1)
        t = F.normalize(upcast(teacher.detach()), dim=1)
        anchors = t if queue is None else torch.cat([F.normalize(upcast(queue.detach()), dim=1), t], dim=0)  # (K+B) x D
        sim_s = s @ anchors.T  # B x (K+B)
        sim_t = t @ anchors.T
        # Only the sample's own teacher embedding joins the queue (not the other samples of the batch).
        k = anchors.shape[0] - t.shape[0]
        own = torch.arange(t.shape[0], device=t.device) + k
        keep = torch.ones_like(sim_s, dtype=torch.bool)
        keep[:, k:] = False
        keep[torch.arange(t.shape[0]), own] = True
        # Scale, then mask: −inf / τ would send a NaN gradient into a learnable τ.
        logits_s = (sim_s / _col(tau_s)).masked_fill(~keep, float("-inf"))
        logits_t = (sim_t / _col(tau_t)).masked_fill(~keep, float("-inf"))
        p_t = F.softmax(logits_t, dim=1)
        log_p_s = F.log_softmax(logits_s, dim=1)
        return -(p_t * log_p_s.masked_fill(~keep, 0.0)).sum(dim=1).mean()
