"""Whether an attention call is host bound: the host time to issue one call against its GPU time.

    python scripts/host_overhead.py --head-dims 128 --seqlens 512 1024 --out host.json

For each cell (the grid's shapes: batch x seqlen = ``--tokens``, hidden 2048, bf16, (B, N, H, D)
for flashtrain and SDPA's native (B, H, N, D) for cuDNN) and each provider, forward and backward
(the backward through autograd, as a training step runs it):

- ``issue_us``: the host time to enqueue one call, with the GPU kept busy by a sleep kernel
  queued first, so the host never waits for it;
- ``gpu_us``: the GPU time of one call, from CUDA events around the same calls, whose queue the
  sleep filled, so the GPU never waits for the host;
- ``bench_us``: ``triton.testing.do_bench``'s median for the same call, as ``bench_attention.py``
  times it. do_bench clears a 256 MB cache before each call and times the call with events on the
  GPU's side. When one call's issue takes longer than the GPU needs for the clearing and the call,
  the host falls behind, the GPU waits inside the timed window, and the time includes host time.

A call is ``host_bound`` when ``issue_us`` is at least ``gpu_us``: issued one after another, such
calls leave the GPU waiting, and a benchmark then measures the host. Each number is the median of ``--loops`` loops of ``--calls`` calls. A loop counts only if
the sleep was still running when the host finished issuing (checked with a CUDA event); otherwise
the sleep is doubled and the loop repeated. Writes JSON (atomically) after every cell.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_attention import PROVIDERS, write_json  # noqa: E402  (scripts/ is on sys.path)
from trainer.environment import benchmark_header  # noqa: E402

HIDDEN = 2048
# The GPU sleep before a loop: this many times the loop's estimated issue time.
SLEEP_MARGIN = 3.0


def sleep_cycles_per_ms() -> float:
    """Cycles of ``torch.cuda._sleep`` per millisecond on this GPU (it spins on the SM clock)."""
    cycles = 50_000_000
    torch.cuda._sleep(1_000_000)       # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def issue_and_gpu_time(call, calls: int, cycles_per_ms: float, issue_guess_ms: float) -> tuple:
    """(issue ms, GPU ms) per call of one loop of ``calls`` calls queued behind a GPU sleep long
    enough that the GPU never waits for the host; the sleep doubles until it is."""
    sleep_ms = SLEEP_MARGIN * calls * issue_guess_ms
    while True:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        slept = torch.cuda.Event()
        torch.cuda._sleep(int(sleep_ms * cycles_per_ms))
        slept.record()
        start.record()
        began = time.perf_counter()
        for _ in range(calls):
            call()
        issued = time.perf_counter() - began
        still_sleeping = not slept.query()
        end.record()
        end.synchronize()
        if still_sleeping:
            return 1e3 * issued / calls, start.elapsed_time(end) / calls
        sleep_ms *= 2


def summarize(issue_ms: list[float], gpu_ms: list[float], bench_ms: float) -> dict:
    """A pass's record from its loops (milliseconds in, microseconds out)."""
    issue, gpu = statistics.median(issue_ms), statistics.median(gpu_ms)
    return dict(issue_us=round(1e3 * issue, 1), gpu_us=round(1e3 * gpu, 1),
                bench_us=round(1e3 * bench_ms, 1), host_bound=issue >= gpu,
                issue_loops_us=[round(1e3 * v, 1) for v in issue_ms],
                gpu_loops_us=[round(1e3 * v, 1) for v in gpu_ms])


def measure(provider: str, head_dim: int, seqlen: int, causal: bool, dropout_p: float,
            tokens: int, calls: int, loops: int, cycles_per_ms: float) -> dict:
    """One provider's forward and backward in one cell."""
    batch, heads = tokens // seqlen, HIDDEN // head_dim
    inputs, forward = PROVIDERS[provider](batch, seqlen, heads, head_dim, torch.bfloat16, causal,
                                          dropout_p)
    grad_out = torch.randn_like(forward())
    out = forward()

    def backward():
        for tensor in inputs:
            tensor.grad = None
        out.backward(grad_out, retain_graph=True)
    record = dict(provider=provider, head_dim=head_dim, seqlen=seqlen, batch=batch, heads=heads,
                  causal=causal, dropout_p=dropout_p)
    for name, call in (("forward", forward), ("backward", backward)):
        call()
        torch.cuda.synchronize()
        began = time.perf_counter()
        call()
        torch.cuda.synchronize()
        guess = 1e3 * (time.perf_counter() - began)    # issue + GPU: an upper bound on issue
        issue, gpu = zip(*(issue_and_gpu_time(call, calls, cycles_per_ms, guess)
                           for _ in range(loops)))
        record[name] = summarize(list(issue), list(gpu),
                                 do_bench(call, warmup=10, rep=40, return_mode="median"))
    return record


def line(record: dict) -> str:
    """One printed line: each pass's issue, GPU and do_bench microseconds."""
    parts = [f"{name} issue {r['issue_us']:.0f} / GPU {r['gpu_us']:.0f} / do_bench {r['bench_us']:.0f} us"
             + (" HOST BOUND" if r["host_bound"] else "")
             for name, r in ((n, record[n]) for n in ("forward", "backward"))]
    return (f"{record['provider']:>10} d={record['head_dim']} N={record['seqlen']} "
            f"causal={record['causal']:d} p={record['dropout_p']}: " + "; ".join(parts))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--causal", type=int, nargs="+", choices=[0, 1], default=[0, 1])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0])
    parser.add_argument("--providers", nargs="+", default=["flashtrain", "sdpa_cudnn"],
                        choices=[p for p in PROVIDERS if p != "flex"])
    parser.add_argument("--tokens", type=int, default=16384, help="batch x seqlen of every call")
    parser.add_argument("--calls", type=int, default=100, help="calls per loop")
    parser.add_argument("--loops", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("host_overhead.json"))
    args = parser.parse_args(argv)
    if any(not 0.0 <= p < 1.0 for p in args.dropouts):
        parser.error(f"--dropouts must be in [0, 1); got {args.dropouts}")
    if args.calls < 1 or args.loops < 1:
        parser.error("--calls and --loops must be at least 1")
    bad = [n for n in args.seqlens if n < 1 or args.tokens % n]
    if bad:
        parser.error(f"--tokens {args.tokens} must be a multiple of every seqlen; not of {bad}")
    bad = [d for d in args.head_dims if d < 1 or HIDDEN % d]
    if bad:
        parser.error(f"head dims must divide the hidden size {HIDDEN}; got {bad}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("host_overhead.py measures host and GPU time; no CUDA device is visible.")
    cycles_per_ms = sleep_cycles_per_ms()
    records = []
    for head_dim in args.head_dims:
        for seqlen in args.seqlens:
            for causal in args.causal:
                for dropout_p in args.dropouts:
                    for provider in args.providers:
                        record = measure(provider, head_dim, seqlen, bool(causal), dropout_p,
                                         args.tokens, args.calls, args.loops, cycles_per_ms)
                        records.append(record)
                        print(line(record), flush=True)
                        write_json(args.out, dict(benchmark_header(), sleep_cycles_per_ms=round(cycles_per_ms),
                                                  records=records))


if __name__ == "__main__":
    main()
