"""``simclr-tau distill CONFIG [a.b=value ...] [--resume auto|RUN_DIR|CKPT]``: distill a frozen teacher
into a student encoder (``accelerate launch -m simclr_tau.distill CONFIG`` for several processes).
Overrides may come before or after ``--resume``.

The thin launchable module; the run is :func:`simclr_tau.train.distill.run`, its config
:class:`simclr_tau.config.DistillConfig`.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from simclr_tau.errors import exit_on_user_error


def build_parser(prog: str = "simclr_tau.distill") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Distill a frozen teacher into a student encoder (SEED or logit KD).")
    p.add_argument("config", help="YAML config (see configs/distill_*.yaml)")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value, e.g. teacher.path=runs/teacher")
    p.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint of train.run_name), a run directory, or a checkpoint file")
    return p


@exit_on_user_error
def main(argv: Optional[List[str]] = None, prog: str = "simclr_tau.distill") -> None:
    args = build_parser(prog).parse_intermixed_args(argv)  # overrides before or after --resume
    from simclr_tau.config import load_distill_config
    from simclr_tau.train.distill import run

    cfg = load_distill_config(args.config, args.overrides)
    result = run(cfg, resume=args.resume)
    if result.is_main:  # final loss and τ, the encoder, the next command
        from simclr_tau.train.progress import run_summary

        print(run_summary(result, "distill"), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
