"""``simclr-tau config CONFIG [a.b=value ...] [--distill]``: print the config a run would use, as YAML.

Every knob is there with its value (defaults <- the file <- the overrides, validated as a run validates
it), and the defaults a run resolves at start (:func:`~simclr_tau.config.resolve.resolve_defaults`: the
dataset's native image size, the size-aware augmentation, a τ mode's bounds) are filled in where they do not
need the data; what only the data can tell (a mixture's image size) stays ``null``. The output is a valid
config file: ``simclr-tau config A.yaml train.epochs=5 > B.yaml`` and ``simclr-tau pretrain B.yaml``
train the same run.

Distillation configs (``simclr-tau distill``) are detected from a top-level ``teacher``, ``distill`` or
``teacher_temperature`` section, an override of one of them, or ``train.method`` seed / kd; ``--distill``
forces it.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from simclr_tau.errors import exit_on_user_error

DISTILL_SECTIONS = ("teacher", "distill", "teacher_temperature")
DISTILL_METHODS = ("seed", "kd")


def build_parser(prog: str = "simclr-tau config") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Print the resolved config (every default filled in) as YAML.")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value, e.g. train.epochs=5")
    p.add_argument("--distill", action="store_true",
                   help="read it as a distillation config (default: detected from its teacher / distill sections)")
    return p


def is_distill_config(path: str, overrides: Sequence[str]) -> bool:
    """Whether ``path`` + ``overrides`` describe a distillation run (see the module docstring)."""
    from omegaconf import DictConfig, OmegaConf

    keys = {item.split("=", 1)[0].strip() for item in overrides}
    if any(k.split(".", 1)[0] in DISTILL_SECTIONS for k in keys):
        return True
    if any(item.replace(" ", "") in (f"train.method={m}" for m in DISTILL_METHODS) for item in overrides):
        return True
    try:
        data = OmegaConf.load(path)
    except Exception:  # a missing or broken file: load_config reports it
        return False
    if not isinstance(data, DictConfig):
        return False
    return any(s in data for s in DISTILL_SECTIONS) or OmegaConf.select(data, "train.method") in DISTILL_METHODS


@exit_on_user_error
def main(argv: Optional[List[str]] = None, prog: str = "simclr-tau config") -> None:
    args = build_parser(prog).parse_intermixed_args(argv)
    from simclr_tau.config import load_config, load_distill_config, resolve_defaults, to_yaml

    distill = args.distill or is_distill_config(args.config, args.overrides)
    cfg = (load_distill_config if distill else load_config)(args.config, args.overrides)
    kind = "distillation (simclr-tau distill)" if distill else "pretraining (simclr-tau pretrain)"
    sys.stdout.write(f"# {kind}: {args.config} {' '.join(args.overrides)}".rstrip() + "\n")
    sys.stdout.write(to_yaml(resolve_defaults(cfg)))
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
