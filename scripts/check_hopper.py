"""Check the Hopper kernels (``kernels/_*_hopper.py``) on this GPU, with and without warp
specialization, against a float32 reference and against the portable kernels; then time them.

    python scripts/check_hopper.py --out hopper_check.json

Each Hopper kernel is built twice: as written (TMA loads and a ``warp_specialize`` key or query
loop) and with the loop's ``warp_specialize`` switched off (TMA loads only, the same code
otherwise), so that a wrong result can be traced to Triton's warp-specialization pass or to the
kernel itself. Errors are relative to the float32 reference (``|x - ref| / |ref|``, Frobenius),
next to the portable kernels' error on the same inputs. Needs sm_90 or later.
"""

import argparse
import importlib
import json
import math
import sys
import warnings
from pathlib import Path

import torch
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import _backward, _forward, _hopper  # noqa: E402
from kernels._direct_launch import DirectLauncher  # noqa: E402
from kernels._launch import Geometry, Tiles  # noqa: E402

HOPPER_MODULES = {"forward": ("_forward_hopper", "_forward_hopper_kernel", _forward, "FORWARD_HOPPER"),
                  "dq": ("_dq_hopper", "_dq_hopper_kernel", _backward, "DQ_HOPPER"),
                  "dkdv": ("_dkdv_hopper", "_dkdv_hopper_kernel", _backward, "DKDV_HOPPER")}


def without_warp_specialization(module_name: str, kernel_name: str):
    """The kernel of ``kernels/<module_name>.py`` rebuilt with ``warp_specialize=False``: a copy of
    the module next to it (relative imports keep working), imported under another name."""
    source = (ROOT / "kernels" / f"{module_name}.py").read_text()
    assert "warp_specialize=True" in source, module_name
    copy = ROOT / "kernels" / f"_{module_name.strip('_')}_no_ws_check.py"
    copy.write_text(source.replace("warp_specialize=True", "warp_specialize=False"))
    try:
        module = importlib.import_module(f"kernels.{copy.stem}")
        return getattr(module, kernel_name)
    finally:
        copy.unlink()


def use_kernels(variant: str, kernels: dict):
    for name, (_, _, owner, attribute) in HOPPER_MODULES.items():
        setattr(owner, attribute, kernels[variant][name])
    _hopper.FALLBACKS.clear()     # both variants share kernel names: a fallback of one is not the other's


