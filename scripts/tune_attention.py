"""Sweep tile sizes, warps and pipeline stages of the three attention kernels on this GPU,
and on sm_90+ the TMA, Gluon and ping-pong forwards and the Gluon dQ and dK/dV passes (marked
``tma``, ``gluon``, ``pingpong``) against them. A candidate of
theirs that does not compile or does not apply (the portable kernel would run in its place) is
recorded as an error, not timed.

    python scripts/tune_attention.py --head-dims 64 128 --out tune.json

Times each candidate with the FlashAttention-2 benchmark shape (16384 tokens, hidden 2048) and
prints the fastest per kernel, head dim and mask; the chosen values go into ``kernels/_tile_rules.py``.
Candidates that do not compile (e.g. too much shared memory), or whose output or gradients
disagree with the tuned tiles' on the same inputs, are recorded as such, not timed.
"""

import argparse
import dataclasses
import json
import math
import sys
import warnings
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import _backward, _forward, _hopper  # noqa: E402
from kernels._launch import Geometry, Tiles  # noqa: E402
from kernels._tile_rules import dkdv_tiles, dq_tiles, forward_tiles  # noqa: E402
from kernels._philox import device_seed  # noqa: E402
from training_shape_studies import finish_study, training_study  # noqa: E402  (scripts/ is on sys.path)

FORWARD = [Tiles(*t) for t in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2),
                               (128, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3),
                               (128, 64, 4, 4)]] + [
    # The TMA forward (_forward_tma.py; sm_90+, fp16/bf16, padded input; elsewhere the portable
    # kernel runs at the same tiles).
    Tiles(*t, tma=True) for t in [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2), (128, 128, 8, 2),
                                  (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3)]] + [
    # The Gluon forward (_forward_gluon.py; sm_90, no band or dropout); num_stages = K/V stages.
    Tiles(*t, gluon=True) for t in [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3),
                                    (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 4)]] + [
    # The ping-pong forward (_forward_pingpong.py; sm_90, no band or dropout): block_m / 64
    # consumer warpgroups; num_stages = K/V stages; each tile order (head by head or query block
    # by query block), which moved it by up to 30 % (attention_notes v18).
    Tiles(*t, gluon=True, pingpong=True, head_major=head_major)
    for t in [(128, 64, 4, 3), (128, 128, 4, 2), (128, 128, 4, 3), (192, 64, 4, 3), (192, 128, 4, 2),
              (192, 128, 4, 3)]
    for head_major in (False, True)]
