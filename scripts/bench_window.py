"""Sliding-window attention on the GPU: time against sequence length at a fixed window.

    python scripts/bench_window.py --out docs/results/window_h100.json

bf16, batch 1, hidden 2048 (head dim 64 -> 32 heads, 128 -> 16 heads), causal, each query sees
itself and the W - 1 keys before it (``window=(W - 1, 0)``). Forward+backward time (the median of a
``triton.testing.do_bench`` run) at seqlen 2K ... 64K for:
  * flashtrain with the window: linear in N if the tiles outside the window are skipped;
  * flashtrain full causal (no window), for contrast (quadratic);
  * FlexAttention with a sliding-window block mask, compiled: PyTorch's own way to run a window
    (SDPA has no window argument; an explicit N x N mask would be quadratic in memory); at head
    dim 64 and --flex-seqlens (each new shape compiles anew).
Each flashtrain window cell up to --check-max tokens is checked against float32 attention (one
head; out, dq, dk, dv): the error must be at most twice PyTorch's own bf16 error plus 2e-3, as in
the tests. The run exits non-zero if a check fails. Writes JSON and a Markdown table beside it.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import attention_reference, flash_attention  # noqa: E402
from trainer.environment import benchmark_header  # noqa: E402

HIDDEN = 2048


def window_flops(seqlen: int, window: int | None, heads: int, head_dim: int) -> float:
    """Forward+backward matmul FLOPs (4·D per visible query-key pair, backward 2.5x the forward)."""
    w = seqlen if window is None else min(window, seqlen)
    pairs = w * seqlen - w * (w - 1) // 2           # row i sees min(i + 1, w) keys
    return 3.5 * 4 * heads * head_dim * pairs


def flashtrain_call(q, k, v, window):
    return lambda: flash_attention(q, k, v, causal=True, window=None if window is None else (window - 1, 0))


_FLEX = {}


def flex_call(q, k, v, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "compiled" not in _FLEX:
        import torch._functorch.config
        torch._functorch.config.donated_buffer = False      # the backward is replayed on one graph
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    seqlen = q.shape[1]
    mask = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < window), None, None, seqlen,
                             seqlen, device="cuda")
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    return lambda: _FLEX["compiled"](qt, kt, vt, block_mask=mask)


def time_forward_backward(make_call, q, k, v, window) -> float:
    """Median ms of one forward+backward (gradients accumulate into the inputs, for every provider)."""
    call = make_call(q, k, v, window)
    grad = torch.randn_like(call())
    return do_bench(lambda: call().backward(grad), warmup=25, rep=200, return_mode="median")


def errors_against_float32(q, k, v, window) -> dict:
    """Relative errors (ours, PyTorch bf16) against float32 on head 0, out and gradients."""
    head = lambda t, dtype: t[:, :, :1].detach().to(dtype).requires_grad_()
    band = (window - 1, 0)
    grad = torch.randn(q.shape[0], q.shape[1], 1, q.shape[3], device="cuda")
    results = {}
    computed = {}
    for name, dtype, fn in (("ours", torch.bfloat16, flash_attention), ("torch", torch.bfloat16, attention_reference),
                            ("exact", torch.float32, attention_reference)):
        q1, k1, v1 = head(q, dtype), head(k, dtype), head(v, dtype)
        out = fn(q1, k1, v1, causal=True, window=band)
        computed[name] = [out.float(), *[g.float() for g in torch.autograd.grad(out, (q1, k1, v1), grad.to(dtype))]]
    for index, part in enumerate(("out", "dq", "dk", "dv")):
        truth = computed["exact"][index]
        error = lambda value: ((value - truth).norm() / truth.norm()).item()
        results[part] = dict(ours=error(computed["ours"][index]), torch=error(computed["torch"][index]))
        results[part]["ok"] = results[part]["ours"] <= 2 * results[part]["torch"] + 2e-3
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--full-max", type=int, default=32768, help="longest full-causal contrast run")
    parser.add_argument("--check-max", type=int, default=8192, help="longest sequence checked against float32")
    parser.add_argument("--flex-seqlens", type=int, nargs="*", default=[8192, 32768],
                        help="where FlexAttention runs (head dim 64); none: no FlexAttention")
    args = parser.parse_args()
    header = dict(benchmark_header(), window=args.window)
    records, failed = [], False
    for head_dim in args.head_dims:
        heads = HIDDEN // head_dim
        for seqlen in args.seqlens:
            q, k, v = (torch.randn(1, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16,
                                   requires_grad=True) for _ in range(3))
            providers = [("flashtrain_window", flashtrain_call, args.window)]
            if seqlen <= args.full_max:
                providers.append(("flashtrain_full_causal", flashtrain_call, None))
            if head_dim == 64 and seqlen in args.flex_seqlens:
                providers.append(("flex_window", flex_call, args.window))
            for name, make_call, window in providers:
                record = dict(provider=name, seqlen=seqlen, head_dim=head_dim, heads=heads, window=window)
                try:
                    ms = time_forward_backward(make_call, q, k, v, window)
                    record.update(ms=ms, tflops=window_flops(seqlen, window, heads, head_dim) / ms / 1e9,
                                  us_per_1k_tokens=ms * 1e3 / (seqlen / 1024))
                except Exception as error:  # noqa: BLE001 - record why a provider could not run
                    record["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
                if name == "flashtrain_window" and seqlen <= args.check_max:
                    record["check"] = errors_against_float32(q, k, v, args.window)
                    failed |= not all(part["ok"] for part in record["check"].values())
                failed |= name == "flashtrain_window" and "error" in record
                print(json.dumps(record), flush=True)
                records.append(record)
                temporary = args.out.with_suffix(".tmp")
                temporary.write_text(json.dumps(dict(header, records=records), indent=1))
                temporary.replace(args.out)
            del q, k, v
            torch.cuda.empty_cache()
    args.out.with_suffix(".md").write_text(markdown(header, records))
    sys.exit(1 if failed else 0)


def markdown(header, records) -> str:
    lines = [f"Card: {header['card']}; PyTorch {header['torch']}, Triton {header['triton']}; {header['date']}; "
             f"`{header['command']}`", "",
             f"Causal, window W = {header['window']} (each query sees itself and W - 1 keys before it), bf16, "
             "batch 1, hidden 2048. Forward+backward; TFLOP/s count only visible query-key pairs.", "",
             "| head dim | seqlen | provider | ms | µs per 1K tokens | TFLOP/s | vs flashtrain window | checked |",
             "|---|---|---|---|---|---|---|---|"]
    ours = {(r["head_dim"], r["seqlen"]): r.get("ms") for r in records if r["provider"] == "flashtrain_window"}
    for r in records:
        base = ours.get((r["head_dim"], r["seqlen"]))
        ratio = f"{r['ms'] / base:.2f}×" if base and "ms" in r else "–"
        check = "–" if "check" not in r else ("ok" if all(p["ok"] for p in r["check"].values()) else "FAILED")
        cells = (f"{r['ms']:.3f} | {r['us_per_1k_tokens']:.1f} | {r['tflops']:.0f}" if "ms" in r
                 else f"{r['error']} | – | –")
        lines.append(f"| {r['head_dim']} | {r['seqlen']} | {r['provider']} | {cells} | {ratio} | {check} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
