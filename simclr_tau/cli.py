"""``simclr-tau``: one command with a subcommand per job.

    simclr-tau pretrain CONFIG [a.b=value ...] [--resume auto]
    simclr-tau knn RUN_DIR|ENCODER [...]          (see simclr-tau knn --help)
    simclr-tau linear RUN_DIR|ENCODER [...]
    simclr-tau compare RUN_DIR ... | --wandb ENTITY/PROJECT
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

# subcommand -> (module, function): imported lazily so `simclr-tau --help` is instant.
SUBCOMMANDS = {
    "pretrain": ("simclr_tau.pretrain", "main", "pretrain an encoder (SimCLR / MoCo)"),
    "knn": ("simclr_tau.evaluation.cli", "knn_main", "FAISS kNN evaluation of a frozen encoder"),
    "linear": ("simclr_tau.evaluation.cli", "linear_main", "linear probe (+ temperature-scaling calibration)"),
    "compare": ("simclr_tau.records.compare", "main", "compare runs: table of final metrics and config differences, plots"),
    "distill": ("simclr_tau.distill", "main", "knowledge distillation from a pretrained teacher"),
}


def _usage() -> str:
    lines = ["usage: simclr-tau {" + ",".join(SUBCOMMANDS) + "} ...", "", "subcommands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, _, desc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if argv else 2)
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
    fn(rest)


if __name__ == "__main__":
    main()
