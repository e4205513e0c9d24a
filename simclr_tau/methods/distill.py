"""Distillation methods: a frozen teacher, a student encoder, a loss driven by temperatures.

Interface (the distillation loop calls it like a pretraining method, with labels):
``method(x, y) -> (loss, logs)``, logs = 0-d tensors; hooks ``before_step(step)`` / ``after_step(step)``.
The student backbone is ``method.encoder`` (exported as ``encoder.safetensors``, like pretraining).

- :class:`SEED` (Fang et al., ICLR 2021, "SEED: Self-supervised Distillation for Visual Representation"):
  the student embedding s = g(f(x)) (a projection to the teacher's width) and the teacher embedding
  t = teacher(x) of the same view are compared with a FIFO queue of past teacher embeddings D:
  loss = −Σ_j softmax(t·D/τ_t)_j · log softmax(s·D/τ_s)_j (:func:`~simclr_tau.losses.relational_kd_loss`).
  Two temperature modules: ``temperature["student"]`` (τ_s) and ``temperature["teacher"]`` (τ_t).
- :class:`LogitKD` (Hinton et al. 2015): logits z_s = W f(x) of a linear classifier on the student,
  teacher logits z_t = its encoder + trained linear probe;
  loss = α·CE(z_s, y) + (1 − α)·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) (:func:`kd_objective`).
  T is any temperature module (fixed, learnable, scheduled = annealed, conditional = per sample);
  CTKD puts a learnable T behind a :class:`~simclr_tau.temperature.grl.GradientReversal` whose λ ramps by a cosine.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simclr_tau.distributed import all_gather_no_grad
from simclr_tau.temperature.grl import GradientReversal, cosine_ramp
from simclr_tau.losses import kd_loss, relational_kd_loss
from simclr_tau.losses.nt_xent import TauLike, upcast
from simclr_tau.temperature import Temperature


def kd_objective(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, T: TauLike,
                 alpha: float) -> Tuple[Tensor, Tensor, Tensor]:
    """α·CE(z_s, y) + (1 − α)·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)); returns (loss, ce, kd).

    The cross-entropy uses the raw logits (T = 1) and the hard labels, as in Hinton et al.; the T²
    factor (inside :func:`~simclr_tau.losses.kd_loss`) keeps the soft term's gradient scale independent of T.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        ce = F.cross_entropy(upcast(student_logits), labels)
    kd = kd_loss(student_logits, teacher_logits, T)
    return alpha * ce + (1.0 - alpha) * kd, ce, kd


class FrozenTeacher(nn.Module):
    """A teacher that never trains: encoder (+ optional linear probe), eval mode, no gradient.

    ``scale`` / ``shift`` (C,) re-normalize the student's input to the teacher's statistics:
    x_teacher = x · scale + shift (identity when both were trained on the same dataset statistics).
    With a probe, ``forward`` returns logits ((f − mean) / std) W + b; without, the features f.
    """

    def __init__(self, encoder: nn.Module, out_dim: int, scale: Sequence[float], shift: Sequence[float],
                 probe: Optional[Dict[str, Tensor]] = None) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.register_buffer("scale", torch.tensor(list(scale), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(list(shift), dtype=torch.float32).view(1, -1, 1, 1))
        self.has_probe = probe is not None
        if probe is not None:
            for name in ("weight", "bias", "mean", "std"):  # weight F x C
                self.register_buffer(f"probe_{name}", probe[name].float().clone())
            out_dim = int(probe["weight"].shape[1])
        self.out_dim = out_dim

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)  # BatchNorm statistics stay the teacher's own

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        f = self.encoder(x * self.scale + self.shift).float()  # B x F
        if not self.has_probe:
            return f
        with torch.autocast(device_type=f.device.type, enabled=False):  # float32 logits, not bf16
            return ((f - self.probe_mean) / self.probe_std) @ self.probe_weight + self.probe_bias  # B x C


def _renamed(stats: Dict[str, Tensor], name: str) -> Dict[str, Tensor]:
    """Temperature.stats keys ``tau`` / ``tau_mean`` ... renamed to ``<name>`` / ``<name>_mean`` ..."""
    return {name + k[3:]: v for k, v in stats.items()}


