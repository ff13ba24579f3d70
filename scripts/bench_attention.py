"""Attention benchmark, FlashAttention-2 protocol: flashtrain against PyTorch's backends, one process.

    python scripts/bench_attention.py --out docs/results/attention_h100.json

Grid: bf16 and fp16; batch x seqlen = 16384 tokens; hidden 2048 (head dim 64 -> 32 heads,
128 -> 16 heads); seqlen 512 ... 16384; causal or not; dropout 0 and 0.1. Forward, backward and
forward+backward TFLOP/s (4·B·H·N²·D forward, halved when causal, x2.5 backward): the median of
three rounds that alternate between a cell's providers, each round a ``triton.testing.do_bench``
median; and peak memory of one forward+backward. Each flashtrain cell is
also checked against a float32 reference (one head of one sequence, under the call's own dropout
mask; at most twice PyTorch's own error in that dtype, as in the tests): the run exits non-zero if
any cell fails, or if flashtrain cannot run one. Each flashtrain record names the forward, dQ and
dK/dV kernels the library ran for the cell (``kernels``). Then a memory sweep: forward+backward, head dim
64, 16 heads, batch 1, seqlen 128 ... 65536, flashtrain against standard (materialized) attention.
Another provider that cannot run a cell records why. A timed record's ``unsteady`` names the
timings whose median round lay more than 10 % above the fastest (``timing_rounds.py``): most rounds
were slow, so the cell measured a disturbance; the line printed for it says so. Writes JSON after
every cell (marked
``"complete": false`` until the run ends, so a run cut short keeps what it measured);
``scripts/report_attention.py`` turns it into Markdown tables and PNG plots. ``--causal`` and
``--dropouts`` measure part of the grid.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import attention_reference, flash_attention  # noqa: E402
from kernels._chosen import chosen_kernels  # noqa: E402
from kernels._philox import effective_dropout_p  # noqa: E402
from timing_rounds import describe, unsteady_bench_record  # noqa: E402  (scripts/ is on sys.path)
from trainer.environment import benchmark_header  # noqa: E402

SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}


def flashtrain_fn(batch, seqlen, heads, head_dim, dtype, causal, dropout_p):
    """(B, N, H, D): the layout of a fused QKV projection, which the kernel reads in place."""
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype,
                           requires_grad=True) for _ in range(3))
    return (q, k, v), lambda: flash_attention(q, k, v, causal=causal, dropout_p=dropout_p)


def sdpa_fn(backend):
    def make(batch, seqlen, heads, head_dim, dtype, causal, dropout_p):
        # (B, H, N, D): SDPA's native layout, so no provider pays for a transpose.
        q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=dtype,
                               requires_grad=True) for _ in range(3))

        def run():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=causal, dropout_p=dropout_p)
        return (q, k, v), run
    return make


_FLEX_CACHE = {}


def flex_fn(batch, seqlen, heads, head_dim, dtype, causal, dropout_p):
    import torch._functorch.config    # not loaded until something compiles
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if dropout_p > 0:
        raise NotImplementedError("FlexAttention has no attention dropout")
    if "compiled" not in _FLEX_CACHE:
        # The backward is timed by replaying it on one graph (retain_graph), which compiled
        # backwards that donate their buffers refuse.
        torch._functorch.config.donated_buffer = False
        _FLEX_CACHE["compiled"] = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None,
                                       seqlen, seqlen, device="cuda")
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=dtype,
                           requires_grad=True) for _ in range(3))
    return (q, k, v), lambda: _FLEX_CACHE["compiled"](q, k, v, block_mask=block_mask)


PROVIDERS = {"flashtrain": flashtrain_fn, **{name: sdpa_fn(b) for name, b in SDPA_BACKENDS.items()},
             "flex": flex_fn}


# The numerics check's rule is the tests' (DESIGN.md, Tests): the kernel's relative error against a
# float32 reference may be at most twice that of PyTorch's own attention in the same dtype, plus a floor.
CHECK_FLOOR = {torch.bfloat16: 2e-3, torch.float16: 2e-4}


# Each cell is timed in rounds that alternate between its providers, and each provider's time is
# the median of its rounds: a slow stretch of the card (clocks, power, a host stall) then falls on
# one round of every provider instead of on one provider's whole measurement.
ROUNDS = 3


def timing_repetitions(seqlen):
    """do_bench's warm-up and repetition budgets (ms) for one round. A 16K-token forward+backward
    takes ~10 ms: 100 ms gives it ~10 timed runs per round, as 40 ms gives the shorter cells."""
    return dict(warmup=10, rep=100 if seqlen >= 16384 else 40, return_mode="median")


def flashtrain_errors(inputs, grad_out, causal, dropout_p):
    """Relative errors of flashtrain's and of PyTorch's attention (in the inputs' dtype) against
    float32 attention, output and gradients, on head 0 of sequence 0 (heads are independent; the
    references hold an N x N matrix), under the call's own dropout mask. Returns (ours, PyTorch's)
    for out, dq, dk, dv."""
    q, k, v = inputs
    out, keep = flash_attention(q, k, v, causal=causal, dropout_p=dropout_p, return_debug_mask=True)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    mask = keep[:1, :1].clone() if dropout_p > 0 else None
    del keep                # (B, H, N, N): free it before the references allocate their own N x N
    head = lambda t, dtype: t[:1, :, :1].detach().to(dtype).requires_grad_()

    def reference(dtype):
        q1, k1, v1 = head(q, dtype), head(k, dtype), head(v, dtype)
        o = attention_reference(q1, k1, v1, causal=causal, dropout_mask=mask,
                                dropout_p=effective_dropout_p(dropout_p))
        return (o, *torch.autograd.grad(o, (q1, k1, v1), head(grad_out, dtype)))

    truth, theirs = reference(torch.float32), reference(q.dtype)
    relative = lambda value, exact: ((value.float() - exact).norm() / exact.norm()).item()
    ours = [relative(mine[:1, :, :1], exact) for mine, exact in zip((out, *grads), truth)]
    return ours, [relative(value, exact) for value, exact in zip(theirs, truth)]


def attention_flops(batch, seqlen, heads, head_dim, causal):
    return 4 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)


def _error_text(error):
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}" if str(error) \
        else type(error).__name__


# What a provider may raise on a cell it cannot run (unsupported shape or dtype, out of memory): the
# record says why and the grid goes on. For flashtrain itself any error fails the run (main).
ERRORS = (RuntimeError, NotImplementedError, torch.OutOfMemoryError)


def prepare(provider, batch, seqlen, heads, head_dim, dtype, causal, dropout_p, record):
    """A provider's inputs, call and output gradient, after one forward+backward (the warm-up, which
    compiles) whose peak memory, inputs included, goes into ``record``."""
    before = torch.cuda.memory_allocated()
    inputs, fn = PROVIDERS[provider](batch, seqlen, heads, head_dim, dtype, causal, dropout_p)
    grad_out = torch.randn_like(inputs[0])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn().backward(grad_out)
    torch.cuda.synchronize()
    record["peak_mem_gb"] = (torch.cuda.max_memory_allocated() - before) / 1e9
    for tensor in inputs:
        tensor.grad = None
    return inputs, fn, grad_out


def time_round(inputs, fn, grad_out, reps):
    """Forward, backward and forward+backward milliseconds (do_bench medians)."""
    fwd_ms = do_bench(fn, **reps)
    out = fn()
    bwd_ms = do_bench(lambda: out.backward(grad_out, retain_graph=True), grad_to_none=list(inputs),
                      **reps)
    both_ms = do_bench(lambda: fn().backward(grad_out), grad_to_none=list(inputs), **reps)
    return fwd_ms, bwd_ms, both_ms


def base_record(provider, batch, seqlen, heads, head_dim, dtype, causal, dropout_p):
    return dict(provider=provider, dtype=str(dtype).replace("torch.", ""), head_dim=head_dim,
                seqlen=seqlen, batch=batch, heads=heads, causal=causal, dropout_p=dropout_p)


def measure_cell(providers, batch, seqlen, heads, head_dim, dtype, causal, dropout_p):
    """One cell, every provider: TFLOP/s of forward, backward, forward+backward (median of the
    rounds) and peak GB, or the error that stopped it; flashtrain's numerics checked."""
    shape = (batch, seqlen, heads, head_dim, dtype, causal, dropout_p)
    records = {provider: base_record(provider, *shape) for provider in providers}
    ready, rounds = {}, {provider: [] for provider in providers}
    for provider in providers:
        try:
            ready[provider] = prepare(provider, *shape, records[provider])
        except ERRORS as error:
            records[provider]["error"] = _error_text(error)
            torch.cuda.empty_cache()
    reps = timing_repetitions(seqlen)
    for _ in range(ROUNDS):
        for provider in list(ready):
            try:
                rounds[provider].append(time_round(*ready[provider], reps))
            except ERRORS as error:
                records[provider]["error"] = _error_text(error)
                del ready[provider]
    flops = attention_flops(batch, seqlen, heads, head_dim, causal)
    for provider in ready:
        fwd_ms, bwd_ms, both_ms = (statistics.median(times) for times in zip(*rounds[provider]))
        records[provider].update(
            fwd_tflops=flops / fwd_ms / 1e9, bwd_tflops=2.5 * flops / bwd_ms / 1e9,
            fwdbwd_tflops=3.5 * flops / both_ms / 1e9, fwd_ms=fwd_ms, bwd_ms=bwd_ms,
            fwdbwd_ms=both_ms, rounds_ms=rounds[provider], rep_ms=reps["rep"])
        records[provider]["unsteady"] = unsteady_bench_record(records[provider])
    if "flashtrain" in ready:
        inputs, _, grad_out = ready["flashtrain"]
        records["flashtrain"]["kernels"] = chosen_kernels(*inputs, grad_out, causal, dropout_p)
        try:
            ours, theirs = flashtrain_errors(inputs, grad_out, causal, dropout_p)
            records["flashtrain"].update(rel_err=ours, torch_rel_err=theirs, check_passed=all(
                mine <= 2 * torch_error + CHECK_FLOOR[dtype] for mine, torch_error in zip(ours, theirs)))
        except ERRORS as error:
            records["flashtrain"].update(check_error=_error_text(error), check_passed=False)
    del ready
    torch.cuda.empty_cache()
    return [records[provider] for provider in providers]


