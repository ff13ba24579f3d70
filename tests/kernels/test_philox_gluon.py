"""The Gluon keep-mask (_philox_gluon.py): compiled for sm_90 on the CPU, each thread runs Philox for
the counters it holds and nothing else, with no layout conversion. That its mask equals the portable
kernels' bit for bit needs a GPU (test_gpu.py): the interpreter cannot run Gluon."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 7


def compiled_keep_mask(block_m, block_n, warps) -> dict:
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tests.kernels.gluon_compile", "keep",
                             str(block_m), str(block_n), str(warps)],
                            cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("block_m, block_n, warps", [(64, 64, 4), (128, 64, 8), (64, 128, 4)])
def test_each_thread_computes_only_its_own_counters(block_m, block_n, warps):
    compiled = compiled_keep_mask(block_m, block_n, warps)
    # One Philox counter serves 16 elements (_philox.py): a tile has block_m / 2 row pairs times
    # block_n / 8 counters, shared by 32 * warps threads; each counter costs two high multiplies
    # per round (the first round's one on a zero word folds away).
    per_thread = (block_m // 2) * (block_n // 8) // (32 * warps)
    assert (2 * ROUNDS - 1) * per_thread <= compiled["high_multiplies"] <= 2 * ROUNDS * per_thread
    # The tile is built in the accumulator's layout: no conversion through shared memory.
    assert compiled["conversions"] == 0 and compiled["shared"] == 0
    assert compiled["stack"] == 0
