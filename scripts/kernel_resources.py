"""Registers, spills and shared memory of the attention kernels on sm_90, compiled on this
machine, no GPU needed (Triton ships ptxas and cuobjdump).

    python scripts/kernel_resources.py --pass dkdv --seqlen 4096 --heads 12 --head-dim 64 --causal \
        --dropout 0.1 --tiles 64,64,4,3 --fused [--seed-in-memory]
    python scripts/kernel_resources.py --pass dkdv --head-dim 128 --tiles 32,64,4,4 --gluon --fused

``--gluon`` compiles the pass's Gluon kernel (``_forward_gluon.py``, ``_dq_gluon.py``,
``_dkdv_gluon.py``; stages from the tiles) instead of the portable one; with ``--fused`` the
dK/dV pass is the one that also adds dQ; with ``--pingpong`` (forward) the ping-pong kernel
(``_forward_pingpong.py``: BLOCK_M // 64 consumer warpgroups, ``--head-major`` tile order); with
``--warp-specialized`` (dkdv, fused) the pass of two consumer warpgroups and a producer warp
(``_dkdv_warp_specialized.py``: tiles 64,128,4,STAGES), with ``--persistent`` in its persistent
grid (``_dkdv_ws_persistent.py``; ``--kv-buffers 2``: the next tile's K and V loaded into a
second buffer); its dK and dV leave by TMA as the library's default has them, or with
``--register-grads`` from registers.

Each pass is compiled with the arguments the library itself would launch it with (``launch_config``
of the forward, ``launch_configs`` of the backward), so the constexprs, the integer
specializations (equal to 1, divisible by 16, 32 or 64 bits) and the alignment hints are the ones
a GPU run compiles. A kernel at the 255-register cap, or with stack (spilled) bytes, is a candidate
for smaller tiles or more warps before any GPU time is spent; ``wgmma_serialized`` names ptxas's
reason when it made every warpgroup MMA wait for the one before (the source's overlap then counts
for nothing); ``mma_loop_spills`` counts the spill instructions inside each innermost loop that
holds warpgroup MMAs (the hot loops: stack bytes alone do not say where the spills are);
``exps_under_mma`` counts, per such loop, the exponentials ptxas placed between the wait that
leaves one product outstanding and the wait for all (what of the softmax can run under P.V);
``sass_digest`` is a hash of the SASS instructions without their addresses and encodings, so a
refactor that should not change a kernel can be checked on this machine: the same digest before
and after means the same machine code (v36 removed two options this way). Speed itself is
measured on the GPU.
"""

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError
from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import _backward, _forward  # noqa: E402
from kernels._launch import NO_WINDOW, Tiles, call_geometry  # noqa: E402
from kernels._philox import kernel_counter_base, kernel_seed  # noqa: E402

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.int8: "i8"}
OPTIONS = ("num_warps", "num_stages")
# The most shared memory one block may use on sm_90 (227 KB, opted in): a kernel that needs more
# compiles but does not launch (Triton raises OutOfResources at the launch).
SM90_SHARED_LIMIT = 232448


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
        # do_not_specialize (the dropout seed and counter base): typed, never specialized on value.
        fixed = getattr(param, "do_not_specialize", False)
        if value is None or (type(value) is int and value == 1 and not fixed):
            signature[name], constants[(index,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]       # PyTorch allocations are aligned
        elif type(value) is int:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not fixed:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif type(value) is bool:
            signature[name] = "i1"
        else:
            signature[name] = "fp32"
    return signature, constants, attrs


def compile_for(kernel, arguments, options: dict, capability: int = 90):
    """``kernel`` (a Triton or Gluon JIT function) compiled for sm_``capability`` as a launch with
    ``arguments`` and ``options`` (constexprs, num_warps, num_stages) would compile it."""
    # A Gluon kernel also takes num_warps as a constexpr parameter (its layouts are built from it).
    params = {p.name for p in kernel.params}
    constexprs = {k: v for k, v in options.items() if k not in OPTIONS or k in params}
    signature, constants, attrs = specialize(kernel, arguments, constexprs)
    source = GluonASTSource if isinstance(kernel, GluonJITFunction) else ASTSource
    return triton.compile(source(kernel, signature, constants, attrs),
                          target=GPUTarget("cuda", capability, 32),
                          options={k: options[k] for k in OPTIONS if k in options})


def cuobjdump(compiled, *flags: str) -> str:
    """cuobjdump's output (Triton ships it) for the compiled kernel's cubin."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"flashtrain-{compiled.name}-{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        return subprocess.run([tools / "cuobjdump", *flags, cubin], check=True, capture_output=True,
                              text=True).stdout
    finally:
        cubin.unlink(missing_ok=True)


def usage(compiled) -> dict:
    """ptxas's registers and stack (spilled) bytes per thread, the shared memory, and the SASS
    instruction count of a compiled kernel, read from its cubin."""
    report = cuobjdump(compiled, "--dump-resource-usage")
    sass = cuobjdump(compiled, "-sass")
    fields = dict(part.split(":") for line in report.splitlines() if "REG:" in line for part in line.split())
    reasons = wgmma_serialization(compiled)
    if reasons:
        print(f"kernel_resources: ptxas serialized {compiled.name}'s warpgroup MMAs: "
              + "; ".join(reasons), file=sys.stderr)
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
            "shared_bytes": compiled.metadata.shared, "sass_instructions": sass.count(" ;"),
            "wgmma_serialized": "yes" if reasons else "no",
            "mma_loop_spills": ",".join(map(str, mma_loop_spills(sass))) or "-",
            "exps_under_mma": ",".join(map(str, exps_under_mma(sass))) or "-",
            "sass_digest": sass_digest(sass)}


def sass_digest(sass: str) -> str:
    """12 hex digits of a SHA-1 of the SASS instructions in order, without their addresses and
    encodings (cuobjdump's ``/*0010*/`` and ``/* 0x... */``): equal digests, the same code."""
    instructions = [re.sub(r"/\*.*?\*/", "", line).strip() for line in sass.splitlines()
                    if re.match(r"\s*/\*[0-9a-f]+\*/", line)]
    return hashlib.sha1("\n".join(instructions).encode()).hexdigest()[:12]


def mma_loop_spills(sass: str) -> list[int]:
    """Spill instructions (local-memory loads and stores) in each innermost loop of the SASS that
    holds warpgroup MMAs, in code order: stack bytes alone do not say whether the spills sit in
    the hot loop or in a prologue (a loop is a branch back to an earlier address)."""
    return [sum(bool(re.search(r"\b(?:STL|LDL)\b", text)) for text in loop)
            for loop in mma_loops(sass)]


def exps_under_mma(sass: str) -> list[int]:
    """Per innermost MMA loop, the exponentials (MUFU.EX2) issued between a wait that leaves one
    product outstanding (``WARPGROUP.DEPBAR.LE gsb0, 0x1``) and the next wait for all of them
    (``0x0``): the softmax work that can run under the outstanding product (the forwards' P.V).
    0 means ptxas placed the second wait before the exponentials, whatever the source's order
    (attention_notes v41); loops without such a pair are left out."""
    counts = []
    for loop in mma_loops(sass):
        waiting = None
        for text in loop:
            if "WARPGROUP.DEPBAR.LE" in text and re.search(r"gsb0,\s*0x1\b", text):
                waiting = 0
            elif "WARPGROUP.DEPBAR.LE" in text and waiting is not None:
                counts.append(waiting)
                waiting = None
            elif waiting is not None and "MUFU.EX2" in text:
                waiting += 1
    return counts


def mma_loops(sass: str) -> list[list[str]]:
    """The instructions of each innermost SASS loop that holds warpgroup MMAs, in code order."""
    lines = [(int(match.group(1), 16), text) for text in sass.splitlines()
             if (match := re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*)", text))]
    loops = []
    for address, text in lines:
        target = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) <= address:
            loops.append((int(target.group(1), 16), address))
    inside = lambda loop, key: [text for address, text in lines if loop[0] <= address <= loop[1]
                                and key(text)]
    # A backward branch over an EXIT or a register reallocation is control flow between the
    # warp-specialized partitions, not a loop.
    with_mma = [loop for loop in loops if inside(loop, lambda text: "HGMMA" in text)
                and not inside(loop, lambda text: re.search(r"\b(?:EXIT|USETMAXREG)\b", text))]
    innermost = [loop for loop in with_mma if not any(
        other != loop and loop[0] <= other[0] and other[1] <= loop[1] for other in with_mma)]
    return [inside(loop, lambda text: True) for loop in sorted(set(innermost))]


def wgmma_serialization(compiled) -> list[str]:
    """ptxas's reasons for serializing the kernel's warpgroup MMAs, if it did (its "Potential
    Performance Loss" notes): then each product is waited for as it is issued, whatever overlap
    the source asks for, and nothing else in the compiler's output says so. Empty for kernels
    without warpgroup MMAs or before sm_90."""
    ptx = compiled.asm.get("ptx", "")
    if "wgmma.mma_async" not in ptx:
        return []
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        notes = subprocess.run([tools / "ptxas", "--gpu-name", target, "-v", source, "-o",
                                Path(folder) / "kernel.cubin"], check=True, capture_output=True,
                               text=True)
    return serialization_reasons(notes.stdout + notes.stderr)


def serialization_reasons(ptxas_log: str) -> list[str]:
    """The reasons in ptxas's -v output for serializing warpgroup MMAs (C7509-C7520 notes)."""
    return [" ".join(reason.split()) for reason in re.findall(
        r"wgmma\.mma_async instructions are serialized due to (.+?) (?:in|for) the function", ptxas_log)]


def resources(kernel, arguments, options: dict, capability: int = 90) -> dict:
    """Compile for sm_``capability`` and read the cubin's resource usage."""
    compiled = compile_for(kernel, arguments, options, capability)
    return {"kernel": kernel.fn.__name__, **usage(compiled),
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
    tiles = Tiles(block_m, block_n, warps, stages, fused=args.fused, gluon=args.gluon,
                  warp_specialized=args.warp_specialized, persistent=args.persistent,
                  kv_buffers=args.kv_buffers, mask_partition=args.mask_partition)
    seed = torch.empty(1, dtype=torch.int64, device="meta") if args.seed_in_memory else kernel_seed(1234)
    counter_base = kernel_counter_base(0 if args.seed_in_memory else 4 * 12345)
    in_memory = {"SEED_IN_MEMORY": True} if args.seed_in_memory else {}
    # The library picks a Gluon kernel only for tensors on an sm_90 GPU; on meta tensors the choice
    # is made here, with the stage option the library would add.
    if args.pass_ == "forward":
        launcher, _, static, options = _forward.launch_config(q, k, v, out, lse, geometry, scale, args.causal,
                                                              args.dropout, tiles, NO_WINDOW)
        if args.gluon:
            launcher, options = _forward.FORWARD_GLUON, {**options, "KV_STAGES": stages}
        if args.pingpong:    # the persistent kernel's extra argument: the number of sequences
            launcher, static = _forward.FORWARD_PINGPONG, (*static, args.batch)
            options = {**options, "HEAD_MAJOR": args.head_major}
        return launcher.kernel, (q, k, v, out, lse, None, seed, counter_base, *static), {**options, **in_memory}
    (dq_launcher, _, dq_static, dq_options), (dkdv_launcher, _, dkdv_static, dkdv_options) = \
        _backward.launch_configs(grad_out, q, k, v, out, lse, dq, dk, dv, geometry, scale, args.causal,
                                 args.dropout, (tiles, tiles), NO_WINDOW)
    if args.mask_layout:
        dkdv_options["MASK_LAYOUT"] = args.mask_layout
    delta = torch.empty_like(lse)
    if args.pass_ == "dq":
        if args.gluon and not args.fused:       # the fused backward's delta-only pass is portable
            dq_launcher, dq_options = _backward.DQ_GLUON, {**dq_options, "STAGES": stages}
        return dq_launcher.kernel, (q, k, v, grad_out, out, lse, delta, dq, None, seed, counter_base,
                                    *dq_static), {**dq_options, **in_memory}
    if args.gluon:
        launcher = _backward.DKDV_WARP_SPECIALIZED if args.warp_specialized else _backward.DKDV_GLUON
        dkdv_launcher, dkdv_options = launcher, {**dkdv_options, "STAGES": stages}
        if args.persistent:     # the persistent kernel's extra argument: the number of sequences
            dkdv_launcher, dkdv_static = _backward.DKDV_WS_PERSISTENT, (*dkdv_static, args.batch)
            dkdv_options["KV_BUFFERS"] = args.kv_buffers
        if args.mask_partition and args.dropout:
            dkdv_options["MASK_PARTITION"] = True
        # dK and dV by TMA where the library would store them so (its check of the tensors
        # needs them on the GPU; these meta tensors are contiguous).
        if (args.warp_specialized and not args.register_grads
                and _backward.key_gradient_staging_fits(dkdv_options)):
            dkdv_options["TMA_GRADS"] = True
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
    parser.add_argument("--fused", action="store_true", help="dkdv: the fused pass that also adds dQ into a float32 sum")
    parser.add_argument("--gluon", action="store_true", help="the pass's Gluon kernel for sm_90")
    parser.add_argument("--pingpong", action="store_true",
                        help="forward: the ping-pong Gluon kernel (BLOCK_M // 64 consumer warpgroups)")
    parser.add_argument("--head-major", action="store_true", help="with --pingpong: its tiles head by head")
    parser.add_argument("--warp-specialized", action="store_true",
                        help="dkdv with --gluon --fused: two consumer warpgroups and a producer warp")
    parser.add_argument("--persistent", action="store_true",
                        help="with --warp-specialized: that pass in a persistent grid")
    parser.add_argument("--kv-buffers", type=int, choices=[1, 2], default=1,
                        help="with --persistent: buffers of a tile's K and V")
    parser.add_argument("--register-grads", action="store_true",
                        help="with --warp-specialized: dK and dV stored from registers, not by TMA")
    parser.add_argument("--mask-partition", action="store_true",
                        help="with --warp-specialized and --dropout: the keep-masks from warps of their own")
    parser.add_argument("--mask-layout", choices=["untransposed", "broadcast"],
                        help="dkdv with dropout: how the transposed tile gets its keep-mask "
                             "(default: the library's choice for the tiles)")
    parser.add_argument("--seed-in-memory", action="store_true", help="the variant CUDA graphs use")
    args = parser.parse_args(argv)
    if len(args.tiles) != 4:
        parser.error(f"--tiles takes BLOCK_M,BLOCK_N,num_warps,num_stages; got {args.tiles}")
    if (args.pingpong or args.head_major) and not (args.pass_ == "forward" and args.gluon):
        parser.error("--pingpong and --head-major are options of the forward's Gluon kernel (--gluon)")
    if args.warp_specialized and not (args.pass_ == "dkdv" and args.gluon and args.fused):
        parser.error("--warp-specialized is an option of the fused Gluon dK/dV pass (--gluon --fused)")
    if args.warp_specialized and (args.tiles[:3] != (64, 128, 4) or args.tiles[3] < 2):
        parser.error(f"--warp-specialized takes tiles 64,128,4,STAGES; got {args.tiles}")
    if args.persistent and not args.warp_specialized:
        parser.error("--persistent is an option of the warp-specialized pass (--warp-specialized)")
    if args.kv_buffers != 1 and not args.persistent:
        parser.error("--kv-buffers is an option of the persistent pass (--persistent)")
    if args.register_grads and not args.warp_specialized:
        parser.error("--register-grads is an option of the warp-specialized pass (--warp-specialized)")
    if args.mask_partition and not (args.warp_specialized and args.dropout):
        parser.error("--mask-partition is an option of the warp-specialized pass with --dropout")
    if args.seed_in_memory and args.dropout == 0:
        parser.error("--seed-in-memory only matters with --dropout > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    kernel, arguments, options = pass_arguments(args)
    try:
        report = resources(kernel, arguments, options)
    except (CompilationError, OutOfResources, PTXASError) as error:
        # One line, not the compiler's traceback: which kernel, which options, what failed.
        sys.exit(f"kernel_resources: {kernel.fn.__name__} does not compile for sm_90 with {options}: "
                 f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}")
    if report["shared_bytes"] > SM90_SHARED_LIMIT:
        print(f"kernel_resources: {report['kernel']} needs {report['shared_bytes']} bytes of shared "
              f"memory; sm_90 gives a block at most {SM90_SHARED_LIMIT}: it would not launch",
              file=sys.stderr)
    print(" ".join(f"{key}={value}" for key, value in report.items()))
    return report


if __name__ == "__main__":
    main()
