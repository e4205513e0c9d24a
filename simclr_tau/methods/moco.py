"""MoCo v2 (queue of negative keys) and MoCo v3 (predictor, in-batch negatives) with any τ module.

MoCo v2 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning"; Chen et al.
2020, "Improved Baselines with Momentum Contrastive Learning"): a query q = g(f(x1)) is contrasted with
its key k = g_k(f_k(x2)) from the momentum (key) encoder and K negatives held in a FIFO queue of past
keys, with :func:`~simclr_tau.losses.info_nce`. MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of
Training Self-Supervised Vision Transformers"): no queue, a predictor h on the query branch,
q = h(g(f(x))), the negatives are the other keys of the global batch
(:func:`~simclr_tau.losses.info_nce_in_batch`), and the loss is symmetric.

Key encoder (f_k, g_k) = a copy of (f, g) that is never trained by gradients; after every optimizer step

    θ_k ← m·θ_k + (1 − m)·θ_q,    m(step) = 1 − (1 − m0)·(cos(π·step/T) + 1)/2   (``momentum_cosine``)

(the cosine ramp of BYOL / MoCo v3 moves m from m0 to 1 over T = total steps; otherwise m = m0).
BatchNorm running statistics of the key encoder are copied once at construction and then follow the key
encoder's own forward passes, as in the reference implementation.

Where τ comes from: ``self.temperature(q)`` on the query that enters the loss (the projection for v2,
the predictor output for v3), so a conditional τ gives one τ_i per query, shape (N,).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from simclr_tau.distributed import all_gather_no_grad, is_distributed, rank_and_world
from simclr_tau.errors import UserError
from simclr_tau.losses import info_nce, info_nce_in_batch
from simclr_tau.losses.dro import moco_margins
from simclr_tau.losses.nt_xent import upcast
from simclr_tau.methods.simclr import positive_alignment
from simclr_tau.models import build_encoder, mlp, out_bn_for
from simclr_tau.temperature import Temperature, build_temperature, robust_loss

VERSIONS = ("v2", "v3")


def _out_features(module: nn.Module) -> int:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("cannot infer the projection width: pass dim= to MoCo")
    return linears[-1].out_features


class MoCo(nn.Module):
    """``forward(x1, x2) -> (loss, logs)``; ``before_step(step)`` / ``after_step(step)`` around each step.

    v2: loss = ℓ(q1, k2) with the queue as negatives, or ½(ℓ(q1, k2) + ℓ(q2, k1)) when ``symmetric``
    (½ keeps the scale of the one-sided loss, so learning rates and τ learning rates transfer).
    After the loss, the keys of this step (k2, or [k1; k2] when symmetric), gathered from all processes in
    rank order, replace the oldest entries of the queue; the logits therefore never see the current keys.
    Enqueueing happens only in training mode: evaluating the loss must not change the training state.

    v3: loss = 2τ̄·(ℓ(q1, k2) + ℓ(q2, k1)) with in-batch negatives, where τ̄ is τ **detached** (for a
    per-sample τ, the detached mean of this step's τ's). MoCo v3 scales its loss by 2τ so the gradient
    magnitude does not depend on τ; with a trainable τ a non-detached factor would add 2ℓ·∂τ to τ's own
    gradient and push τ toward 0 (a smaller τ shrinks the factor, not the contrastive error). Detached, the
    encoder sees the paper's gradient scale and τ's gradient is the plain InfoNCE gradient times 2τ̄.

    Distributed notes. Every process must get the same local batch size (the queue and shuffle-BN
    gather with ``all_gather``). The queue and ``queue_ptr`` are identical buffers on every rank, so
    DistributedDataParallel's default buffer broadcast from rank 0 at each forward is harmless.
    With grad accumulation every micro-batch is a MoCo batch (its keys are enqueued).

    Shuffle-BN (v2, ``shuffle_bn``): with W > 1 processes the key batch is gathered, randomly permuted
    (permutation drawn on every rank, rank 0's broadcast), each rank encodes its slice of the shuffled
    batch, and the keys are gathered and un-shuffled back to their samples, so the key encoder's BN batch
    statistics never come from the same samples as the query's (He et al. 2020, Sec. 3.3). In a single
    process it is a no-op. SyncBN (``model.sync_bn``) is the other fix and makes shuffle-BN unnecessary.
    """

    def __init__(
        self,
        encoder: nn.Module,
        projector: nn.Module,
        temperature: Temperature,
        version: str = "v2",
        predictor: Optional[nn.Module] = None,
        queue_size: int = 4096,
        momentum: float = 0.99,
        momentum_cosine: bool = True,
        total_steps: int = 1,
        symmetric: bool = False,
        shuffle_bn: bool = True,
        dim: Optional[int] = None,
        decoupled: bool = False,
    ) -> None:
        super().__init__()
        self.decoupled = decoupled  # DCL: the positive leaves the InfoNCE denominator
        if version not in VERSIONS:
            raise UserError(f"MoCo version={version!r}; accepted: v2 (train.method=mocov2), v3 (train.method=mocov3)")
        if not queue_size >= 1:
            raise UserError(f"moco.queue_size={queue_size} must be >= 1")
        if not 0.0 <= momentum <= 1.0:
            raise UserError(f"moco.momentum={momentum} must lie in [0, 1]")
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1")
        if (version == "v3") != (predictor is not None):
            raise ValueError("MoCo v3 needs a predictor and MoCo v2 takes none")
        self.version = version
        self.base_momentum = float(momentum)
        self.momentum_cosine = momentum_cosine
        self.total_steps = int(total_steps)
        self.symmetric = symmetric or version == "v3"
        self.shuffle_bn = shuffle_bn and version == "v2"

        self.encoder = encoder
        self.projector = projector
        self.predictor = predictor
        self.temperature = temperature
        # Key encoder: a full copy (weights and BN buffers), trained only by the EMA in after_step.
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projector = copy.deepcopy(projector)
        for p in self._key_params():
            p.requires_grad_(False)
        # m of the current step, for logging (not part of the state: it is a function of the step).
        self.register_buffer("momentum", torch.tensor(self.momentum_at(0)), persistent=False)

        if version == "v2":
            dim = dim if dim is not None else _out_features(projector)
            # Random unit keys to start with, as MoCo does: K x D, one key per row.
            self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    # ---- momentum -------------------------------------------------------------------------------
    def momentum_at(self, step: int) -> float:
        """m(step): m0, or the cosine ramp 1 − (1 − m0)(cos(π·step/T) + 1)/2 (reaches 1 at step T)."""
        if not self.momentum_cosine:
            return self.base_momentum
        t = min(max(step, 0), self.total_steps) / self.total_steps
        return 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * t) + 1.0) / 2.0

    def _query_params(self) -> List[Tensor]:
        return list(self.encoder.parameters()) + list(self.projector.parameters())

    def _key_params(self) -> List[Tensor]:
        return list(self.momentum_encoder.parameters()) + list(self.momentum_projector.parameters())

    @torch.no_grad()
    def _momentum_update_key_encoder(self, m: float) -> None:
        """θ_k ← m·θ_k + (1 − m)·θ_q over the encoder and the projector (foreach: one kernel per group)."""
        key, query = self._key_params(), self._query_params()
        torch._foreach_mul_(key, m)
        torch._foreach_add_(key, query, alpha=1.0 - m)

    # ---- keys -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _batch_shuffle_ddp(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Gather x from all ranks, permute, return this rank's slice and the inverse permutation."""
        rank, world = rank_and_world()
        x_all = all_gather_no_grad(x)  # NW x ...
        # Drawn on every rank (keeps the RNG streams in step), rank 0's permutation wins.
        idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
        dist.broadcast(idx_shuffle, src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(world, -1)[rank]  # N
        return x_all[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, k: Tensor, idx_unshuffle: Tensor) -> Tensor:
        """Inverse of :meth:`_batch_shuffle_ddp`: every key goes back to its sample's rank and row."""
        rank, world = rank_and_world()
        k_all = all_gather_no_grad(k)  # NW x D, in shuffled order
        idx_this = idx_unshuffle.view(world, -1)[rank]  # N
        return k_all[idx_this]

    @torch.no_grad()
    def _keys(self, x: Tensor) -> Tensor:
        """Keys g_k(f_k(x)) (N x D, no gradient), through shuffle-BN when it is on and W > 1."""
        shuffle = self.shuffle_bn and is_distributed()
        if shuffle:
            x, idx_unshuffle = self._batch_shuffle_ddp(x)
        k = self.momentum_projector(self.momentum_encoder(x))
        if shuffle:
            k = self._batch_unshuffle_ddp(k, idx_unshuffle)
        return k

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: Tensor) -> None:
        """Write the global batch of keys (gathered in rank order) at the pointer, wrapping around.

        Position (ptr + i) mod K receives key i; when the global batch exceeds K, later keys overwrite
        earlier ones (only the last K survive). Indices are computed on the device: no host sync.
        """
        keys = all_gather_no_grad(F.normalize(keys.to(self.queue.dtype), dim=1))  # NW x D
        size = self.queue.shape[0]
        n = keys.shape[0]
        start = self.queue_ptr
        if n > size:  # only the last K keys survive; they start where key n − K would have been written
            keys, start = keys[-size:], (self.queue_ptr + n - size) % size
        idx = (start + torch.arange(keys.shape[0], device=keys.device)) % size  # distinct positions
        self.queue.index_copy_(0, idx, keys)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    # ---- forward --------------------------------------------------------------------------------
    def _query(self, x: Tensor) -> Tensor:
        z = self.projector(self.encoder(x))
        return self.predictor(z) if self.predictor is not None else z

    def forward(self, x1: Tensor, x2: Tensor, index: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """``index``: the dataset indices of the N images, for per-sample τ state."""
        q1 = self._query(x1)  # N x D
        q2 = self._query(x2) if self.symmetric else None
        k2 = self._keys(x2)  # N x D
        k1 = self._keys(x1) if self.symmetric else None
        queries = q1 if q2 is None else torch.cat([q1, q2], dim=0)
        keys = k2 if k1 is None else torch.cat([k2, k1], dim=0)  # the positive of each query, in query order
        alignment = positive_alignment(queries, keys) if self.temperature.reads_alignment else None
        # 0-d, or (N,) / (2N,) per query (conditional), or (N,) per image (per-sample dro)
        tau = self.temperature(queries, index=index, alignment=alignment)
        tau1, tau2 = tau.chunk(2) if (tau.ndim == 1 and tau.shape[0] == queries.shape[0] and q2 is not None) \
            else (tau, tau)
        extra: Dict[str, Tensor] = {}

        if self.version == "v2":
            # A snapshot of the queue: the enqueue below must not touch the tensor the logits read.
            queue = self.queue.clone().detach()  # K x D
            if self.temperature.objective == "dro":  # the queue as the negatives of the robust objective
                h = moco_margins(F.normalize(upcast(queries), dim=1), F.normalize(upcast(keys), dim=1),
                                 F.normalize(upcast(queue), dim=1))
                loss, extra = robust_loss(self.temperature, h, None, tau, index, views=1 if q2 is None else 2)
            else:
                loss = info_nce(q1, k2, queue, tau1, decoupled=self.decoupled)
                if q2 is not None:
                    loss = 0.5 * (loss + info_nce(q2, k1, queue, tau2, decoupled=self.decoupled))
            if self.training:
                self._dequeue_and_enqueue(k2 if k1 is None else torch.cat([k1, k2], dim=0))
        else:
            scale = 2.0 * tau.detach().mean()  # MoCo v3's 2τ, detached (see the class docstring)
            loss = scale * (info_nce_in_batch(q1, k2, tau1, decoupled=self.decoupled)
                            + info_nce_in_batch(q2, k1, tau2, decoupled=self.decoupled))

        logs = {**self.temperature.stats(tau), **extra}
        logs["momentum"] = self.momentum.clone()
        return loss, logs

    # ---- hooks ----------------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        self.temperature.step(step)
        self.momentum.fill_(self.momentum_at(step))

    def after_step(self, step: int) -> None:
        self._momentum_update_key_encoder(self.momentum_at(step))
        self.temperature.project_()

    def observe(self, metric: float) -> None:
        """A monitored metric (online kNN top-1) for a plateau τ schedule."""
        self.temperature.observe(metric)


def build_moco(cfg: Any, in_chans: int, steps_per_epoch: int, total_steps: int, num_samples: int = 0) -> MoCo:
    """Build MoCo v2 (``train.method=mocov2``) or v3 (``mocov3``) from a :class:`~simclr_tau.config.Config`."""
    mc, m = cfg.moco, cfg.model
    if cfg.train.method not in ("mocov2", "mocov3"):
        raise UserError(f"train.method={cfg.train.method!r} is not a MoCo method; accepted: mocov2, mocov3")
    if not mc.queue_size >= 1:
        raise UserError(f"moco.queue_size={mc.queue_size} must be >= 1")
    if not 0.0 <= mc.momentum <= 1.0:
        raise UserError(f"moco.momentum={mc.momentum} must lie in [0, 1]")
    version = "v2" if cfg.train.method == "mocov2" else "v3"
    encoder, feat_dim = build_encoder(m, in_chans)
    # MoCo v3 ends its projector (and not its predictor) with a BN without affine parameters (proj_out_bn=auto).
    projector = mlp(feat_dim, m.proj_hidden_dim, m.proj_dim, m.proj_layers, out_bn_for(m, cfg.train.method), bn=m.proj_bn)
    predictor = mlp(m.proj_dim, mc.pred_hidden_dim, m.proj_dim, 2, bn=m.proj_bn) if version == "v3" else None
    temperature = build_temperature(cfg.temperature, m.proj_dim, steps_per_epoch, total_steps, num_samples=num_samples)
    return MoCo(
        encoder,
        projector,
        temperature,
        version=version,
        predictor=predictor,
        queue_size=mc.queue_size,
        momentum=mc.momentum,
        momentum_cosine=mc.momentum_cosine,
        total_steps=total_steps,
        symmetric=mc.symmetric,
        shuffle_bn=mc.shuffle_bn,
        dim=m.proj_dim,
        decoupled=bool(cfg.get("loss", {}).get("decoupled", False)),
    )
