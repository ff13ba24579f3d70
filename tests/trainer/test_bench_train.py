"""scripts/bench_train.py: the two-pass A/B system swaps the attention backward for its own steps only."""

import sys

import torch

from .helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench_train  # noqa: E402
from kernels import _backward  # noqa: E402


def test_two_pass_system_turns_the_fused_pass_off_during_its_own_steps():
    # The default at head dim 64 with dropout is the fused pass; no GPU is needed to choose tiles.
    fused_now = lambda: _backward.dkdv_tiles(64, torch.device("cuda"), torch.bfloat16, True, True).fused
    seen = []

    class Trainer:
        def train_step(self):
            seen.append(fused_now())
            return {}
    for two_pass in (True, False):
        system = object.__new__(bench_train.TrainerSystem)
        system.trainer, system.two_pass = Trainer(), two_pass
        system.step()
    assert seen == [False, True]
    assert fused_now()                       # restored after the step
