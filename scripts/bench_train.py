"""GPT-2 training-step throughput: flash kernel against PyTorch SDPA and materialized attention.

    python scripts/bench_train.py --out docs/results/train_h100.json

gpt2_small (vocabulary 50304, dropout 0.1), bf16 autocast, fused AdamW, random tokens; for each
context length, attention implementation and torch.compile setting: tokens/s over timed steps after
warm-up (compilation stays in the warm-up), MFU and peak memory. MFU = tokens/s x
model.flops_per_token(seqlen) / the card's dense bf16 rate (989 TFLOP/s on an H100 SXM); the
FLOPs count causal attention as half a square.
"""

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model, lm_loss  # noqa: E402

PEAK = 989e12


def one_setting(seqlen, batch, attention, compiled, steps, warmup):
    record = dict(model="gpt2_small", seqlen=seqlen, batch=batch, attention=attention, compile=compiled)
    model = optimizer = None
    try:
        torch._dynamo.reset()
        model = build_model("gpt2_small", vocab_size=50304, max_seqlen=seqlen, attention=attention,
                            seed=0).cuda().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        forward = torch.compile(model) if compiled else model
        tokens = torch.randint(0, 50304, (batch, seqlen + 1), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = lm_loss(forward(tokens[:, :-1]), tokens[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        started = time.time()
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        record["warmup_s"] = time.time() - started
        torch.cuda.reset_peak_memory_stats()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        seconds = begin.elapsed_time(end) / 1e3
        tokens_per_s = batch * seqlen * steps / seconds
        record.update(tokens_per_s=tokens_per_s, step_ms=seconds / steps * 1e3,
                      mfu=tokens_per_s * model.flops_per_token(seqlen) / PEAK,
                      peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9)
    except torch.OutOfMemoryError:
        record["error"] = "out of memory"
    except Exception as error:  # noqa: BLE001 - record why a setting could not run, keep going
        record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    finally:
        model = optimizer = None    # free this setting's memory before the next one
        torch.cuda.empty_cache()
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/results/train_h100.json"))
    parser.add_argument("--settings", nargs="+", default=["1024:16", "4096:4"], help="seqlen:batch")
    parser.add_argument("--attention", nargs="+", default=["flash", "sdpa", "eager"])
    parser.add_argument("--compile", nargs="+", default=["1"], help="1 and/or 0")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    records = []
    for setting in args.settings:
        seqlen, batch = map(int, setting.split(":"))
        for compiled in args.compile:
            for attention in args.attention:
                record = one_setting(seqlen, batch, attention, compiled == "1", args.steps, args.warmup)
                records.append(record)
                print(json.dumps(record), flush=True)
    result = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                  command="python " + " ".join(shlex.quote(a) for a in sys.argv), records=records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
