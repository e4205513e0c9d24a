"""Typed configuration: the dataclasses of :mod:`~simclr_tau.config.schema` document every knob and its default.

A run's config is built as ``defaults <- YAML file <- command-line overrides (a.b=value)`` with
OmegaConf structured configs (the library Hydra uses): an unknown key or a value of the wrong type is
rejected with the key's full name and the file it came from. :func:`validate` then checks every value
against its rule (:mod:`~simclr_tau.config.ranges`: ranges and choices, a table beside the dataclasses) and
the relations between fields, again naming the field, the accepted values and the file or override.

Data flow: ``load_config(path, overrides)`` -> :class:`Config` -> ``train.pretrain.run(cfg)`` writes
``<train.output_dir>/<run name>/config.yaml`` (the resolved config) next to metrics and checkpoints.

Modules: :mod:`~simclr_tau.config.schema` (the dataclasses), :mod:`~simclr_tau.config.ranges` (the rule of every
field), :mod:`~simclr_tau.config.validate` (the relations between fields, the run environment), :mod:`~simclr_tau.config.load` (file + overrides -> validated config, YAML, flattening),
:mod:`~simclr_tau.config.resolve` (the defaults resolved at run time: native image size, size-aware
augmentation, τ bounds), :mod:`~simclr_tau.config.cli` (``simclr-tau config``: the resolved YAML).
"""

from simclr_tau.config.load import flatten, load_config, load_distill_config, merge_into, to_yaml
from simclr_tau.config.resolve import resolve_defaults
from simclr_tau.config.schema import (AdaptiveConfig, AugmentConfig, Config, DataConfig, DROConfig, LossConfig, DistillConfig, DistillObjectiveConfig, EvalConfig,
                                      MixtureConfig, MocoConfig, ModelConfig, OptimConfig, ScheduleConfig, TeacherConfig,
                                      TemperatureConfig, TrainConfig, WandbConfig)
from simclr_tau.config.validate import (DATASETS, METHODS, PARAMETRIZATIONS, SCHEDULE_KINDS, TEMPERATURE_MODES,
                                        check_run_environment, validate, validate_distill, validate_schedule,
                                        validate_temperature)

__all__ = [
    "AdaptiveConfig", "AugmentConfig", "Config", "DROConfig", "LossConfig", "DataConfig", "DistillConfig", "DistillObjectiveConfig", "EvalConfig", "MixtureConfig",
    "MocoConfig", "ModelConfig", "OptimConfig", "ScheduleConfig", "TeacherConfig", "TemperatureConfig", "TrainConfig",
    "WandbConfig", "DATASETS", "METHODS", "PARAMETRIZATIONS", "SCHEDULE_KINDS", "TEMPERATURE_MODES", "check_run_environment", "flatten",
    "load_config", "load_distill_config", "merge_into", "resolve_defaults", "to_yaml", "validate", "validate_distill", "validate_schedule",
    "validate_temperature",
]