DKDV = [Tiles(*t) for t in [(32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3),
                            (32, 64, 4, 3), (64, 128, 4, 2), (16, 128, 4, 3), (32, 128, 4, 2),
                            (16, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 3), (128, 64, 8, 2),
                            (128, 64, 8, 1), (64, 64, 8, 2),
                            # 8 warps: under the 255-register cap that 64x64x4 hits (attention_notes
                            # v12), yet about half its speed at head dim 64 (v13); not yet timed at 128
                            (64, 64, 8, 3)]] + [
    # The Gluon dK/dV (_dkdv_gluon.py; sm_90, no band, no GQA); num_stages = Q/dO
    # stages (3 or more). Tiles that spilled registers at head dim 128 when compiled for sm_90
    # (64-query tiles) are left out there by the sweep's own timing, not here.
    Tiles(*t, gluon=True) for t in [(32, 128, 8, 3), (32, 128, 8, 4), (32, 64, 4, 3), (32, 64, 4, 4),
                                    (64, 128, 8, 3), (64, 64, 4, 3)]] + [
    # The fused backward (_backward_kernels.py): this pass also adds dQ by atomic adds, the dQ pass only
    # computes delta; its dQ tiles are then those of that delta pass.
    Tiles(*t, fused=True) for t in [(64, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 1),
                                    (64, 64, 8, 2), (32, 64, 4, 3), (64, 32, 4, 3), (32, 128, 4, 3),
                                    (64, 64, 8, 3)]] + [
    # The Gluon fused pass (_dkdv_gluon.py with ACCUMULATE_DQ; dQ by TMA reduce-add): 8 warps need
    # head dim 128 (at 64 they are recorded as not compiling). 64-query tiles take their blocks in
    # turn (_dkdv_gluon_steps.py; 2 stages suffice there).
    Tiles(*t, gluon=True, fused=True) for t in [(32, 64, 4, 3), (32, 64, 4, 4), (32, 128, 8, 3),
                                                (32, 128, 8, 4), (64, 64, 4, 2), (64, 64, 4, 3),
                                                (64, 64, 4, 4), (64, 128, 8, 2)]] + [
    # The warp-specialized fused pass (_dkdv_warp_specialized.py; sm_90, no window or GQA):
    # two consumer warpgroups of 64 keys, 64-query blocks; num_stages = Q/dO stages (3 or more do
    # not fit shared memory at head dim 128; 4 is the default at 64), one program per key block or
    # in a persistent grid (_dkdv_ws_persistent.py; q, k, v and dO rows of one matrix), there with
    # one or two K/V buffers (two fit shared memory at head dim 64 only; at 128 they are recorded
    # as not compiling).
    Tiles(64, 128, 4, stages, gluon=True, fused=True, warp_specialized=True, persistent=persistent,
          kv_buffers=kv_buffers)
    for persistent, kv_buffers in ((False, 1), (True, 1), (True, 2)) for stages in (2, 3, 4)]
