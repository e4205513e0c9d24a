"""Linear probe + calibration, launchable with ``accelerate launch eval/linear_probe.py RUN_DIR [...]``.

Same arguments as ``simclr-tau linear`` (see ``python eval/linear_probe.py --help``).
"""

import sys
from pathlib import Path

try:
    import simclr_tau  # noqa: F401
except ModuleNotFoundError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simclr_tau.evaluation.cli import linear_main

if __name__ == "__main__":
    linear_main(sys.argv[1:])
