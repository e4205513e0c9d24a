"""Evaluation of frozen encoders: features (cached, distributed), weighted kNN (FAISS), linear probe,
calibration (temperature scaling, ECE), representation diagnostics, and the ``knn`` / ``linear`` commands.

Entry points for other code:

- :func:`~simclr_tau.evaluation.features.extract_features` ``(encoder, dataset, transform) -> (feats, labels)``
- :func:`~simclr_tau.evaluation.knn.online_knn` for the training loop's online kNN
- :func:`~simclr_tau.evaluation.knn.knn_classify` / :func:`~simclr_tau.evaluation.knn.knn_eval`
- :func:`~simclr_tau.evaluation.linear_probe.linear_probe` and
  :func:`~simclr_tau.evaluation.calibration.calibrate`

Submodules import their heavy dependencies (faiss, matplotlib) lazily.
"""

from simclr_tau.evaluation.features import PixelEncoder, cached_features, extract_features
from simclr_tau.evaluation.knn import knn_classify, knn_eval, online_knn

__all__ = ["PixelEncoder", "cached_features", "extract_features", "knn_classify", "knn_eval", "online_knn"]
