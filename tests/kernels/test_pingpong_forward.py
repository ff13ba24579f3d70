"""The ping-pong forward (_forward_pingpong.py): it compiles for sm_90 into the partitions and the
schedule it was written for (checked here on the CPU, from the compiler's output), tiles that ask
for it run it only for the calls it takes, the default chooses it only in the measured settings,
and if it cannot compile the portable kernel runs the call with its own launch. Its numerics need a GPU (test_gpu_gluon.py):
the interpreter cannot run Gluon."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton.compiler.errors import CompilationError

from kernels import _forward, _hopper, attention_reference
from kernels._launch import Tiles, call_geometry

from .numerics import random_qkv

ROOT = Path(__file__).resolve().parents[2]


def compiled_for_sm90(head_dim, block_m, block_n, stages, causal, head_major,
                      dropout=False) -> dict:
    """The ping-pong forward compiled for sm_90 in its own process (tests/kernels/gluon_compile.py)."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    kernel = "pingpong_head_major" if head_major else "pingpong"
    result = subprocess.run([sys.executable, "-m", "tests.kernels.gluon_compile", str(head_dim),
                             str(block_m), str(block_n), str(stages), "4", str(causal), kernel,
                             *(["dropout"] if dropout else [])],
                            cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


# The tiles measured fastest in their cells (attention_notes v18) and the two-consumer causal form.
@pytest.mark.parametrize("head_dim, block_m, block_n, stages, causal, head_major", [
    (128, 192, 64, 3, 0, 1), (64, 192, 128, 3, 1, 0), (64, 128, 128, 3, 0, 1), (64, 128, 128, 3, 1, 0)])
def test_compiles_for_sm90_with_the_ping_pong_schedule(head_dim, block_m, block_n, stages, causal,
                                                       head_major):
    compiled = compiled_for_sm90(head_dim, block_m, block_n, stages, causal, head_major)
    consumers = block_m // 64
    # The workers: every consumer but the first (the default partition) and the producer warp,
    # with the register split the kernel asks for.
    consumer_regs = {2: "240", 3: "160"}[consumers]
    assert compiled["partitions"] == [", ".join([consumer_regs] * (consumers - 1) + ["24"])]
    # Each consumer's key loop (with the causal mask a second one for the masked blocks): S of the
    # next block and P·V of this one issued together, a wait that leaves P·V outstanding under the
    # softmax step, then a full wait; the producer's loop issues two TMA copies per block.
    # (Each match runs from a loop's start to the first yield: from the innermost loop's start.)
    loops = [loop[loop.rfind("scf.for"):] for loop in compiled["loops"]]
    consumer_loops = [loop for loop in loops if "ttng.warp_group_dot " in loop]
    assert len(consumer_loops) == consumers * (1 + causal)
    for loop in consumer_loops:
        assert loop.count("ttng.warp_group_dot ") == 2
        assert re.findall(r"warp_group_dot_wait [^{]*\{pendings = (\d+)", loop) == ["1", "0"]
    assert any(loop.count("ttng.async_tma_copy_global_to_local") == 2 for loop in loops)
    # ptxas kept the products asynchronous. (Three consumers at 160 registers spill a few of a
    # tile's scalars at head dim 64 without a mask; the measured speed includes that.)
    assert compiled["serialized"] == []
    if consumers == 2 or causal or head_dim == 128:
        assert compiled["stack"] <= 8
    # None of the spills is in a loop that holds the products.
    assert set(compiled["loop_spills"].split(",")) == {"0"}


@pytest.mark.parametrize("head_dim, block_m, block_n, stages", [(64, 128, 128, 3), (128, 128, 64, 4)])
def test_compiles_for_sm90_with_dropout_inside_the_schedule(head_dim, block_m, block_n, stages):
    # With dropout each consumer draws its block's keep-mask in the softmax step: the loops keep
    # their two products and their waits, Philox's high multiplies are added, and no loop that
    # holds the products spills (causal: the longer form, with the masked loop).
    plain = compiled_for_sm90(head_dim, block_m, block_n, stages, 1, 0)
    compiled = compiled_for_sm90(head_dim, block_m, block_n, stages, 1, 0, dropout=True)
    loops = [loop[loop.rfind("scf.for"):] for loop in compiled["loops"]]
    consumer_loops = [loop for loop in loops if "ttng.warp_group_dot " in loop]
    assert len(consumer_loops) == 2 * (block_m // 64)
    for loop in consumer_loops:
        assert re.findall(r"warp_group_dot_wait [^{]*\{pendings = (\d+)", loop) == ["1", "0"]
    assert compiled["high_multiplies"] > plain["high_multiplies"]
    assert compiled["serialized"] == []
    assert set(compiled["loop_spills"].split(",")) == {"0"}


def test_tiles_name_the_ping_pong_kernel_only_as_a_gluon_forward():
    assert Tiles(192, 64, 4, 3, gluon=True, pingpong=True, head_major=True).pingpong
    for bad in (dict(gluon=False), dict(num_warps=8), dict(block_m=64), dict(fused=True)):
        fields = dict(block_m=128, block_n=64, num_warps=4, num_stages=3, gluon=True, pingpong=True)
        with pytest.raises(ValueError, match="ping-pong tiles"):
            Tiles(**{**fields, **bad})
    with pytest.raises(ValueError, match="head_major"):
        Tiles(128, 64, 4, 3, gluon=True, head_major=True)


def test_rows_of_one_matrix():
    # Contiguous tensors and q, k, v sliced from one packed (batch, seqlen, 3, heads, head_dim).
    assert _hopper.rows_of_one_matrix(torch.empty(2, 256, 4, 64))
    packed = torch.empty(2, 256, 3, 4, 64)
    assert all(_hopper.rows_of_one_matrix(packed[:, :, i]) for i in range(3))
    # Heads first in memory, or sequences not back to back: one descriptor cannot read them.
    assert not _hopper.rows_of_one_matrix(torch.empty(2, 4, 256, 64).transpose(1, 2))
    assert not _hopper.rows_of_one_matrix(torch.empty(2, 512, 4, 64)[:, :256])


def test_ping_pong_tiles_run_it_only_for_the_calls_it_takes(device, monkeypatch):
    # A caller's ping-pong tiles: calls outside its schedule, or whose tensors one descriptor
    # cannot read, run the portable kernel. (The interpreter has no Gluon: the device check is the
    # GPU tests'.)
    monkeypatch.setattr(_hopper, "gluon_device", lambda tensors, varlen: not varlen)
    monkeypatch.setattr(_forward, "multiprocessors", lambda device: 132)
    tiles = Tiles(128, 64, 4, 3, gluon=True, pingpong=True)

    def chosen(q, k, causal=False, dropout_p=0.0, window=(-1, -1)):
        geometry = call_geometry(q, k, None, 0)
        out, lse = _forward.new_outputs(q, geometry)
        return _forward.launch_config(q, k, k, out, lse, geometry, 0.125, causal, dropout_p, tiles,
                                      window)[:3]
    q = torch.randn(2, 256, 4, 64, device=device)
    launcher, grid, static = chosen(q, q)
    # 2 query tiles x 4 heads x 2 sequences: fewer tiles than SMs, one program each.
    assert launcher is _forward.FORWARD_PINGPONG and grid == (16,) and static[-1] == 2
    assert chosen(q, q, causal=True)[0] is _forward.FORWARD_PINGPONG
    assert chosen(q, q, dropout_p=0.1)[0] is _forward.FORWARD_PINGPONG
    assert chosen(q, q, causal=True, dropout_p=0.1)[0] is _forward.FORWARD_PINGPONG
    assert chosen(q, q, window=(32, 0))[0] is _forward.FORWARD
    assert chosen(q, q[:, :200])[0] is _forward.FORWARD                      # ragged key block
    assert chosen(q[:, :128], q, causal=True)[0] is _forward.FORWARD         # causal, Nq != Nk
    heads_first = torch.randn(2, 4, 256, 64, device=device).transpose(1, 2)
    assert chosen(heads_first, heads_first)[0] is _forward.FORWARD           # not rows of one matrix


@pytest.mark.parametrize("causal", [False, True])
def test_a_ping_pong_kernel_that_cannot_compile_leaves_the_call_to_the_portable_one(
        device, causal, monkeypatch):
    # Its grid and arguments are not the portable kernel's: the fallback launches the portable
    # kernel with its own, and the launch plan keeps those.
    q, k, v = random_qkv((2, 128, 2, 64), (2, 128, 2, 64), torch.float32, device, requires_grad=False)
    geometry = call_geometry(q, k, None, 0)
    tiles = Tiles(128, 64, 4, 2, gluon=True, pingpong=True)
    monkeypatch.setattr(_forward, "_pingpong_takes", lambda *args: True)
    monkeypatch.setattr(_forward, "multiprocessors", lambda device: 3)
    monkeypatch.setattr(_hopper, "FALLBACKS", set())

    def refuse(grid, args, options):
        raise CompilationError("", None, "out of registers")
    monkeypatch.setattr(_forward.FORWARD_PINGPONG, "launch", refuse)
    out, lse = _forward.new_outputs(q, geometry)
    launcher, grid, static, _ = _forward.launch_config(q, k, v, out, lse, geometry, 0.125, causal, 0.0, tiles)
    assert launcher is _forward.FORWARD_PINGPONG and grid == (3,) and static[-1] == 2
    with pytest.warns(RuntimeWarning, match="portable kernel"):
        _, launched_grid, launched_static = _forward.launch_into(
            out, lse, q, k, v, None, geometry, 1 / math.sqrt(64), causal, 0.0, 0, 0, tiles)
    portable = _forward.launch_config(q, k, v, out, lse, geometry, 1 / math.sqrt(64), causal, 0.0,
                                      _forward.forward_tiles(64, q.device, q.dtype))
    assert launched_grid[0] == portable[1][0] and launched_static == portable[2]
    exact = attention_reference(q, k, v, causal=causal, compute_dtype=torch.float64)
    assert (out.double() - exact).abs().max().item() < 1e-5


def test_ping_pong_tiles_exist_only_for_measured_settings(monkeypatch):
    from kernels import _launch, _tile_rules
    cuda = torch.device("cuda", 0)

    def tiles(head_dim, causal, seqlen, dtype=torch.bfloat16, dropout=False, device=cuda,
              seqlen_q=None):
        return _tile_rules.pingpong_forward_tiles(head_dim, device, dtype, causal, dropout,
                                              seqlen if seqlen_q is None else seqlen_q, seqlen)
    for capability, expected in [((9, 0), True), ((8, 0), False), ((10, 0), False)]:
        monkeypatch.setattr(_launch, "capability", lambda device: capability)
        assert (tiles(128, False, 4096) is not None) == expected
    monkeypatch.setattr(_launch, "capability", lambda device: (9, 0))
    assert tiles(128, False, 4096, device=torch.device("cpu")) is None
    # From the shortest length where it won (attention_notes v18; 512: v32), with the tiles that
    # won there.
    # Head dim 128 without a mask: two consumers with four K/V stages below 2K (v35), three
    # consumers from 2K.
    assert tiles(128, False, 512) == tiles(128, False, 2047) == Tiles(
        128, 64, 4, 4, gluon=True, pingpong=True, head_major=True)
    assert tiles(128, False, 2048) == Tiles(192, 64, 4, 3, gluon=True, pingpong=True, head_major=True)
    assert tiles(128, False, 256) is None
    assert tiles(128, False, 4096, seqlen_q=1) is None       # one query against a long cache
    assert tiles(64, True, 2048) == Tiles(192, 128, 4, 3, gluon=True, pingpong=True)    # v31
    assert tiles(64, True, 1024) is None                      # lost at 512-1K
    # Without a mask at head dim 64: two consumers of 128 rows to 4K (v32), three of 64 from 8K
    # (v21).
    two_consumers = Tiles(128, 128, 4, 3, gluon=True, pingpong=True, head_major=True)
    assert tiles(64, False, 512) == tiles(64, False, 4096) == two_consumers
    assert tiles(64, False, 8192) == Tiles(192, 64, 4, 3, gluon=True, pingpong=True,
                                           head_major=True)
    assert tiles(64, False, 256) is None
    # Causal at head dim 128: two consumers below 1K (v34), three from 1K, with four K/V stages
    # below 2K (v35).
    assert tiles(128, True, 512) == tiles(128, True, 1023) == Tiles(128, 64, 4, 3, gluon=True,
                                                                    pingpong=True)
    assert tiles(128, True, 1024) == tiles(128, True, 2047) == Tiles(192, 64, 4, 4, gluon=True,
                                                                     pingpong=True)
    assert tiles(128, True, 2048) == Tiles(192, 64, 4, 3, gluon=True, pingpong=True)
    assert tiles(128, True, 16384) == Tiles(192, 64, 4, 3, gluon=True, pingpong=True)
    assert tiles(128, True, 256) is None
    assert tiles(128, False, 4096, dropout=True) is None      # with dropout: unmeasured
    # With dropout, head dim 64 causal from 4K (v43: -9.5 % at 4K, -12.7 % at 8K; 2K level).
    assert tiles(64, True, 4096, dropout=True) == tiles(64, True, 16384, dropout=True) == Tiles(
        128, 128, 4, 3, gluon=True, pingpong=True)
    assert tiles(64, True, 2048, dropout=True) is None
    assert tiles(64, False, 4096, dropout=True) is None
    assert tiles(128, False, 4096, dtype=torch.float32) is None
    assert tiles(256, False, 16384) is None


def test_default_tiles_take_the_ping_pong_forward_only_for_calls_it_takes(device, monkeypatch):
    # Its tiles come first where they exist and the call qualifies; else the next kernel's.
    pingpong = Tiles(128, 64, 4, 3, gluon=True, pingpong=True)
    monkeypatch.setattr(_forward, "pingpong_forward_tiles",
                        lambda head_dim, device, dtype, causal, dropout, seqlen_q, seqlen_k:
                        pingpong if min(seqlen_q, seqlen_k) >= 128 and not dropout else None)
    monkeypatch.setattr(_forward, "gluon_forward_tiles", lambda *args: None)
    monkeypatch.setattr(_forward, "tma_forward_tiles", lambda *args: None)
    # The interpreter has no Gluon; the device check is the GPU tests'.
    monkeypatch.setattr(_hopper, "gluon_device", lambda tensors, varlen: not varlen)
    portable = _forward.forward_tiles(64, torch.device(device), torch.float32)

    def chosen(q, k, causal=True, dropout_p=0.0, window=(-1, -1)):
        return _forward.default_tiles(q, k, k, call_geometry(q, k, None, 0), causal, dropout_p,
                                      window)
    q = torch.randn(1, 128, 2, 64, device=device)
    assert chosen(q, q) == pingpong
    assert chosen(q, q, causal=False) == pingpong
    assert chosen(q[:, :64], q[:, :64]) == portable                      # too short
    assert chosen(q, q, dropout_p=0.1) == portable
    assert chosen(q, q, window=(32, 0)) == portable
    assert chosen(q[:, :64], q) == portable                              # causal, Nq != Nk
    ragged = torch.randn(1, 160, 2, 64, device=device)
    assert chosen(ragged, q, causal=False) == portable     # queries not in 64-row blocks
    heads_first = torch.randn(1, 2, 128, 64, device=device).transpose(1, 2)
    assert chosen(heads_first, heads_first) == portable                  # not rows of one matrix
