"""kNN evaluation, launchable on several processes: ``accelerate launch eval/knn.py RUN_DIR [...]``.

Same arguments as ``simclr-tau knn`` (see ``python eval/knn.py --help``).
"""

import sys
from pathlib import Path

try:
    import simclr_tau  # noqa: F401
except ModuleNotFoundError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simclr_tau.evaluation.cli import knn_main

if __name__ == "__main__":
    knn_main(sys.argv[1:])
