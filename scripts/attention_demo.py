"""Run flash_attention against the PyTorch reference on random inputs; on a GPU, time it too.

    python scripts/attention_demo.py            # CPU: Triton interpreter, small sizes, errors only
    python scripts/attention_demo.py --seqlen 8192   # GPU: errors and time vs PyTorch SDPA
"""

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # must precede the first triton import
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import attention_reference, flash_attention  # noqa: E402


def rel_err(value, reference):
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


def errors(dtype, device, batch, seqlen, heads, head_dim, causal):
    shape = (batch, seqlen, heads, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    out = flash_attention(q, k, v, causal=causal)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    # float64 on the CPU, float32 on the GPU (float64 matmuls there are slow and add nothing here).
    exact_dtype = torch.float64 if device == "cpu" else torch.float32
    ref = attention_reference(q, k, v, causal=causal, compute_dtype=exact_dtype)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.to(exact_dtype))
    return [rel_err(a, b) for a, b in zip((out, *grads), (ref, *ref_grads))]


def timings(dtype, batch, seqlen, heads, head_dim, causal):
    from triton.testing import do_bench
    shape = (batch, seqlen, heads, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(shape, device="cuda", dtype=dtype)
    flops = 4 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)

    def ours():
        return flash_attention(q, k, v, causal=causal)

    def sdpa():   # SDPA wants (batch, heads, seqlen, head_dim): a transposed view, no copy
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)

    rows = []
    for name, fn in (("flashtrain", ours), ("torch sdpa", sdpa)):
        forward_ms = do_bench(fn, return_mode="median")
        both_ms = do_bench(lambda: fn().backward(grad_out), return_mode="median",
                           grad_to_none=[q, k, v])
        rows.append((name, forward_ms, flops / forward_ms / 1e9, both_ms, 3.5 * flops / both_ms / 1e9))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--batch", type=int, default=4 if on_gpu else 1)
    parser.add_argument("--seqlen", type=int, default=4096 if on_gpu else 97)
    parser.add_argument("--heads", type=int, default=16 if on_gpu else 2)
    parser.add_argument("--head-dim", type=int, default=128 if on_gpu else 64)
    args = parser.parse_args()
    device = "cuda" if on_gpu else "cpu"
    dtypes = (torch.bfloat16, torch.float16) if on_gpu else (torch.float32, torch.bfloat16)
    sizes = (args.batch, args.seqlen, args.heads, args.head_dim)
    print(f"flash_attention vs reference on {torch.cuda.get_device_name() if on_gpu else 'CPU (Triton interpreter)'}"
          f"; batch={args.batch} seqlen={args.seqlen} heads={args.heads} head_dim={args.head_dim}")
    print(f"{'dtype':>15} {'causal':>6} | relative error:  {'out':>9} {'dq':>9} {'dk':>9} {'dv':>9}")
    for dtype in dtypes:
        for causal in (False, True):
            errs = errors(dtype, device, *sizes, causal)
            print(f"{str(dtype):>15} {causal!s:>6} |                  " + " ".join(f"{e:9.2e}" for e in errs))
    if not on_gpu:
        print("(no GPU: timings skipped; interpreter speed says nothing about the kernel's)")
        return
    print(f"\n{'provider':>12} {'causal':>6} {'fwd ms':>8} {'fwd TF/s':>9} {'fwd+bwd ms':>11} {'TF/s':>6}  (bf16)")
    for causal in (False, True):
        for name, fwd_ms, fwd_tf, both_ms, both_tf in timings(torch.bfloat16, *sizes, causal):
            print(f"{name:>12} {causal!s:>6} {fwd_ms:8.3f} {fwd_tf:9.1f} {both_ms:11.3f} {both_tf:6.1f}")


if __name__ == "__main__":
    main()
