"""Compile a Gluon kernel for sm_90 as the library would launch it (bf16, 2 x 4096 tokens, 4
heads; ``scripts/kernel_resources.py`` derives the specialization from the arguments) and print,
as JSON, its loops' TTGIR, ptxas's register and stack use, and ptxas's reasons for serializing its
warpgroup MMAs (none, for a kernel whose schedule holds). The compiled-schedule tests read it.

    python -m tests.kernels.gluon_compile HEAD_DIM BLOCK_M BLOCK_N STAGES NUM_WARPS CAUSAL [forward|dkdv|dkdv_fused|dkdv_warp_specialized|dkdv_ws_persistent|dq|pingpong|pingpong_head_major]
    python -m tests.kernels.gluon_compile HEAD_DIM BLOCK_M BLOCK_N STAGES NUM_WARPS CAUSAL KERNEL untransposed|broadcast   # dropout
    python -m tests.kernels.gluon_compile keep BLOCK_M BLOCK_N NUM_WARPS     # _philox_gluon's mask

Run as its own process: with TRITON_INTERPRET=1 (the test session's setting) Triton's standard
library is the interpreter's and a Gluon kernel cannot be compiled."""

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from kernels._philox import PHILOX_ROUNDS, counters_per_row, kernel_counter_base, kernel_seed
from kernels._philox_gluon import _keep_mask_gluon_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import kernel_resources  # noqa: E402


def compile_for_sm90(head_dim, block_m, block_n, stages, num_warps, causal, kernel="forward",
                     mask_layout=None):
    """With ``mask_layout``, compile with dropout (dK/dV: its mask in that layout; dQ and the
    forward: any value). ``kernel`` "dkdv_fused": the dK/dV pass that also adds dQ;
    "dkdv_warp_specialized": its two-consumer form (``_dkdv_warp_specialized.py``);
    "dkdv_ws_persistent": that form in a persistent grid (``_dkdv_ws_persistent.py``), and
    "dkdv_ws_persistent_kv2" with two K/V buffers; "dkdv_ws_mask_partition" and
    "dkdv_ws_persistent_mask_partition": either grid with its keep-masks from warps of their own
    (``_dropout_mask_partition.py``);
    "pingpong" and "pingpong_head_major": the ping-pong forward in either tile order."""
    pingpong = kernel.startswith("pingpong")
    persistent = kernel.startswith("dkdv_ws_persistent")
    mask_partition = kernel.endswith("mask_partition")
    warp_specialized = kernel == "dkdv_warp_specialized" or persistent or mask_partition
    args = SimpleNamespace(
        pass_="dkdv" if kernel.startswith("dkdv") else "forward" if pingpong else kernel,
        batch=2, seqlen=4096, heads=4, pingpong=pingpong, head_major=kernel.endswith("head_major"),
        head_dim=head_dim, causal=bool(causal), dropout=0.1 if mask_layout else 0.0,
        tiles=(block_m, block_n, num_warps, stages), fused=kernel == "dkdv_fused" or warp_specialized,
        gluon=True, warp_specialized=warp_specialized, persistent=persistent,
        kv_buffers=2 if kernel.endswith("_kv2") else 1, mask_partition=mask_partition,
        register_grads=False, seed_in_memory=False, mask_layout=mask_layout if kernel.startswith("dkdv") else None)
    return kernel_resources.compile_for(*kernel_resources.pass_arguments(args))


def compile_keep_mask_for_sm90(block_m, block_n, num_warps):
    """``_philox_gluon._keep_mask_gluon_kernel`` as ``_philox_gluon.keep_mask`` launches it."""
    mask = torch.empty(2, 3, 256, 384, dtype=torch.int8, device="meta")
    arguments = (mask, 256, 384, kernel_seed(1234), kernel_counter_base(0), counters_per_row(384), 26)
    return kernel_resources.compile_for(
        _keep_mask_gluon_kernel, arguments,
        dict(BLOCK_M=block_m, BLOCK_N=block_n, N_ROUNDS=PHILOX_ROUNDS, num_warps=num_warps))


def main():
    if sys.argv[1] == "keep":
        kernel = compile_keep_mask_for_sm90(*map(int, sys.argv[2:5]))
        use = kernel_resources.usage(kernel)
        print(json.dumps(dict(conversions=kernel.asm["ttgir"].count("convert_layout"),
                              shared=kernel.asm["ttgir"].count("local_alloc"),
                              high_multiplies=len(re.findall(r"mul\.hi\.u32", kernel.asm["ptx"])),
                              registers=use["registers"], stack=use["stack_bytes"])))
        return
    kernel = compile_for_sm90(*map(int, sys.argv[1:7]), *sys.argv[7:9])
    loops = re.findall(r"scf\.for.*?scf\.yield", kernel.asm["ttgir"], re.S)
    use = kernel_resources.usage(kernel)
    print(json.dumps(dict(loops=loops, registers=use["registers"], stack=use["stack_bytes"],
                          loop_spills=use["mma_loop_spills"],
                          high_multiplies=len(re.findall(r"mul\.hi\.u32", kernel.asm["ptx"])),
                          serialized=kernel_resources.wgmma_serialization(kernel),
                          # Registers per thread the warp-specialized partitions ask for.
                          partitions=re.findall(r"requestedRegisters = array<i32: ([\d, ]+)>",
                                                kernel.asm["ttgir"]))))


if __name__ == "__main__":
    main()
