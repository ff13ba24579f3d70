"""Registers, spills and shared memory of the portable attention kernels on sm_90, compiled on this
machine, no GPU needed (Triton ships ptxas and cuobjdump).

    python scripts/kernel_resources.py --pass dkdv --seqlen 4096 --heads 12 --head-dim 64 --causal \
        --dropout 0.1 --tiles 64,64,4,3 --fused [--seed-in-memory]

Each pass is compiled with the arguments the library itself would launch it with (``launch_config``
of the forward, ``launch_configs`` of the backward), so the constexprs, the integer
specializations (equal to 1, divisible by 16, 32 or 64 bits) and the alignment hints are the ones
a GPU run compiles. A kernel at the 255-register cap, or with stack (spilled) bytes, is a candidate
for smaller tiles or more warps before any GPU time is spent; speed itself is measured on the GPU.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import _backward, _forward  # noqa: E402
from kernels._launch import NO_WINDOW, Tiles, call_geometry  # noqa: E402
from kernels._philox import kernel_counter_base, kernel_seed  # noqa: E402

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64"}
OPTIONS = ("num_warps", "num_stages")


def specialize(kernel: triton.runtime.JITFunction, arguments: tuple, constexprs: dict):
    """Triton's signature, constants and attributes for ``arguments`` (the runtime ones, in order)
    and ``constexprs`` (by name): what its launch-time specialization would derive."""
    runtime = [p for p in kernel.params if not p.is_constexpr]
    if len(runtime) != len(arguments):
        raise ValueError(f"{kernel.fn.__name__} takes {len(runtime)} runtime arguments; got {len(arguments)}")
    signature, constants, attrs = {}, {}, {}
    given = dict(zip((p.name for p in runtime), arguments))
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            constants[(index,)] = constexprs.get(name, param.default)
            continue
        value = given[name]
        if value is None or (type(value) is int and value == 1):
            signature[name], constants[(index,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]       # PyTorch allocations are aligned
        elif type(value) is int:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif type(value) is bool:
            signature[name] = "i1"
        else:
            signature[name] = "fp32"
    return signature, constants, attrs


def resources(kernel, arguments, options: dict, capability: int = 90) -> dict:
    """Compile for sm_``capability`` and read the cubin's resource usage."""
    constexprs = {k: v for k, v in options.items() if k not in OPTIONS}
    signature, constants, attrs = specialize(kernel, arguments, constexprs)
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs),
                              target=GPUTarget("cuda", capability, 32),
                              options={k: options[k] for k in OPTIONS if k in options})
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"flashtrain-{kernel.fn.__name__}-{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", cubin], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([tools / "cuobjdump", "-sass", cubin], check=True, capture_output=True,
                              text=True).stdout
    finally:
        cubin.unlink(missing_ok=True)
    fields = dict(part.split(":") for line in usage.splitlines() if "REG:" in line for part in line.split())
    return {"kernel": kernel.fn.__name__, "registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
            "shared_bytes": compiled.metadata.shared, "sass_instructions": sass.count(" ;"),
            **{k: options[k] for k in OPTIONS if k in options}}


def pass_arguments(args) -> tuple:
    """(kernel, runtime arguments, constexprs and options) of one pass, from the library's own
    launch configuration, on meta tensors (shapes and strides only)."""
    shape = (args.batch, args.seqlen, args.heads, args.head_dim)
    q, k, v, out, grad_out, dq, dk, dv = (torch.empty(shape, dtype=torch.bfloat16, device="meta")
                                          for _ in range(8))
    lse = torch.empty(args.batch, args.heads, args.seqlen, dtype=torch.float32, device="meta")
    geometry = call_geometry(q, k, None, 0)
    scale = args.head_dim ** -0.5
    block_m, block_n, warps, stages = args.tiles
    tiles = Tiles(block_m, block_n, warps, stages, fused=args.fused)
    seed = torch.empty(1, dtype=torch.int64, device="meta") if args.seed_in_memory else kernel_seed(1234)
    counter_base = kernel_counter_base(0 if args.seed_in_memory else 4 * 12345)
    in_memory = {"SEED_IN_MEMORY": True} if args.seed_in_memory else {}
    if args.pass_ == "forward":
        launcher, _, static, options = _forward.launch_config(q, k, v, out, lse, geometry, scale, args.causal,
                                                              args.dropout, tiles, NO_WINDOW)
        return launcher.kernel, (q, k, v, out, lse, None, seed, counter_base, *static), {**options, **in_memory}
    (dq_launcher, _, dq_static, dq_options), (dkdv_launcher, _, dkdv_static, dkdv_options) = \
        _backward.launch_configs(grad_out, q, k, v, out, lse, dq, dk, dv, geometry, scale, args.causal,
                                 args.dropout, (tiles, tiles), NO_WINDOW)
    delta = torch.empty_like(lse)
    if args.pass_ == "dq":
        return dq_launcher.kernel, (q, k, v, grad_out, out, lse, delta, dq, None, seed, counter_base,
                                    *dq_static), {**dq_options, **in_memory}
    accumulator = torch.empty(shape, dtype=torch.float32, device="meta")
    return dkdv_launcher.kernel, (q, k, v, grad_out, lse, delta, dk, dv, accumulator, None, seed,
                                  counter_base, *dkdv_static), {**dkdv_options, **in_memory}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--pass", dest="pass_", choices=["forward", "dq", "dkdv"], required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--tiles", type=lambda s: tuple(int(x) for x in s.split(",")), default=(64, 64, 4, 3),
                        help="BLOCK_M,BLOCK_N,num_warps,num_stages")
    parser.add_argument("--fused", action="store_true", help="dkdv: the fused pass that adds dQ by atomics")
    parser.add_argument("--seed-in-memory", action="store_true", help="the variant CUDA graphs use")
    args = parser.parse_args(argv)
    if len(args.tiles) != 4:
        parser.error(f"--tiles takes BLOCK_M,BLOCK_N,num_warps,num_stages; got {args.tiles}")
    if args.seed_in_memory and args.dropout == 0:
        parser.error("--seed-in-memory only matters with --dropout > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    kernel, arguments, options = pass_arguments(args)
    report = resources(kernel, arguments, options)
    print(" ".join(f"{key}={value}" for key, value in report.items()))
    return report


if __name__ == "__main__":
    main()