DQ = [Tiles(*t) for t in [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3),
                          (64, 32, 4, 3), (128, 64, 4, 2), (64, 128, 4, 2), (32, 64, 4, 3),
                          (32, 128, 4, 3), (64, 64, 8, 3)]] + [
    # The Gluon dQ (_dq_gluon.py; sm_90, no band); num_stages = K/V stages (3 or more).
    Tiles(*t, gluon=True) for t in [(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (64, 32, 4, 3),
                                    (128, 32, 4, 3), (128, 128, 8, 3)]]


# Two tilings of the same call differ by bf16 rounding (each is ~2.5e-3 from float32, so at most
# ~5e-3 apart); a miscompiled kernel by more: 0.4-0.7 for the warp-specialized Hopper kernels
# (attention_notes.md v7), but only 1.2e-2 for the untransposed dropout dK/dV at 16 x 128 without a
# mask (v13), which an earlier bound of 2e-2 let through.
AGREEMENT = 8e-3


def relative_difference(result, reference) -> float:
    """Largest relative (Frobenius) difference between corresponding tensors of two results; NaN
    if any is NaN (Python's max would skip it)."""
    differences = [((a.float() - b.float()).norm() / b.float().norm()).item()
                   for a, b in zip(result, reference)]
    return math.nan if any(map(math.isnan, differences)) else max(differences)


def measure(fn, reference=None):
    """Median milliseconds of ``fn``, or why it has none: it did not compile, or its tensors differ
    from ``reference`` (the tuned tiles' result on the same inputs) by more than ``AGREEMENT``, so
    a fast but wrong candidate is never chosen. Without a reference the result is not checked."""
    fallbacks = len(_hopper.FALLBACKS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = fn()
        torch.cuda.synchronize()
        if len(_hopper.FALLBACKS) > fallbacks:     # the portable kernel ran in its place
            return "the Hopper kernel did not compile for these tiles"
        difference = 0.0 if reference is None else relative_difference(result, reference)
        if not difference <= AGREEMENT:            # NaN counts as wrong
            return f"wrong result: differs from the tuned tiles' by {difference:.2g} (relative)"
        return do_bench(fn, warmup=10, rep=40, return_mode="median")
    except Exception as error:  # noqa: BLE001 - a candidate that cannot run is a result, not a crash
        return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"


KINDS = ("tma", "gluon", "pingpong", "fused", "gluon-fused", "warp-specialized")


def kind(tiles) -> str | None:
    """Which special kernel the tiles choose (None: the portable two-pass kernel)."""
    if tiles.pingpong:
        return "pingpong"
    if tiles.warp_specialized:
        return "warp-specialized"
    if tiles.gluon and tiles.fused:
        return "gluon-fused"
    return next((name for name in ("tma", "gluon", "fused") if getattr(tiles, name)), None)


def hopper_candidates(candidates, default, kinds=KINDS, portable=None):
    """The tuned tiles, the same tiles as the portable two-pass kernel (where the default is itself a
    TMA, Gluon or fused choice, so that the comparison it rests on is repeated in every run), the
    ``portable`` tiles (those the calls a special kernel does not take run; the default before it,
    where it is one), and the candidates of the special kernels in ``kinds``: without sweeping every
    portable tile again."""
    plain = dataclasses.replace(default, tma=False, gluon=False, fused=False, pingpong=False,
                                head_major=False, warp_specialized=False, persistent=False,
                                kv_buffers=1)
    baseline = [default] + [t for t in dict.fromkeys((plain, portable))
                            if t is not None and t != default]
    return baseline + [t for t in candidates if kind(t) in kinds and t not in baseline]


def sweep(head_dim, seqlen, causal, dropout_p, dtype, kernels=("forward", "dkdv", "dq"),
          hopper_only=False, kinds=KINDS):
    heads = 2048 // head_dim
    batch = 16384 // seqlen
    shape = (batch, seqlen, heads, head_dim)
    q, k, v, grad_out = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(4))
    geometry = Geometry(batch, heads, heads, seqlen, seqlen, head_dim, varlen=False)
    scale = 1 / math.sqrt(head_dim)
    args = dict(geometry=geometry, softmax_scale=scale, causal=causal, dropout_p=dropout_p,
                seed=1, offset=0)
    flops = 4 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
    out, lse = _forward.forward(q, k, v, None, tiles=forward_tiles(head_dim, q.device, dtype), **args)
    default_dq = dq_tiles(head_dim, q.device, dtype, dropout_p > 0)
    default_dkdv = dkdv_tiles(head_dim, q.device, dtype, causal, dropout_p > 0, seqlen=seqlen)
    grads = _backward.backward(grad_out, q, k, v, out, lse, None, **args)
    forward = (hopper_candidates(FORWARD, forward_tiles(head_dim, q.device, dtype), kinds) if hopper_only
               else FORWARD)
    rows = []
    for tiles in forward if "forward" in kernels else []:
        chosen = _forward.launch_config(q, k, v, *_forward.new_outputs(q, geometry), geometry, scale,
                                        causal, dropout_p, tiles)[0]
        if (tiles.tma or tiles.gluon) and chosen is _forward.FORWARD:
            rows.append(("forward", tiles, "the Hopper kernel does not take this call", flops))
            continue
        ms = measure(lambda: _forward.forward(q, k, v, None, tiles=tiles, **args)[:1], (out,))
        rows.append(("forward", tiles, ms, flops))
    # Each backward pass is timed as the whole backward with the other pass at its tuned tiles.
    def backward_row(name, tiles, pair, index, portable):
        chosen = _backward.launch_configs(grad_out, q, k, v, out, lse, *grads, geometry, scale,
                                          causal, dropout_p, pair)[index][0]
        if tiles.gluon and chosen is portable:
            return name, tiles, "the Hopper kernel does not take this call", 2.5 * flops
        ms = measure(lambda: _backward.backward(grad_out, q, k, v, out, lse, None, tiles=pair,
                                                **args), grads)
        return name, tiles, ms, 2.5 * flops
    portable_dkdv = dkdv_tiles(head_dim, q.device, dtype, causal, dropout_p > 0, hopper=False,
                               seqlen=seqlen)
    dkdv = hopper_candidates(DKDV, default_dkdv, kinds, portable_dkdv) if hopper_only else DKDV
    dq = hopper_candidates(DQ, default_dq, kinds) if hopper_only else DQ
    rows += [backward_row("dkdv(+fixed dq)", t, (t, default_dq), 1, _backward.DKDV)
             for t in (dkdv if "dkdv" in kernels else [])]
    rows += [backward_row("dq(+fixed dkdv)", t, (default_dkdv, t), 0, _backward.DQ)
             for t in (dq if "dq" in kernels else [])]
    return [dict(kernel=kernel, head_dim=head_dim, seqlen=seqlen, causal=causal, dropout_p=dropout_p,
                 block_m=t.block_m, block_n=t.block_n, num_warps=t.num_warps,
                 num_stages=t.num_stages, tma=t.tma, gluon=t.gluon, fused=t.fused,
                 pingpong=t.pingpong, head_major=t.head_major, warp_specialized=t.warp_specialized,
                 persistent=t.persistent, kv_buffers=t.kv_buffers,
                 ms=ms if isinstance(ms, float) else None,
                 tflops=flops_ / ms / 1e9 if isinstance(ms, float) else None,
                 error=None if isinstance(ms, float) else ms)
            for kernel, t, ms, flops_ in rows]


def rounds_study(head_dim, seqlen, dtype=torch.bfloat16):
    """Time forward and backward with dropout as the Philox rounds and the dK/dV mask layout vary:
    0 rounds leaves every cost of dropout except the generator itself (its masks are not random:
    diagnosis only)."""
    heads, batch = 2048 // head_dim, 16384 // seqlen
    shape = (batch, seqlen, heads, head_dim)
    q, k, v, grad_out = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(4))
    geometry = Geometry(batch, heads, heads, seqlen, seqlen, head_dim, varlen=False)
    flops = 4 * batch * heads * seqlen * seqlen * head_dim
    chosen = _backward.DKDV_MASK_LAYOUT
    settings = [(0.0, 7, chosen)] + [(0.1, 7, layout) for layout in
                                     ("untransposed", "broadcast")] + [(0.1, 0, chosen)]
    for dropout_p, rounds, layout in settings:
        _forward.PHILOX_ROUNDS = _backward.PHILOX_ROUNDS = rounds
        _backward.DKDV_MASK_LAYOUT = layout
        args = dict(geometry=geometry, softmax_scale=head_dim ** -0.5, causal=False,
                    dropout_p=dropout_p, seed=1, offset=0)
        out, lse = _forward.forward(q, k, v, None, **args)
        fwd = measure(lambda: _forward.forward(q, k, v, None, **args))
        bwd = measure(lambda: _backward.backward(grad_out, q, k, v, out, lse, None, **args))
        print(f"d={head_dim} N={seqlen} p={dropout_p} rounds={rounds} dK/dV mask {layout}: "
              f"forward {flops / fwd / 1e9:.0f} TF/s, backward {2.5 * flops / bwd / 1e9:.0f} TF/s",
              flush=True)
    _forward.PHILOX_ROUNDS = _backward.PHILOX_ROUNDS = 7
    _backward.DKDV_MASK_LAYOUT = chosen