def reference(q, k, v, grad_out, causal):
    """float32 attention and its gradients, (batch, seqlen, heads, head_dim) layout."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.float())
    return out, *grads


def rel_err(x, ref):
    return ((x.float() - ref).norm() / ref.norm()).item()


def run_once(q, k, v, grad_out, causal, fwd_tiles, bwd_tiles):
    batch, seqlen, heads, head_dim = q.shape
    geometry = Geometry(batch, heads, heads, seqlen, seqlen, head_dim, varlen=False)
    args = dict(geometry=geometry, softmax_scale=head_dim ** -0.5, causal=causal, dropout_p=0.0,
                seed=1, offset=0)
    out, lse = _forward.forward(q, k, v, None, tiles=fwd_tiles, **args)
    grads = _backward.backward(grad_out, q, k, v, out, lse, None, tiles=bwd_tiles, **args)
    fwd = lambda: _forward.forward(q, k, v, None, tiles=fwd_tiles, **args)
    bwd = lambda: _backward.backward(grad_out, q, k, v, out, lse, None, tiles=bwd_tiles, **args)
    return (out, *grads), fwd, bwd


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("hopper_check.json"))
    parser.add_argument("--time-seqlen", type=int, default=4096)
    parser.add_argument("--time-head-dims", type=int, nargs="+", default=[128])
    parser.add_argument("--time-only", action="store_true", help="skip the correctness check")
    parser.add_argument("--time-variants", nargs="+", choices=["ws", "no_ws"], default=["ws", "no_ws"])
    parser.add_argument("--time-backward", action="store_true",
                        help="time the Hopper backward kernels too (forward only otherwise)")
    args = parser.parse_args()
    assert torch.cuda.get_device_capability() >= (9, 0), "the Hopper kernels need sm_90 or later"
    kernels = {"ws": {name: getattr(owner, attribute)
                      for name, (_, _, owner, attribute) in HOPPER_MODULES.items()},
               "no_ws": {name: DirectLauncher(without_warp_specialization(module, kernel))
                         for name, (module, kernel, _, _) in HOPPER_MODULES.items()}}
    fwd_tiles = {"ws": Tiles(128, 64, 4, 2, True), "ws64": Tiles(64, 64, 4, 2, True)}
    bwd_tiles = {"ws": (Tiles(64, 128, 4, 2, True), Tiles(64, 128, 4, 2, True))}
    records = []

    def save():
        args.out.with_suffix(".tmp").write_text(json.dumps(records, indent=1))
        args.out.with_suffix(".tmp").replace(args.out)

    torch.manual_seed(0)
    for head_dim in () if args.time_only else (64, 128):
        for seqlen in (1024, 1000):
            for causal in (False, True):
                shape = (2, seqlen, 4, head_dim)
                q, k, v, grad_out = (torch.randn(shape, device="cuda", dtype=torch.bfloat16)
                                     for _ in range(4))
                truth = reference(q, k, v, grad_out, causal)
                portable, _, _ = run_once(q, k, v, grad_out, causal, None, None)
                row = dict(head_dim=head_dim, seqlen=seqlen, causal=causal,
                           portable=[rel_err(x, t) for x, t in zip(portable, truth)])
                for variant in ("ws", "no_ws"):
                    use_kernels(variant, kernels)
                    for tiles_name in ("ws", "ws64"):
                        fallbacks = len(_hopper.FALLBACKS)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", RuntimeWarning)
                            got, _, _ = run_once(q, k, v, grad_out, causal, fwd_tiles[tiles_name],
                                                 bwd_tiles["ws"])
                        torch.cuda.synchronize()
                        errors = [rel_err(x, t) for x, t in zip(got, truth)]
                        row[f"{variant}/{tiles_name}"] = errors
                        row[f"{variant}/{tiles_name}/fallbacks"] = len(_hopper.FALLBACKS) - fallbacks
                use_kernels("ws", kernels)
                print(json.dumps(row), flush=True)
                records.append(row)
                save()

    # Speed at the FlashAttention-2 benchmark shape (16384 tokens, hidden 2048).
    seqlen = args.time_seqlen
    for head_dim, causal in ((d, c) for d in args.time_head_dims for c in (False, True)):
        shape = (16384 // seqlen, seqlen, 2048 // head_dim, head_dim)
        q, k, v, grad_out = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        flops = 4 * shape[0] * shape[2] * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
        candidates = [("portable", "ws", None, None)]
        backward = (Tiles(64, 128, 4, 2, True), Tiles(64, 128, 4, 2, True)) if args.time_backward else None
        for variant in args.time_variants:
            candidates += [(f"{variant}/{t.block_m}x{t.block_n}x{t.num_warps}x{t.num_stages}", variant, t,
                            backward)
                           for t in (Tiles(128, 64, 4, 2, True), Tiles(128, 64, 4, 3, True),
                                     Tiles(128, 128, 4, 2, True), Tiles(128, 128, 8, 2, True),
                                     Tiles(128, 64, 8, 3, True), Tiles(64, 64, 4, 3, True),
                                     Tiles(64, 128, 4, 2, True), Tiles(128, 32, 4, 3, True))]
        for name, variant, ft, bt in candidates:
            use_kernels(variant, kernels)
            fallbacks = len(_hopper.FALLBACKS)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    _, fwd, bwd = run_once(q, k, v, grad_out, causal, ft, bt)
                    fwd_ms = do_bench(fwd, warmup=10, rep=50, return_mode="median")
                    bwd_ms = (do_bench(bwd, warmup=10, rep=50, return_mode="median")
                              if bt is not None or ft is None else math.nan)
                row = dict(timing=name, causal=causal, seqlen=seqlen, head_dim=head_dim,
                           forward_tflops=flops / fwd_ms / 1e9, backward_tflops=2.5 * flops / bwd_ms / 1e9,
                           fallbacks=len(_hopper.FALLBACKS) - fallbacks)
            except Exception as error:  # noqa: BLE001 - a candidate that fails is a result
                row = dict(timing=name, causal=causal, error=f"{type(error).__name__}: {error}"[:300])
            print(json.dumps(row), flush=True)
            records.append(row)
            save()
    use_kernels("ws", kernels)


if __name__ == "__main__":
    main()
