"""Building a config: ``defaults <- YAML file <- a.b=value overrides`` (OmegaConf structured configs), then
:func:`~simclr_tau.config.validate.validate`; and its YAML / flattened forms."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from simclr_tau.config.schema import Config, DistillConfig
from simclr_tau.config.ranges import ConfigError
from simclr_tau.config.validate import validate, validate_distill
from simclr_tau.errors import UserError


def _omegaconf_error(e: OmegaConfBaseException, source: str) -> UserError:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return UserError(f"config {source}: key '{key}': {msg}")


# Choice fields whose documented value is the word ``no``: YAML 1.1 (PyYAML, hence OmegaConf, files and
# a.b=value overrides alike) reads a bare ``no`` (and off / false) as the boolean false, which a str field
# would then store as 'False'. A false there means "no".
NO_MEANS_OFF = ("train.mixed_precision",)


def _yaml_false_as_no(data: Any) -> Any:
    """``data`` (a DictConfig from a file or an override) with a boolean false at a :data:`NO_MEANS_OFF`
    key replaced by the string ``"no"``."""
    if isinstance(data, DictConfig):
        for key in NO_MEANS_OFF:
            if OmegaConf.select(data, key, default=None) is False:
                OmegaConf.update(data, key, "no", merge=False)
    return data


def merge_into(schema: Any, source: str, data: Any) -> Any:
    """Merge ``data`` (dict/DictConfig) into the structured ``schema``; errors name the key and source."""
    try:
        return OmegaConf.merge(schema, data)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, source) from None


def _set_keys(data: Any) -> set:
    """Every dotted key a file or an override sets (``optim``, ``optim.lr``, ...)."""
    keys: set = set()

    def rec(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                keys.add(f"{prefix}{k}")
                rec(v, f"{prefix}{k}.")

    rec(OmegaConf.to_container(data, resolve=False) if isinstance(data, DictConfig) else data, "")
    return keys


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (), schema: type = Config) -> Any:
    """Build a validated config from defaults, an optional YAML file and ``a.b=value`` overrides.

    Returns an OmegaConf DictConfig typed by ``schema`` (attribute access, e.g. ``cfg.train.epochs``), checked by
    :func:`~simclr_tau.config.validate.validate` (``Config``) or ``validate_distill`` (``DistillConfig``).
    ``train.mixed_precision: no`` (a YAML false) reads as the string ``"no"`` (:data:`NO_MEANS_OFF`).
    Raises :class:`UserError` for a missing file, invalid YAML, an unknown key, a wrong type or a refused value;
    the message starts with the file or the override that set the key (``config FILE: ...``, ``override '...'``).
    """
    cfg = OmegaConf.structured(schema)
    sources = []  # (where, the keys it sets), in the order applied: the last that sets a key set its value
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            file_cfg = OmegaConf.load(p)  # yaml.SafeLoader underneath: no arbitrary objects
        except Exception as e:  # yaml.YAMLError and friends
            raise UserError(f"config {p}: invalid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(file_cfg, DictConfig):
            raise UserError(f"config {p}: the top level is a {type(file_cfg).__name__.replace('Config', '').lower()}; "
                            "it must be a mapping of sections (data:, model:, train:, ...)")
        cfg = merge_into(cfg, str(p), _yaml_false_as_no(file_cfg))
        sources.append((f"config {p}", _set_keys(file_cfg)))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value (e.g. train.epochs=5)")
        try:
            dot = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise _omegaconf_error(e, f"override '{item}'") from None
        cfg = merge_into(cfg, f"override '{item}'", _yaml_false_as_no(dot))
        sources.append((f"override '{item}'", _set_keys(dot)))
    try:
        if issubclass(schema, DistillConfig):
            validate_distill(cfg)
        elif issubclass(schema, Config):
            validate(cfg)
    except ConfigError as e:
        where = _source_of(e.key, sources)
        raise UserError(f"{where}: {e}" if where else str(e)) from None
    return cfg


def _source_of(key: str, sources: Sequence[Tuple[str, set]]) -> Optional[str]:
    """The last of ``sources`` that set ``key``; else the last that set anything in its section (a relation
    refused a default beside a value set there: ``temperature.init`` against ``temperature.tau_max=0.05``);
    else the file, if any."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        for where, keys in reversed(sources):
            if prefix in keys:
                return where
    return sources[0][0] if sources and sources[0][0].startswith("config ") else None


def load_distill_config(path: Optional[str], overrides: List[str] = ()) -> Any:  # type: ignore[assignment]
    return load_config(path, list(overrides), schema=DistillConfig)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg)


def flatten(cfg: Any) -> dict:
    """Flatten a config to ``{"a.b": value}`` (for W&B and for comparing runs)."""
    out: dict = {}

    def rec(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                rec(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    rec(OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg, "")
    return out
