"""simclr_tau: contrastive self-supervised learning with a first-class temperature τ."""

__version__ = "0.1.0"
