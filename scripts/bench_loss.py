"""The compiled LM head and loss with each form of the padded-vocabulary mask (GPU).

    python scripts/bench_loss.py --out loss.json

GPT-2 small's tied head (hidden 768, vocabulary 50257 padded to 50304) and its cross entropy at
one training micro-batch (default 4 x 4096 tokens), compiled, forward and backward. The padding
columns must take no part in the softmax; each form below does that, except ``unmasked`` (stock
nanoGPT's choice, the speed to aim for). Rounds alternate the forms. Every form's loss and
gradients are compared with the sliced logits' (the eager path's), and the loss kernels are timed
on their own in a profiled step.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.environment import benchmark_header  # noqa: E402

from models.loss import IGNORE_INDEX, lm_loss, padding_bias  # noqa: E402

HIDDEN, VOCAB, PADDED = 768, 50257, 50304


def cross_entropy(logits, targets):
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def padding_row(device=None) -> torch.Tensor:
    """(PADDED,) float32: 0 in the vocabulary's columns, -inf in the padding columns."""
    return padding_bias(PADDED, VOCAB).to(device)


def forms(row: torch.Tensor) -> dict:
    """Head + loss functions of (x, weight, targets), by name; ``row`` from ``padding_row``."""
    return {
        "unmasked": lambda x, w, t: cross_entropy(F.linear(x, w), t),
        "sliced": lambda x, w, t: cross_entropy(F.linear(x, w)[..., :VOCAB], t),
        "masked_fill (lm_loss)": lambda x, w, t: lm_loss(F.linear(x, w), t, VOCAB, aligned=True),
        "float32 row after the upcast": lambda x, w, t: cross_entropy(F.linear(x, w).float() + row, t),
        "row in the logits' dtype": lambda x, w, t: cross_entropy(F.linear(x, w) + row.to(x.dtype), t),
        "row as the matmul's bias (CausalLM)": lambda x, w, t: cross_entropy(
            F.linear(x, w, row.to(x.dtype)), t),
    }


def loss_kernel_ms(step, steps=5) -> float:
    """GPU time per step of the compiled loss's own kernels (Triton kernels named after the
    softmax or the NLL loss) in a profiled run."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total = sum(event.self_device_time_total for event in prof.key_averages()
                if event.key.startswith("triton_") and ("softmax" in event.key or "nll" in event.key))
    return total / steps / 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("loss.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_loss.py times GPU kernels: no CUDA device found")
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seqlen, HIDDEN, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    weight = (0.02 * torch.randn(PADDED, HIDDEN, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    targets = torch.randint(0, VOCAB, (args.batch, args.seqlen), device="cuda")
    compiled = {name: torch.compile(form) for name, form in forms(padding_row("cuda")).items()}

    def step(form):
        x.grad = weight.grad = None
        form(x, weight, targets).backward()

    results = {}
    for name, form in compiled.items():
        step(form)
        results[name] = dict(loss=form(x, weight, targets).item(), grad_x=x.grad.float().clone(),
                             grad_weight=weight.grad.float().clone(), step_ms=[])
    sliced = results["sliced"]
    for result in results.values():
        result["loss_difference"] = abs(result["loss"] - sliced["loss"])
        result["max_grad_difference"] = max(
            (result[key] - sliced[key]).abs().max().item() for key in ("grad_x", "grad_weight"))
    for result in results.values():
        del result["grad_x"], result["grad_weight"]
    for _ in range(args.rounds):
        for name, form in compiled.items():
            results[name]["step_ms"].append(do_bench(lambda: step(form), warmup=25, rep=300,
                                                     return_mode="median"))
    for name, form in compiled.items():
        results[name]["loss_kernels_ms"] = loss_kernel_ms(lambda: step(form))
        print(f"{name:>36}: head+loss {sorted(results[name]['step_ms'])[args.rounds // 2]:.3f} ms, "
              f"loss kernels {results[name]['loss_kernels_ms']:.3f} ms, loss difference "
              f"{results[name]['loss_difference']:.2e}, gradient {results[name]['max_grad_difference']:.2e}",
              flush=True)
    record = dict(benchmark_header(), batch=args.batch, seqlen=args.seqlen, forms=results)
    args.out.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
    args.out.with_suffix(".tmp").replace(args.out)


if __name__ == "__main__":
    main()