def measure_memory(provider, seqlen):
    """Peak memory of one forward+backward: batch 1, 16 heads, head dim 64, causal, bf16."""
    record = base_record(provider, 1, seqlen, 16, 64, torch.bfloat16, True, 0.0)
    try:
        prepare(provider, 1, seqlen, 16, 64, torch.bfloat16, True, 0.0, record)
    except ERRORS as error:
        record["error"] = _error_text(error)
    torch.cuda.empty_cache()
    return record


def _skip_reason(provider, seqlen, dropout_p):
    """Cells left out to keep the whole run under ten minutes, and why."""
    if provider == "sdpa_math" and seqlen > 4096:
        return "not run: materializes N x N scores; too slow for this grid (see the memory sweep)"
    if provider == "flex" and dropout_p > 0:
        return "not supported: FlexAttention has no attention dropout"
    if provider == "flex" and seqlen not in (2048, 8192):
        return "not run: each shape is a fresh torch.compile; measured at 2048 and 8192 only"
    return None


def run_grid(dtypes, head_dims, seqlens, providers, log, causals=(False, True),
             dropouts=(0.0, 0.1), save=lambda records: None):
    """Measure every cell; ``save`` receives the records so far after each cell, so that a run cut
    short (a time limit, a crash) keeps what it measured."""
    records = []
    for dtype in dtypes:
        for head_dim in head_dims:
            heads = 2048 // head_dim
            for seqlen in seqlens:
                batch = 16384 // seqlen
                for causal in causals:
                    for dropout_p in dropouts:
                        shape = (batch, seqlen, heads, head_dim, dtype, causal, dropout_p)
                        skipped = {p: _skip_reason(p, seqlen, dropout_p) for p in providers}
                        measured = measure_cell([p for p in providers if not skipped[p]], *shape)
                        for record in measured:
                            log(record)
                        measured = iter(measured)
                        records += [dict(base_record(p, *shape), error=skipped[p]) if skipped[p]
                                    else next(measured) for p in providers]
                        save(records)
    return records


