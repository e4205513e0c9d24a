"""``simclr-tau``: one command with a subcommand per job.

    simclr-tau pretrain CONFIG [a.b=value ...] [--resume auto]
    simclr-tau config CONFIG [a.b=value ...]      the resolved config (every default filled in), as YAML
    simclr-tau knn RUN_DIR|ENCODER [...]          (see simclr-tau knn --help)
    simclr-tau linear RUN_DIR|ENCODER [...]
    simclr-tau ood RUN_DIR [...]                  (a run pretrained with data.classes: the others are OOD)
    simclr-tau compare RUN_DIR ... | --wandb ENTITY/PROJECT
    simclr-tau distill CONFIG [a.b=value ...] [--resume auto]
    simclr-tau --version
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import List, Optional

# subcommand -> (module, function): imported lazily so `simclr-tau --help` is instant.
SUBCOMMANDS = {
    "pretrain": ("simclr_tau.pretrain", "main", "pretrain an encoder (SimCLR / MoCo)"),
    "config": ("simclr_tau.config.cli", "main", "print the resolved config (every default filled in) as YAML"),
    "knn": ("simclr_tau.evaluation.cli", "knn_main", "FAISS kNN evaluation of a frozen encoder"),
    "linear": ("simclr_tau.evaluation.cli", "linear_main", "linear probe (+ temperature-scaling calibration)"),
    "ood": ("simclr_tau.evaluation.cli", "ood_main", "held-out classes as OOD: AUROC of per-image τ and of kNN distance"),
    "compare": ("simclr_tau.records.compare", "main", "compare runs: table of final metrics and config differences, plots"),
    "distill": ("simclr_tau.distill", "main", "knowledge distillation from a pretrained teacher"),
}


def version() -> str:
    """The installed distribution's version (package metadata), else the source tree's ``__version__``."""
    from importlib import metadata

    try:
        return metadata.version("simclr-tau")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from simclr_tau import __version__

        return __version__


def _usage() -> str:
    lines = ["usage: simclr-tau {" + ",".join(SUBCOMMANDS) + "} ...", "       simclr-tau --version", "",
             "subcommands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, _, desc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        print(f"simclr-tau {version()}")
        sys.exit(0)
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand '{name}'\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    module, func, _ = SUBCOMMANDS[name]
    try:
        fn = getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("simclr_tau"):
            print(f"error: 'simclr-tau {name}' is not available in this version", file=sys.stderr)
            sys.exit(2)
        raise
    # a subcommand that can be launched on its own (python -m simclr_tau.pretrain) names itself after the
    # command it was reached through in --help and usage errors
    if "prog" in inspect.signature(fn).parameters:
        fn(rest, prog=f"simclr-tau {name}")
    else:
        fn(rest)


if __name__ == "__main__":
    main()
