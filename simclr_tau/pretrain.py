"""``accelerate launch -m simclr_tau.pretrain CONFIG [a.b=value ...] [--resume auto|RUN_DIR|CKPT]``
(``simclr-tau pretrain ...``): overrides may come before or after ``--resume``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from simclr_tau.errors import exit_on_user_error


def build_parser(prog: str = "simclr_tau.pretrain") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Pretrain an encoder with SimCLR or MoCo.")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value, e.g. train.epochs=5")
    p.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint of train.run_name), a run directory, or a checkpoint file")
    return p


@exit_on_user_error
def main(argv: Optional[List[str]] = None, prog: str = "simclr_tau.pretrain") -> None:
    # intermixed: `CONFIG --resume auto train.epochs=2` works like `CONFIG train.epochs=2 --resume auto`
    args = build_parser(prog).parse_intermixed_args(argv)
    from simclr_tau.config import load_config
    from simclr_tau.train.pretrain import run

    cfg = load_config(args.config, args.overrides)
    result = run(cfg, resume=args.resume)
    if result.is_main:  # final loss and τ, the encoder, the next command
        from simclr_tau.train.progress import run_summary

        print(run_summary(result, "pretrain"), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
