"""The Gluon backward passes (_dq_gluon.py, _dkdv_gluon.py): each compiles for sm_90 with the schedule
it was written for (checked here on the CPU, from the compiler's output), is chosen only for the
calls that schedule covers, and everything else runs the portable pass. Their numerics need a GPU
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

from kernels import _backward, _forward, _hopper
from kernels._launch import Tiles, call_geometry

from .numerics import assert_gradients_match_float64, random_qkv

ROOT = Path(__file__).resolve().parents[2]


def compiled_for_sm90(kernel, head_dim, block_m, block_n, stages, warps, causal,
                     mask_layout=None) -> dict:
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    dropout = [mask_layout] if mask_layout else []
    result = subprocess.run([sys.executable, "-m", "tests.kernels.gluon_compile", str(head_dim),
                             str(block_m), str(block_n), str(stages), str(warps), str(causal), kernel,
                             *dropout],
                            cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("kernel, head_dim, block_m, block_n, warps, causal, products, pending", [
    # dK/dV: Sᵀ and dPᵀ of the next query block, then dV and dK of this one; two left running.
    ("dkdv", 128, 32, 128, 8, 0, 4, "2"), ("dkdv", 64, 32, 128, 8, 1, 4, "2"),
    # dQ: S and dP of the next key block, then dQ of this one; one left running.
    ("dq", 128, 64, 64, 4, 1, 3, "1")])
def test_compiles_for_sm90_with_the_overlapped_schedule(kernel, head_dim, block_m, block_n, warps,
                                                        causal, products, pending):
    compiled = compiled_for_sm90(kernel, head_dim, block_m, block_n, 3, warps, causal)
    # One loop, and with the causal mask a second one for the diagonal blocks. In each: the
    # asynchronous products, a wait that leaves the accumulating ones running under the
    # elementwise step, then a full wait; the streamed tiles by TMA.
    assert len(compiled["loops"]) == 1 + causal
    for loop in compiled["loops"]:
        assert loop.count("ttng.warp_group_dot ") == products
        assert re.findall(r"warp_group_dot_wait [^{]*\{pendings = (\d+)", loop) == [pending, "0"]
        assert loop.count("ttng.async_tma_copy_global_to_local") == 2
    # No register spills (ptxas's report, as cuobjdump prints it), and ptxas kept the products
    # asynchronous.
    assert compiled["stack"] == 0 and compiled["registers"] <= 255
    assert compiled["serialized"] == []


@pytest.mark.parametrize("kernel, head_dim, block_m, block_n, warps, causal, products, pending", [
    ("dkdv", 64, 32, 128, 8, 1, 4, "2"), ("dkdv", 64, 32, 128, 8, 0, 4, "2"),
    ("dkdv", 128, 32, 128, 8, 0, 4, "2"), ("dq", 128, 64, 64, 4, 1, 3, "1"),
    ("dq", 64, 64, 64, 4, 0, 3, "1")])
def test_dropout_compiles_for_sm90_with_the_same_schedule(kernel, head_dim, block_m, block_n, warps,
                                                          causal, products, pending):
    # The products and waits as without dropout, no spills, and the keep-mask's Philox work per
    # thread only its own counters' (two high multiplies a round, 14 per counter, at each of the
    # kernel's two or three elementwise steps; 64-bit counter arithmetic adds a few). dK/dV builds
    # the mask in the forward's orientation and moves it to its transposed tile; built in that
    # tile directly it would cost four times the counters.
    compiled = compiled_for_sm90(kernel, head_dim, block_m, block_n, 3, warps, causal,
                                 "untransposed")
    assert len(compiled["loops"]) == 1 + causal
    for loop in compiled["loops"]:
        assert loop.count("ttng.warp_group_dot ") == products
        assert re.findall(r"warp_group_dot_wait [^{]*\{pendings = (\d+)", loop) == [pending, "0"]
    counters = (block_m // 2) * (block_n // 8) // (32 * warps)
    steps = 2 + causal
    assert compiled["high_multiplies"] < (counters + 1) * 14 * steps
    assert compiled["stack"] == 0 and compiled["serialized"] == []


def assert_fused_schedule(block_m, causal, mask_layout, pendings, barriers, store_wait_pendings):
    """The fused pass (ACCUMULATE_DQ, head dim 64, 64-key blocks), compiled for sm_90: in each loop
    (a second one for the causal diagonal) five products waited for as ``pendings`` says, no
    atomics, one TMA reduce of dQ, ``barriers`` barriers, the first after the wait for the copy that
    last read the dQ buffer and before the reduce; no spills, and ptxas kept the products
    asynchronous. Returns the loops."""
    compiled = compiled_for_sm90("dkdv_fused", 64, block_m, 64, 3, 4, causal, mask_layout)
    assert len(compiled["loops"]) == 1 + causal
    for loop in compiled["loops"]:
        assert loop.count("ttng.warp_group_dot ") == 5
        assert re.findall(r"warp_group_dot_wait [^{]*\{pendings = (\d+)", loop) == pendings
        assert "atomic_rmw" not in loop and loop.count("ttng.async_tma_reduce add") == 1
        assert loop.count("gpu.barrier") == barriers
        wait = loop.index(f"async_tma_store_wait {{pendings = {store_wait_pendings}")
        assert wait < loop.index("gpu.barrier") < loop.index("async_tma_reduce")
    assert compiled["stack"] == 0 and compiled["serialized"] == []
    return compiled["loops"]


@pytest.mark.parametrize("causal, mask_layout", [(0, None), (1, "untransposed")])
def test_fused_pass_compiles_for_sm90_with_dq_first(causal, mask_layout):
    # 32-query blocks: per query block dQᵀ issued first so that a wait leaving four running frees
    # its accumulator (staged in shared memory for the copy engine's reduce) before the
    # elementwise step; then the schedule of the two-pass kernel, one dSᵀ store for the next
    # block's dQᵀ, and the one barrier at the top, after the wait for the copy that last read this
    # block's dQ buffer (one of three) and before the previous block's copy.
    loops = assert_fused_schedule(32, causal, mask_layout, ["4", "2", "0"], 1, 1)
    assert all(loop.count("local_store") == 2 for loop in loops)


# The calls it was the default for (v16, v17): without a mask with and without dropout, causal without.
@pytest.mark.parametrize("causal, mask_layout", [(0, None), (0, "untransposed"), (1, None)])
def test_fused_pass_with_64_query_blocks_takes_them_in_turn(causal, mask_layout):
    # 64-query blocks (the default for long head-dim-64 calls until v21/v22): per block the
    # elementwise step on tiles already waited for; the dSᵀ store, and one barrier after the wait
    # for the previous block's reduce; the three gradient products, then the next block's Sᵀ and
    # dPᵀ; a wait that leaves those two running while the dQ store, a second barrier and one
    # reduce are issued; then the wait for them, at the end of the iteration (in flight across the
    # loop's back edge they made ptxas serialize every product).
    loops = assert_fused_schedule(64, causal, mask_layout, ["2", "0"], 2, 0)
    for loop in loops:
        waits = [wait.start() for wait in re.finditer(r"warp_group_dot_wait ", loop)]
        assert loop.rindex("ttng.warp_group_dot ") < waits[0] < loop.index("async_tma_reduce") \
            < waits[1]


def test_the_calls_its_schedule_covers():
    # (causal, window, dropout_p, seqlen_q, seqlen_k, head_dim, group_size, block_m, block_n)
    assert _hopper.gluon_dkdv_call(False, (-1, -1), 0.0, 4096, 4096, 128, 1, 32, 128)
    assert _hopper.gluon_dkdv_call(False, (-1, -1), 0.0, 512, 1024, 64, 1, 32, 128)  # Nq != Nk, no mask
    assert _hopper.gluon_dkdv_call(True, (-1, -1), 0.0, 4096, 4096, 64, 1, 32, 128)
    assert not _hopper.gluon_dkdv_call(True, (-1, -1), 0.0, 2048, 4096, 64, 1, 32, 128)  # causal, Nq != Nk
    assert not _hopper.gluon_dkdv_call(False, (-1, -1), 0.0, 4096, 4096, 128, 2, 32, 128)  # GQA
    assert not _hopper.gluon_dkdv_call(False, (64, 64), 0.0, 4096, 4096, 128, 1, 32, 128)  # a window
    assert _hopper.gluon_dkdv_call(True, (-1, -1), 0.1, 4096, 4096, 128, 1, 32, 128)  # dropout
    assert not _hopper.gluon_dkdv_call(False, (-1, -1), 0.1, 4096, 4096, 128, 1, 8, 128)  # pairs of 16 rows
    assert not _hopper.gluon_dkdv_call(False, (64, 64), 0.1, 4096, 4096, 128, 1, 32, 128)  # window
    assert not _hopper.gluon_dkdv_call(False, (-1, -1), 0.0, 4000, 4096, 128, 1, 64, 128)  # ragged queries
    assert not _hopper.gluon_dkdv_call(False, (-1, -1), 0.0, 4096, 4000, 128, 1, 32, 128)  # ragged keys
    assert not _hopper.gluon_dkdv_call(False, (-1, -1), 0.0, 4096, 4096, 96, 1, 32, 128)   # head dim
    # dQ: the same, with GQA allowed: (causal, window, dropout_p, seqlen_q, seqlen_k, head_dim,
    # block_m, block_n)
    assert _hopper.gluon_dq_call(True, (-1, -1), 0.0, 4096, 4096, 128, 64, 64)
    assert not _hopper.gluon_dq_call(False, (-1, -1), 0.0, 4000, 4096, 128, 64, 64)   # ragged queries
    assert not _hopper.gluon_dq_call(False, (-1, -1), 0.0, 4096, 4000, 128, 64, 64)   # ragged keys
    assert not _hopper.gluon_dq_call(True, (-1, -1), 0.0, 2048, 4096, 128, 64, 64)    # causal, Nq != Nk
    assert _hopper.gluon_dq_call(False, (-1, -1), 0.1, 4096, 4096, 128, 64, 64)       # dropout
    assert not _hopper.gluon_dq_call(False, (-1, -1), 0.1, 4096, 4096, 128, 64, 16)   # 32-key blocks


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path (test_gpu.py: the GPU)")
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_backward_tiles_run_the_portable_passes_without_sm90(causal, device, monkeypatch):
    # Under the interpreter (no Gluon there) the Gluon tiles' calls run the portable passes, the
    # dK/dV pass with the portable pass's own default tiles (hopper=False).
    q, k, v = random_qkv((1, 64, 2, 64), (1, 64, 2, 64), torch.float32, device)
    tiles, portable = Tiles(16, 32, 1, 3, gluon=True), Tiles(32, 64, 1, 1)
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, hopper=True, **kwargs: tiles if hopper else portable)
    monkeypatch.setattr(_backward, "dq_tiles", lambda *args: tiles)
    geometry = call_geometry(q, k, None, 0)
    out, lse = _forward.new_outputs(q, geometry)
    configs = _backward.launch_configs(torch.randn_like(q), q, k, v, out, lse,
                                       *_backward.new_gradients(q, k, v, lse)[1:], geometry,
                                       1 / math.sqrt(64), causal, 0.0)
    assert configs[0][0] is _backward.DQ and configs[1][0] is _backward.DKDV
    assert "STAGES" not in configs[0][3] and "STAGES" not in configs[1][3]
    assert (configs[0][3]["BLOCK_M"], configs[1][3]["BLOCK_M"], configs[1][3]["BLOCK_N"]) == (16, 32, 64)
    assert_gradients_match_float64(q, k, v, causal)


def test_gluon_backward_tiles_are_defaults_only_where_measured_faster(monkeypatch):
    from kernels import _launch, _tile_rules
    cuda, bf16 = torch.device("cuda", 0), torch.bfloat16
    assert not _tile_rules.dq_tiles(128, torch.device("cpu"), bf16).gluon
    for capability, expected in [((9, 0), True), ((8, 0), False), ((10, 0), False)]:
        monkeypatch.setattr(_launch, "capability", lambda device: capability)
        assert _tile_rules.dq_tiles(128, cuda, bf16).gluon == expected
        assert _tile_rules.dkdv_tiles(128, cuda, bf16, causal=True).gluon == expected
    monkeypatch.setattr(_launch, "capability", lambda device: (9, 0))
    for causal in (False, True):
        assert _tile_rules.dq_tiles(64, cuda, bf16).gluon
        assert not _tile_rules.dkdv_tiles(64, cuda, bf16, causal).gluon          # tied the portable pass
        assert not _tile_rules.dq_tiles(128, cuda, bf16, dropout=True).gluon      # tied the portable pass
        assert _tile_rules.dkdv_tiles(128, cuda, bf16, causal, dropout=True).gluon
        assert not _tile_rules.dkdv_tiles(128, cuda, bf16, causal, dropout=True, hopper=False).gluon
        # The fused backward: faster with dropout at head dim 64 only (slower at 128).
        assert _tile_rules.dkdv_tiles(64, cuda, bf16, causal, dropout=True).fused
        assert not _tile_rules.dkdv_tiles(64, cuda, bf16, causal).fused
        assert not _tile_rules.dkdv_tiles(128, cuda, bf16, causal, dropout=True).fused
    # At head dim 64 the fused Gluon pass with 64-query tiles is no default any more: every call
    # it won became the warp-specialized pass's (test_warp_specialized_backward.py). Below those
    # lengths, and for calls the Gluon passes do not take (hopper=False), the portable tiles.
    for causal, dropout in [(False, False), (True, False), (False, True), (True, True)]:
        for seqlen in (1024, 2048, 4096, 16384):
            tiles = _tile_rules.dkdv_tiles(64, cuda, bf16, causal, dropout, seqlen=seqlen)
            assert tiles.warp_specialized or not tiles.gluon
            assert not _tile_rules.dkdv_tiles(64, cuda, bf16, causal, dropout, hopper=False,
                                          seqlen=seqlen).gluon
    # Under deterministic algorithms: the two-pass default's tiles (portable at head dim 64),
    # never fused.
    for causal, dropout in [(False, False), (True, False), (False, True), (True, True)]:
        tiles = _tile_rules.dkdv_tiles(64, cuda, bf16, causal, dropout, seqlen=16384, deterministic=True)
        assert not tiles.gluon and not tiles.fused
        assert (tiles.block_m, tiles.block_n) == ((32, 128) if not (causal or dropout) else (64, 64))
    monkeypatch.setattr(_launch, "capability", lambda device: (8, 0))
    assert not _tile_rules.dkdv_tiles(64, cuda, bf16, False, seqlen=16384).gluon
    assert not _tile_rules.dq_tiles(128, cuda, torch.float32).gluon
    assert not _tile_rules.dq_tiles(256, cuda, bf16).gluon
