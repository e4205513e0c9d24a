"""Losses: pure functions, independent of any model. Every τ comes from :mod:`simclr_tau.temperature`."""

from simclr_tau.losses.diagnostics import alignment, uniformity
from simclr_tau.losses.distill import kd_loss, relational_kd_loss
from simclr_tau.losses.info_nce import info_nce, info_nce_in_batch
from simclr_tau.losses.nt_xent import nt_xent

__all__ = ["nt_xent", "info_nce", "info_nce_in_batch", "kd_loss", "relational_kd_loss", "alignment", "uniformity"]