def write_json(path: Path, result: dict) -> None:
    """Write ``result`` atomically: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=1))
    temporary.replace(path)


def run_memory_sweep(log):
    records = []
    for provider in ("flashtrain", "sdpa_math"):
        for power in range(7, 17):
            seqlen = 2 ** power
            record = measure_memory(provider, seqlen)
            record["sweep"] = "memory"
            records.append(record)
            log(record)
    return records


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/results/attention_h100.json"))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    parser.add_argument("--fp16-providers", nargs="+", default=["flashtrain", "sdpa_flash", "sdpa_cudnn"],
                        help="providers measured for float16 (the bf16 grid runs all of them)")
    parser.add_argument("--causal", type=int, nargs="+", choices=[0, 1], default=[0, 1],
                        help="which masks to measure (0: none, 1: causal)")
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1],
                        help="attention dropout probabilities to measure")
    parser.add_argument("--skip-memory-sweep", action="store_true")
    args = parser.parse_args(argv)
    bad = [p for p in args.dropouts if not 0.0 <= p < 1.0]
    if bad:
        parser.error(f"--dropouts must be in [0, 1); got {bad}")
    return args


def record_line(record: dict) -> str:
    """The printed line of one record: provider, cell, TFLOP/s, peak memory, error, flashtrain's
    numerics and, for unsteady rounds, a warning."""
    speed = (f"{record['fwd_tflops']:6.1f} / {record['bwd_tflops']:6.1f} / "
             f"{record['fwdbwd_tflops']:6.1f} TF/s" if "fwd_tflops" in record else "")
    memory = f"{record['peak_mem_gb']:7.2f} GB" if "peak_mem_gb" in record else ""
    return (f"{record['provider']:>14} {record['dtype']:>8} d={record['head_dim']:<3} "
            f"N={record['seqlen']:<5} causal={record['causal']:d} p={record['dropout_p']} {speed} "
            f"{memory} {record.get('error', '')}"
            + (f" err {max(record['rel_err']):.1e} (PyTorch {max(record['torch_rel_err']):.1e})"
               if "rel_err" in record else "")
            + (f"  UNSTEADY rounds (median above fastest: {describe(record['unsteady'])}): re-run"
               if record.get("unsteady") else ""))


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py measures GPU speed; no CUDA device is visible.")

    started = time.time()

    def log(record):
        print(f"[{time.time() - started:6.0f}s] " + record_line(record), flush=True)

    records = []

    def save(partial):      # after each cell: the file so far, marked incomplete
        write_json(args.out, dict(benchmark_header(), seconds=round(time.time() - started), complete=False,
                                  records=records + partial))

    for dtype_name in args.dtypes:
        providers = args.providers if dtype_name == "bfloat16" else args.fp16_providers
        records += run_grid([getattr(torch, dtype_name)], args.head_dims, args.seqlens, providers, log,
                            causals=[bool(c) for c in args.causal], dropouts=args.dropouts, save=save)
    if not args.skip_memory_sweep:
        records += run_memory_sweep(log)
    write_json(args.out, dict(benchmark_header(), seconds=round(time.time() - started), complete=True,
                              records=records))
    print(f"wrote {args.out} ({len(records)} records, {time.time() - started:.0f}s)")
    wrong = [r for r in records if r["provider"] == "flashtrain"
             and (r.get("check_passed") is False or "error" in r)]
    for record in wrong:
        print(f"FLASHTRAIN FAILED: {record['dtype']} d={record['head_dim']} N={record['seqlen']} "
              f"causal={record['causal']:d} p={record['dropout_p']}: "
              + (record["error"] if "error" in record else
                 f"relative errors of out, dq, dk, dv {record.get('rel_err')}, PyTorch's "
                 f"{record.get('torch_rel_err')} {record.get('check_error', '')}"))
    if wrong:
        sys.exit(1)


if __name__ == "__main__":
    main()
