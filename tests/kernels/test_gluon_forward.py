"""The Gluon forward (_forward_gluon.py): it compiles for sm_90 with the schedule it was written for
(checked here on the CPU, from the compiler's output), it is chosen only for the calls that
schedule covers, and everything else runs the portable kernel. Its numerics need a GPU
(test_gpu.py): the interpreter cannot run Gluon."""

import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from kernels import _forward, _hopper, attention_reference
from kernels._forward_gluon import _forward_gluon_kernel
from kernels._launch import Tiles, call_geometry

from .numerics import random_qkv

POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse": "*fp32",
            "cu_seqlens": "*i32"}


def compile_for_sm90(head_dim, block_m, block_n, kv_stages, num_warps):
    """Compile the kernel as a launch on an H100 would (bf16, aligned pointers and strides)."""
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                      UPPER=False, LOWER=False, DROPOUT=False, VARLEN=False, PRECISION="tf32",
                      N_ROUNDS=7, KV_STAGES=kv_stages, num_warps=num_warps)
    names = _forward_gluon_kernel.arg_names
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "drop_rescale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride") and name != "stride_lse_h":
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = GluonASTSource(_forward_gluon_kernel, signature,
                            {(names.index(k),): v for k, v in constexprs.items()}, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=1))


@pytest.mark.parametrize("head_dim, block_n", [(128, 64), (64, 128)])
def test_compiles_for_sm90_with_the_overlapped_schedule(head_dim, block_n, tmp_path):
    kernel = compile_for_sm90(head_dim, 128, block_n, kv_stages=3, num_warps=8)
    loop = re.search(r"scf\.for.*?scf\.yield", kernel.asm["ttgir"], re.S).group(0)
    # In the key loop: two asynchronous products (S_{j+1}, then P_j·V_j), a wait that leaves one
    # outstanding (the softmax step runs under P_j·V_j), then a full wait; K/V by TMA.
    assert loop.count("ttng.warp_group_dot ") == 2
    assert re.findall(r"warp_group_dot_wait [^{]*\{pendings = (\d+)", loop) == ["1", "0"]
    assert loop.count("ttng.async_tma_copy_global_to_local") == 2
    # No register spills (ptxas's report, as cuobjdump prints it).
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    registers, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    assert stack == 0 and registers <= 255


def test_the_calls_its_schedule_covers():
    assert _hopper.gluon_call(False, (-1, -1), 0.0, 4096, 128, 64)
    assert _hopper.gluon_call(False, (-1, -1), 0.0, 64, 64, 64)
    assert not _hopper.gluon_call(True, (-1, -1), 0.0, 4096, 128, 64)       # causal
    assert not _hopper.gluon_call(False, (256, 256), 0.0, 4096, 128, 64)    # a window
    assert not _hopper.gluon_call(False, (-1, -1), 0.1, 4096, 128, 64)      # dropout
    assert not _hopper.gluon_call(False, (-1, -1), 0.0, 4000, 128, 64)      # ragged last key block
    assert not _hopper.gluon_call(False, (-1, -1), 0.0, 4096, 96, 64)       # head dim
    assert not _hopper.gluon_call(False, (-1, -1), 0.0, 32, 64, 64)         # shorter than a block


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
