"""The Gluon forward (_forward_gluon.py): it compiles for sm_90 with the schedule it was written for
(checked here on the CPU, from the compiler's output), it is chosen only for the calls that
schedule covers, and everything else runs the portable kernel. Its numerics need a GPU
(test_gpu.py): the interpreter cannot run Gluon."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import _forward, _hopper, attention_reference
from kernels._launch import Tiles, call_geometry

from .numerics import random_qkv

ROOT = Path(__file__).resolve().parents[2]


def compiled_for_sm90(head_dim, block_n, causal, *dropout) -> dict:
    """The forward with 128-query tiles, 3 stages and 8 warps, compiled for sm_90 in its own
    process (tests/kernels/gluon_compile.py); ``dropout``: ("untransposed",) compiles it with."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tests.kernels.gluon_compile", str(head_dim), "128",
                             str(block_n), "3", "8", str(causal), "forward", *dropout], cwd=ROOT,
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("head_dim, block_n, causal", [(128, 64, 0), (64, 128, 0), (64, 64, 1)])
def test_compiles_for_sm90_with_the_overlapped_schedule(head_dim, block_n, causal):
    compiled = compiled_for_sm90(head_dim, block_n, causal)
    # One key loop, and with the causal mask a second one for the diagonal blocks. In each: two
    # asynchronous products (S_{j+1}, then P_j·V_j), a wait that leaves one outstanding (the softmax
    # step runs under P_j·V_j), then a full wait; K/V by TMA.
    assert len(compiled["loops"]) == 1 + causal
    for loop in compiled["loops"]:
        assert loop.count("ttng.warp_group_dot ") == 2
        assert re.findall(r"warp_group_dot_wait [^{]*\{pendings = (\d+)", loop) == ["1", "0"]
        assert loop.count("ttng.async_tma_copy_global_to_local") == 2
    # No register spills (ptxas's report, as cuobjdump prints it), and ptxas kept the products
    # asynchronous.
    assert compiled["stack"] == 0 and compiled["registers"] <= 255
    assert compiled["serialized"] == []


@pytest.mark.parametrize("head_dim, block_n, causal", [(128, 64, 1), (64, 128, 0)])
def test_compiles_with_dropout_with_the_same_schedule(head_dim, block_n, causal):
    # The keep-mask is built in the score tile's own layout: no spills, the same products and
    # waits, and Philox work per thread that of its own counters only (two high multiplies a
    # round, 14 per counter, at each of the kernel's two or three softmax steps; 64-bit counter
    # arithmetic adds a few).
    compiled = compiled_for_sm90(head_dim, block_n, causal, "untransposed")
    assert len(compiled["loops"]) == 1 + causal
    for loop in compiled["loops"]:
        assert loop.count("ttng.warp_group_dot ") == 2
        assert re.findall(r"warp_group_dot_wait [^{]*\{pendings = (\d+)", loop) == ["1", "0"]
    counters = (128 // 2) * (block_n // 8) // (32 * 8)
    assert compiled["high_multiplies"] < (counters + 1) * 14 * (2 + causal)
    assert compiled["stack"] == 0 and compiled["serialized"] == []


def test_the_calls_its_schedule_covers():
    # (causal, window, dropout_p, seqlen_q, seqlen_k, head_dim, block_n)
    assert _hopper.gluon_call(False, (-1, -1), 0.0, 4096, 4096, 128, 64)
    assert _hopper.gluon_call(False, (-1, -1), 0.0, 100, 64, 64, 64)        # Nq != Nk without a mask
    assert _hopper.gluon_call(True, (-1, -1), 0.0, 4096, 4096, 64, 128)     # causal, Nq == Nk
    assert not _hopper.gluon_call(True, (-1, -1), 0.0, 2048, 4096, 64, 64)  # causal, Nq != Nk
    assert not _hopper.gluon_call(False, (256, 256), 0.0, 4096, 4096, 128, 64)   # a window
    assert not _hopper.gluon_call(True, (256, -1), 0.0, 4096, 4096, 128, 64)     # causal + window
    assert _hopper.gluon_call(True, (-1, -1), 0.1, 4096, 4096, 128, 64)          # dropout
    assert not _hopper.gluon_call(False, (-1, -1), 0.1, 4096, 4096, 128, 16)     # 32-key blocks
    assert not _hopper.gluon_call(False, (-1, -1), 0.0, 4000, 4000, 128, 64)     # ragged key block
    assert not _hopper.gluon_call(False, (-1, -1), 0.0, 4096, 4096, 96, 64)      # head dim
    assert not _hopper.gluon_call(False, (-1, -1), 0.0, 32, 32, 64, 64)          # under one block


def test_tiles_choose_one_hopper_kernel():
    with pytest.raises(ValueError, match="one kernel"):
        Tiles(128, 64, 8, 3, tma=True, gluon=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path (test_gpu.py: the GPU)")
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_tiles_run_the_portable_kernel_without_sm90(causal, device):
    # Under the interpreter (no Gluon there) the Gluon tiles' calls run the portable kernel.
    q, k, v = random_qkv((1, 64, 2, 64), (1, 64, 2, 64), torch.float32, device, requires_grad=False)
    geometry = call_geometry(q, k, None, 0)
    tiles = Tiles(32, 32, 1, 2, gluon=True)
    out, lse = _forward.new_outputs(q, geometry)
    assert _forward.launch_config(q, k, v, out, lse, geometry, 0.1, causal, 0.0, tiles)[0] \
        is _forward.FORWARD
    out, _ = _forward.forward(q, k, v, None, geometry, 1 / math.sqrt(64), causal, 0.0, seed=0,
                              offset=0, tiles=tiles)
    exact = attention_reference(q, k, v, causal=causal, compute_dtype=torch.float64)
    assert (out.double() - exact).abs().max().item() < 1e-5
