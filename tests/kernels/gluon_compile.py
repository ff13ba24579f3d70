"""Compile a Gluon kernel for sm_90 as a launch on an H100 would (bf16, aligned pointers and
strides) and print, as JSON, its loops' TTGIR and ptxas's register and stack use.

    python -m tests.kernels.gluon_compile HEAD_DIM BLOCK_M BLOCK_N STAGES NUM_WARPS CAUSAL [forward|dkdv|dkdv_fused|dq]
    python -m tests.kernels.gluon_compile HEAD_DIM BLOCK_M BLOCK_N STAGES NUM_WARPS CAUSAL KERNEL untransposed|broadcast   # dropout
    python -m tests.kernels.gluon_compile keep BLOCK_M BLOCK_N NUM_WARPS     # _philox_gluon's mask

Run as its own process: with TRITON_INTERPRET=1 (the test session's setting) Triton's standard
library is the interpreter's and a Gluon kernel cannot be compiled."""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from kernels._dkdv_gluon import _dkdv_gluon_kernel
from kernels._dq_gluon import _dq_gluon_kernel
from kernels._forward_gluon import _forward_gluon_kernel
from kernels._philox_gluon import _keep_mask_gluon_kernel

POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse": "*fp32", "Delta": "*fp32",
            "GradOut": "*bf16", "GradQ": "*bf16", "GradK": "*bf16", "GradV": "*bf16", "GradQAcc": "*fp32",
            "cu_seqlens": "*i32"}
FLOATS = ("qk_scale", "softmax_scale", "drop_rescale")


def compile_for_sm90(head_dim, block_m, block_n, stages, num_warps, causal, kernel="forward",
                     mask_layout=None):
    """With ``mask_layout``, compile with dropout (dK/dV: its mask in that layout; dQ and the
    forward: any value)."""
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                      UPPER=bool(causal), LOWER=False, DROPOUT=mask_layout is not None, VARLEN=False,
                      PRECISION="tf32", N_ROUNDS=7, num_warps=num_warps)
    if kernel == "forward":
        function = _forward_gluon_kernel
        constexprs.update(KV_STAGES=stages, SEED_IN_MEMORY=False)
    elif kernel in ("dkdv", "dkdv_fused"):     # dkdv_fused: it also adds dQ (ACCUMULATE_DQ)
        function = _dkdv_gluon_kernel
        constexprs.update(STAGES=stages, MASK_LAYOUT=mask_layout or "untransposed",
                          ACCUMULATE_DQ=kernel == "dkdv_fused", SEED_IN_MEMORY=False)
    else:
        function = _dq_gluon_kernel
        constexprs.update(STAGES=stages, SEED_IN_MEMORY=False)
    names = function.arg_names
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        elif name in ("seed", "counter_base"):
            signature[name] = "i64"
        else:
            signature[name] = "i32"
            if name.startswith("stride") and name != "stride_lse_h":
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = GluonASTSource(function, signature,
                            {(names.index(k),): v for k, v in constexprs.items()}, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=1))


def compile_keep_mask_for_sm90(block_m, block_n, num_warps):
    """``_philox_gluon._keep_mask_gluon_kernel`` as ``_philox_gluon.keep_mask`` launches it."""
    function = _keep_mask_gluon_kernel
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, N_ROUNDS=7, num_warps=num_warps)
    types = dict(Mask="*i8", seed="i64", counter_base="i64")
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32")
                 for name in function.arg_names}
    source = GluonASTSource(function, signature,
                            {(function.arg_names.index(k),): v for k, v in constexprs.items()},
                            {(0,): [["tt.divisibility", 16]]})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=1))


def resources(kernel) -> tuple[int, int]:
    """ptxas's registers and stack (spill) bytes per thread, as cuobjdump reports them."""
    with tempfile.TemporaryDirectory() as directory:
        cubin = Path(directory) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    registers, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    return registers, stack


def main():
    if sys.argv[1] == "keep":
        kernel = compile_keep_mask_for_sm90(*map(int, sys.argv[2:5]))
        registers, stack = resources(kernel)
        print(json.dumps(dict(conversions=kernel.asm["ttgir"].count("convert_layout"),
                              shared=kernel.asm["ttgir"].count("local_alloc"),
                              high_multiplies=len(re.findall(r"mul\.hi\.u32", kernel.asm["ptx"])),
                              registers=registers, stack=stack)))
        return
    kernel = compile_for_sm90(*map(int, sys.argv[1:7]), *sys.argv[7:9])
    loops = re.findall(r"scf\.for.*?scf\.yield", kernel.asm["ttgir"], re.S)
    registers, stack = resources(kernel)
    print(json.dumps(dict(loops=loops, registers=registers, stack=stack,
                          high_multiplies=len(re.findall(r"mul\.hi\.u32", kernel.asm["ptx"])))))


if __name__ == "__main__":
    main()