def seed_study(head_dim, seqlen, dtype=torch.bfloat16, rounds=3):
    """Time the default backward (causal, dropout 0.1) of GPT-2 small's attention (hidden 768,
    16384 tokens) with a host seed and with a seed drawn on the device (the variant CUDA graphs
    run, which reads it from memory), alternated ``rounds`` times in this process."""
    heads, batch = 768 // head_dim, 16384 // seqlen
    shape = (batch, seqlen, heads, head_dim)
    q, k, v, grad_out = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(4))
    geometry = Geometry(batch, heads, heads, seqlen, seqlen, head_dim, varlen=False)
    for _ in range(rounds):
        for name, seed in (("host", 5), ("device", device_seed(q.device))):
            args = dict(geometry=geometry, softmax_scale=head_dim ** -0.5, causal=True,
                        dropout_p=0.1, seed=seed, offset=0)
            out, lse = _forward.forward(q, k, v, None, **args)
            bwd = do_bench(lambda: _backward.backward(grad_out, q, k, v, out, lse, None, **args),
                           warmup=25, rep=200, return_mode="median")
            print(f"d={head_dim} N={seqlen} {batch}x{heads} heads, {name} seed: backward "
                  f"{bwd:.3f} ms", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0])
    parser.add_argument("--kernels", nargs="+", choices=["forward", "dkdv", "dq"],
                        default=["forward", "dkdv", "dq"], help="which kernels to sweep")
    parser.add_argument("--causal", nargs="+", type=int, choices=[0, 1], default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("tune.json"))
    parser.add_argument("--hopper-only", action="store_true",
                        help="time only the TMA, Gluon, ping-pong and fused candidates (forward, dK/dV, dQ) "
                             "against the tuned tiles")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                        help="with --hopper-only: which special kernels' candidates to time")
    parser.add_argument("--rounds-study", action="store_true",
                        help="only time dropout against the number of Philox rounds")
    parser.add_argument("--seed-study", action="store_true",
                        help="only time the backward with a host seed against a device seed")
    parser.add_argument("--training-study", type=int, metavar="HEADS",
                        help="only time the causal backward's candidates at GPT-2's training shapes "
                             "(16K tokens, this many heads; --head-dims, --dropout) into --out")
    parser.add_argument("--finish-study", action="store_true",
                        help="only time the fused backward's dQ finishing step, torch.mul against "
                             "its Triton kernel, at GPT-2's training shapes, into --out")
    args = parser.parse_args()
    if args.finish_study:
        records = finish_study()
        args.out.with_suffix(".tmp").write_text(json.dumps(records, indent=1))
        args.out.with_suffix(".tmp").replace(args.out)
        return
    if args.training_study:
        records = [record for head_dim in args.head_dims for dropout_p in args.dropout
                   for record in training_study(head_dim, args.training_study, dropout_p)]
        args.out.with_suffix(".tmp").write_text(json.dumps(records, indent=1))
        args.out.with_suffix(".tmp").replace(args.out)
        return
    if args.rounds_study or args.seed_study:
        for head_dim in args.head_dims:
            (rounds_study if args.rounds_study else seed_study)(head_dim, args.seqlen)
        return
    records = []
    for head_dim in args.head_dims:
        for causal in map(bool, args.causal):
            for dropout_p in args.dropout:
                found = sweep(head_dim, args.seqlen, causal, dropout_p, torch.bfloat16, args.kernels,
                              args.hopper_only, args.kinds)
                records += found
                # Written after every setting, so that a sweep cut short keeps what it measured.
                args.out.with_suffix(".tmp").write_text(json.dumps(records, indent=1))
                args.out.with_suffix(".tmp").replace(args.out)
                for kernel in ("forward", "dkdv(+fixed dq)", "dq(+fixed dkdv)"):
                    ok = [r for r in found if r["kernel"] == kernel and r["ms"]]
                    ok.sort(key=lambda r: r["ms"])
                    print(f"d={head_dim} causal={causal} p={dropout_p} {kernel:>16}: " + "  ".join(
                        f"({r['block_m']},{r['block_n']},{r['num_warps']},{r['num_stages']}"
                        f"{',tma' if r['tma'] else ''}{',gluon' if r['gluon'] else ''}"
                        f"{',fused' if r.get('fused') else ''}"
                        f"{',pingpong' if r.get('pingpong') else ''}"
                        f"{',head-major' if r.get('head_major') else ''}"
                        f"{',warp-specialized' if r.get('warp_specialized') else ''}"
                        f"{',persistent' if r.get('persistent') else ''}) "
                        f"{r['tflops']:.0f}" for r in ok[:4]), flush=True)


if __name__ == "__main__":
    main()
