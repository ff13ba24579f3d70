"""A/B of attention tiles: candidate tiles for the forward and the backward, each against the
library's own choice for the call and against cuDNN's (SDPA), in one process, the candidates
interleaved round by round. The tile rules in ``kernels/_tile_rules.py`` rest on such runs.

    python scripts/ab_tiles.py --head-dims 64 --seqlens 512 1024 --causal 0 \\
        --forward pp128=128,128,4,3:gluon,pingpong,head_major \\
        --backward pers1=64,128,4,4:gluon,fused,warp_specialized,persistent --out ab.json

A candidate is NAME=BLOCK_M,BLOCK_N,WARPS,STAGES[:FLAG,...], the flags being ``Tiles`` fields
(``gluon``, ``pingpong``, ``head_major``, ``fused``, ``warp_specialized``, ``persistent``,
``mask_partition``, ``register_grads``, ``tma``)
and ``kv_buffers=N``. Backward candidates set the dK/dV pass's tiles; the dQ pass keeps its
default tiles.

Shapes: the benchmark grid's (``--tokens`` a call, 16384 by default, hidden 2048: batch =
tokens / seqlen, heads = 2048 / head dim unless ``--heads``), separate contiguous (batch, seqlen,
heads, head dim) bf16 tensors. Each round times every candidate once (``do_bench`` median over
``--rep`` ms); a record keeps every round and ``median`` the middle one. The forward's output is
compared with the portable kernel's (``fwd_err``: largest absolute difference), the backward's
gradients likewise (``bwd_err``); a candidate that cannot run the call is recorded in ``failed``
with its error, and ``kernels`` names the forward, dQ and dK/dV kernels each ran (a Hopper
candidate the call does not qualify for runs the portable kernel: its name shows it). Between
processes the same kernel moves by 1-3 %: for a small difference run the script twice and compare
both (``scripts/ab_compare.py``). ``unsteady`` names what ran with its median round more
than 10 % above its fastest (``timing_rounds.py``), and the printed line warns: such a cell's
medians measure a disturbance, not the kernels. Writes the JSON after
every cell (atomically)."""

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_attention import write_json  # noqa: E402  (scripts/ is on sys.path)
from trainer.environment import benchmark_header  # noqa: E402
from ab_compare import changes  # noqa: E402
from timing_rounds import describe, unsteady  # noqa: E402
from kernels import _backward, _forward  # noqa: E402
from kernels._chosen import chosen_kernels  # noqa: E402
from kernels._launch import Tiles, call_geometry  # noqa: E402
from kernels._tile_rules import dq_tiles  # noqa: E402

FLAGS = {field.name for field in dataclasses.fields(Tiles) if field.type in (bool, "bool")}
# The portable kernels' tiles, the reference each candidate's numbers are compared with.
PORTABLE = Tiles(64, 64, 4, 3)


def parse_candidate(spec: str) -> tuple[str, Tiles]:
    """``NAME=BM,BN,WARPS,STAGES[:FLAG,...]`` as (name, tiles); ValueError naming what is wrong."""
    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"candidate {spec!r}: expected NAME=BLOCK_M,BLOCK_N,WARPS,STAGES[:FLAGS]")
    sizes, _, flags = rest.partition(":")
    try:
        numbers = [int(x) for x in sizes.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) != 4:
        raise ValueError(f"candidate {spec!r}: expected four integers BLOCK_M,BLOCK_N,WARPS,STAGES")
    options = {}
    for flag in filter(None, flags.split(",")):
        key, has_value, value = flag.partition("=")
        if key == "kv_buffers" and has_value and value.isdigit():
            options[key] = int(value)
        elif key in FLAGS and not has_value:
            options[key] = True
        else:
            raise ValueError(f"candidate {spec!r}: unknown flag {flag!r}; flags are "
                             f"{', '.join(sorted(FLAGS))} and kv_buffers=N")
    return name, Tiles(*numbers, **options)


def cells(args):
    """(head dim, seqlen, causal, dropout, batch, heads) of every cell asked for."""
    for head_dim in args.head_dims:
        for seqlen in args.seqlens:
            if args.tokens % seqlen:
                raise ValueError(f"--tokens {args.tokens} is not a multiple of seqlen {seqlen}")
            heads = args.heads or 2048 // head_dim
            for causal in map(bool, args.causal):
                for dropout_p in args.dropouts:
                    yield head_dim, seqlen, causal, dropout_p, args.tokens // seqlen, heads


def _max_difference(results, reference) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(results, reference))


def _try(fn, reference, failed, name):
    """``fn``'s largest difference from ``reference``, or None (recorded in ``failed``) if it
    cannot run the call."""
    try:
        return round(_max_difference(fn(), reference), 5)
    except Exception as error:  # noqa: BLE001 - a candidate that cannot run is a result
        failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        return None


