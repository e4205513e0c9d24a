"""Shared test setup.

Tests use tiny tensors: one intra-op thread is faster than two (no thread hand-off per op) and keeps the
suite quick on a busy machine.
"""

import torch

torch.set_num_threads(1)
