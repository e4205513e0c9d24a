"""The run record and everything that reads it.

Layers (imports flow upwards only):

- :mod:`~simclr_tau.records.run_data`: the vocabulary: :class:`RunData`, reading a run directory, metric names
  and labels;
- :mod:`~simclr_tau.records.writer` (``RunRecord``: config.yaml / metrics.jsonl / summary.json + the W&B mirror),
  :mod:`~simclr_tau.records.wandb_reader` (runs of a W&B project), :mod:`~simclr_tau.records.tables`,
  :mod:`~simclr_tau.records.plots`, :mod:`~simclr_tau.records.report`: each depends on the vocabulary only;
- :mod:`~simclr_tau.records.compare`: ``simclr-tau compare``, which puts them together.
"""