class SEED(nn.Module):
    """Relational self-supervised distillation over a queue of teacher embeddings (module docstring).

    The queue holds L2-normalized teacher embeddings of past batches (all processes, gathered in rank
    order); it starts empty and only its filled part enters the loss (no random anchors). Enqueueing
    happens after the loss and only in training mode.
    """

    def __init__(self, teacher: FrozenTeacher, encoder: nn.Module, projector: nn.Module, tau_student: Temperature,
                 tau_teacher: Temperature, queue_size: int) -> None:
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size} must be >= 1")
        self.teacher, self.encoder, self.projector = teacher, encoder, projector
        # One ModuleDict named `temperature`: both τ's land in the optimizer's temperature group.
        self.temperature = nn.ModuleDict({"student": tau_student, "teacher": tau_teacher})
        self.register_buffer("queue", torch.zeros(queue_size, teacher.out_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))  # entries written so far (capped)
        self._queue_full = False  # host-side mirror: no device sync once the queue is full

    def _anchors(self) -> Optional[Tensor]:
        if not self._queue_full:
            n = int(self.queue_count)  # a host sync, only while the queue is filling
            if n < self.queue.shape[0]:
                return self.queue[:n] if n else None
            self._queue_full = True
        return self.queue

    @torch.no_grad()
    def _enqueue(self, t: Tensor) -> None:
        keys = all_gather_no_grad(F.normalize(t.float(), dim=1))  # NW x D
        size, n = self.queue.shape[0], keys.shape[0]
        start = self.queue_ptr
        if n > size:  # only the last K survive
            keys, start = keys[-size:], (self.queue_ptr + n - size) % size
        idx = (start + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue.index_copy_(0, idx, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
        self.queue_count.copy_(torch.clamp(self.queue_count + n, max=size))

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        t = self.teacher(x)  # B x D (no grad)
        s = self.projector(self.encoder(x))  # B x D
        tau_s = self.temperature["student"](s)
        tau_t = self.temperature["teacher"](t)
        loss = relational_kd_loss(s, t, self._anchors(), tau_s, tau_t)
        if self.training:
            self._enqueue(t)
        logs = _renamed(self.temperature["student"].stats(tau_s), "tau_s")
        logs.update(_renamed(self.temperature["teacher"].stats(tau_t), "tau_t"))
        return loss, logs

    def before_step(self, step: int) -> None:
        for tau in self.temperature.values():
            tau.step(step)

    def after_step(self, step: int) -> None:
        for tau in self.temperature.values():
            tau.project_()

    def observe(self, metric: float) -> None:
        for tau in self.temperature.values():
            tau.observe(metric)


class LogitKD(nn.Module):
    """Logit distillation with labels: α·CE + (1 − α)·T²·KL (module docstring); CTKD with ``grl``.

    ``lambda_at(step)`` gives the gradient-reversal factor λ of each step (CTKD's cosine ramp).
    """

    def __init__(self, teacher: FrozenTeacher, encoder: nn.Module, classifier: nn.Module, temperature: Temperature,
                 alpha: float, grl: Optional[GradientReversal] = None,
                 lambda_at: Optional[Callable[[int], float]] = None) -> None:
        super().__init__()
        if not teacher.has_probe:
            raise ValueError("LogitKD needs a teacher with a linear probe (logits)")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must lie in [0, 1]")
        self.teacher, self.encoder, self.classifier, self.temperature = teacher, encoder, classifier, temperature
        self.alpha, self.grl, self.lambda_at = float(alpha), grl, lambda_at

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        if y is None:
            raise ValueError("LogitKD needs labels")
        z_t = self.teacher(x)  # B x C (no grad)
        z_s = self.classifier(self.encoder(x))  # B x C
        T = self.temperature(z_s)
        if self.grl is not None:
            T = self.grl(T)  # CTKD: the student descends the loss, T ascends it
        loss, ce, kd = kd_objective(z_s, z_t, y, T, self.alpha)
        logs = _renamed(self.temperature.stats(T), "T")
        logs.update({"ce": ce.detach(), "kd": kd.detach(),
                     "student_acc": (z_s.detach().argmax(1) == y).float().mean() * 100,
                     "teacher_acc": (z_t.argmax(1) == y).float().mean() * 100})
        if self.grl is not None:
            logs["grl_lambda"] = torch.tensor(self.grl.lambd)
        return loss, logs

    def before_step(self, step: int) -> None:
        self.temperature.step(step)
        if self.grl is not None and self.lambda_at is not None:
            self.grl.lambd = self.lambda_at(step)

    def after_step(self, step: int) -> None:
        self.temperature.project_()

    def observe(self, metric: float) -> None:
        self.temperature.observe(metric)


def build_distill_method(cfg: Any, teacher: FrozenTeacher, in_chans: int, steps_per_epoch: int,
                         total_steps: int) -> nn.Module:
    """The method ``cfg.train.method`` (``seed`` | ``kd``) of a :class:`~simclr_tau.config.DistillConfig`."""
    from simclr_tau.models import build_encoder, mlp, out_bn_for
    from simclr_tau.temperature import build_temperature

    encoder, feat_dim = build_encoder(cfg.model, in_chans)
    m, d = cfg.model, cfg.distill
    if cfg.train.method == "seed":
        projector = mlp(feat_dim, m.proj_hidden_dim, teacher.out_dim, m.proj_layers, out_bn_for(m, "seed"), bn=m.proj_bn)
        tau_s = build_temperature(cfg.temperature, teacher.out_dim, steps_per_epoch, total_steps, "temperature")
        tau_t = build_temperature(cfg.teacher_temperature, teacher.out_dim, steps_per_epoch, total_steps,
                                  "teacher_temperature")
        return SEED(teacher, encoder, projector, tau_s, tau_t, d.queue_size)
    T = build_temperature(cfg.temperature, teacher.out_dim, steps_per_epoch, total_steps, "temperature")
    grl, lambda_at = None, None
    if d.ctkd:
        ramp = max(1, round(d.grl_ramp_epochs * steps_per_epoch)) if d.grl_ramp_epochs is not None else total_steps
        grl = GradientReversal(d.grl_lambda_min)
        lambda_at = lambda step: cosine_ramp(step, ramp, d.grl_lambda_min, d.grl_lambda_max)  # noqa: E731
    return LogitKD(teacher, encoder, nn.Linear(feat_dim, teacher.out_dim), T, d.alpha, grl, lambda_at)