def measure_cell(head_dim, seqlen, causal, dropout_p, batch, heads, forward, backward, rounds,
                 rep, cudnn=True, device="cuda", dtype=torch.bfloat16, timer=do_bench):
    """One cell's record: every candidate (and the defaults and cuDNN) timed in ``rounds``
    interleaved rounds. ``device``, ``dtype`` and ``timer`` are for tests on the CPU."""
    torch.manual_seed(0)
    q, k, v, grad_out = (torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype)
                         for _ in range(4))
    geometry = call_geometry(q, k, None, 0)
    call = dict(geometry=geometry, softmax_scale=head_dim ** -0.5, causal=causal,
                dropout_p=dropout_p, seed=1, offset=0)
    forward_of = lambda tiles=None: functools.partial(_forward.forward, q, k, v, None, tiles=tiles,
                                                      **call)
    out, lse = forward_of()()
    dq = dq_tiles(head_dim, q.device, q.dtype, dropout_p > 0)
    backward_of = lambda tiles=None: functools.partial(
        _backward.backward, grad_out, q, k, v, out, lse, None,
        tiles=None if tiles is None else (tiles, dq), **call)
    failed, fwd_err, bwd_err = {}, {}, {}
    reference = forward_of(PORTABLE)()[:1]
    calls = {"forward": forward_of()}
    for name, tiles in forward.items():
        fwd_err[name] = _try(lambda: forward_of(tiles)()[:1], reference, failed, name)
        if fwd_err[name] is not None:
            calls[name] = forward_of(tiles)
    reference = _backward.backward(grad_out, q, k, v, out, lse, None, tiles=(
        dataclasses.replace(PORTABLE, fused=dropout_p > 0), PORTABLE), **call)
    calls["backward"] = backward_of()
    for name, tiles in backward.items():
        bwd_err[name] = _try(lambda: backward_of(tiles)(), reference, failed, name)
        if bwd_err[name] is not None:
            calls[name] = backward_of(tiles)
    if cudnn:
        sdpa_inputs = [t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v)]

        def cudnn_forward():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(
                    *sdpa_inputs, is_causal=causal, dropout_p=dropout_p)
        sdpa_out = cudnn_forward()
        calls["cudnn_forward"] = cudnn_forward
        calls["cudnn_backward"] = lambda: torch.autograd.grad(
            sdpa_out, sdpa_inputs, grad_out.transpose(1, 2), retain_graph=True)
    # Which kernel each ran (after any compile fallback): a candidate the Hopper kernel does not
    # take runs the portable one under its name.
    kernels = {"forward": chosen_kernels(q, k, v, grad_out, causal, dropout_p),
               **{name: chosen_kernels(q, k, v, grad_out, causal, dropout_p, forward_tiles=tiles)
                  for name, tiles in forward.items() if name in calls}}
    kernels["backward"] = kernels["forward"]    # both defaults: the one call's choices
    kernels.update({name: chosen_kernels(q, k, v, grad_out, causal, dropout_p,
                                         backward_tiles=(tiles, dq))
                    for name, tiles in backward.items() if name in calls})
    ms = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            ms[name].append(timer(fn, warmup=25, rep=rep, return_mode="median"))
    return dict(head_dim=head_dim, seqlen=seqlen, batch=batch, heads=heads, causal=causal,
                dropout_p=dropout_p, forward_candidates={n: str(t) for n, t in forward.items()},
                backward_candidates={n: str(t) for n, t in backward.items()}, ms=ms,
                median={name: round(statistics.median(v), 5) for name, v in ms.items()},
                unsteady=unsteady(ms), fwd_err=fwd_err, bwd_err=bwd_err, failed=failed,
                kernels=kernels)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096])
    parser.add_argument("--causal", type=int, nargs="+", choices=[0, 1], default=[0, 1])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0])
    parser.add_argument("--tokens", type=int, default=16384, help="batch x seqlen of every call")
    parser.add_argument("--heads", type=int, help="heads per call (default: 2048 / head dim)")
    parser.add_argument("--forward", nargs="*", default=[], metavar="NAME=TILES",
                        help="forward candidates")
    parser.add_argument("--backward", nargs="*", default=[], metavar="NAME=TILES",
                        help="dK/dV candidates (the dQ pass at its default tiles)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rep", type=int, default=100, help="do_bench milliseconds per timing")
    parser.add_argument("--no-cudnn", action="store_true", help="leave out cuDNN's forward and backward")
    parser.add_argument("--out", type=Path, default=Path("ab_tiles.json"))
    args = parser.parse_args(argv)
    try:
        args.forward = dict(map(parse_candidate, args.forward))
        args.backward = dict(map(parse_candidate, args.backward))
        args.cells = list(cells(args))
    except ValueError as error:
        parser.error(str(error))
    reserved = {"forward", "backward", "cudnn_forward", "cudnn_backward"}
    clash = sorted((set(args.forward) | set(args.backward)) & reserved
                   | set(args.forward) & set(args.backward))
    if clash:
        parser.error(f"candidate names must be unique and not {sorted(reserved)}; got {clash}")
    if any(not 0.0 <= p < 1.0 for p in args.dropouts):
        parser.error(f"--dropouts must be in [0, 1); got {args.dropouts}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("ab_tiles.py measures GPU speed; no CUDA device is visible.")
    started, records = time.time(), []
    for cell in args.cells:
        record = measure_cell(*cell, args.forward, args.backward, args.rounds, args.rep,
                              cudnn=not args.no_cudnn)
        records.append(record)
        complete = len(records) == len(args.cells)
        write_json(args.out, dict(benchmark_header(), seconds=round(time.time() - started),
                                  complete=complete, records=records))
        head_dim, seqlen, causal, dropout_p = cell[:4]
        print(f"[{time.time() - started:5.0f}s] d={head_dim} N={seqlen} causal={causal:d} "
              f"p={dropout_p}: " + summary(record)
              + (f"  failed: {sorted(record['failed'])}" if record["failed"] else ""), flush=True)
        if record["unsteady"]:
            print(f"  unsteady rounds (median against fastest): {describe(record['unsteady'])}; "
                  "this cell's medians measure a disturbance: re-run it", flush=True)


def summary(record: dict) -> str:
    """A cell's medians (ms), each candidate's with its change against the default of its pass
    in the same process, e.g. ``forward 0.1397  s4 0.1368 (-2.1 %)``."""
    change = changes(record)
    return "  ".join(f"{name} {ms:.4f}" + (f" ({change[name]:+.1f} %)" if name in change else "")
                     for name, ms in record["median"].items())


if __name__ == "__main__":
    main()
