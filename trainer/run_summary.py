"""What a run achieved, from its metric lines (printed at the end of every run and by
``python -m trainer.plot_metrics``), and the peak FLOP rate its MFU is measured against."""

import math
import statistics

import torch


def summarize(metrics: dict) -> dict:
    """``metrics`` as ``trainer.metrics.read_metrics`` returns it. Throughput is the median over
    log windows, so the first window (compilation) does not drag it down; peak memory is the
    largest seen."""
    train, evals = metrics["train"], metrics["eval"]
    speeds = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    mfus = [r["mfu"] for r in train if r.get("mfu") is not None]
    memory = [r["mem_gb"] for r in train if r.get("mem_gb") is not None]
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    return {
        "steps": train[-1]["step"] if train else 0,
        "tokens": train[-1].get("tokens") if train else 0,
        "seconds": training_seconds(train),
        "final_loss": train[-1]["loss"] if train else None,
        "final_val_ppl": evals[-1]["val_ppl"] if evals else None,
        "best_val_ppl": best["val_ppl"] if best else None,
        "best_val_step": best["step"] if best else None,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "mfu": statistics.median(mfus) if mfus else None,
        "peak_mem_gb": max(memory) if memory else None,
    }


def training_seconds(lines) -> float:
    """Seconds spent in training steps (compilation included; evaluation and checkpoints are not
    in the log windows): the sum over train lines of window tokens / window tokens-per-second.
    Lines without a rate (evaluations, events) are skipped."""
    seconds, previous = 0.0, 0
    for record in lines:
        tokens = record.get("tokens") or 0
        if record.get("tokens_per_s") and tokens > previous:
            seconds += (tokens - previous) / record["tokens_per_s"]
            previous = tokens
    return seconds


def _number(value, spec, unit=""):
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{unit}"


def format_summary(name: str, summary: dict) -> str:
    """A few lines for the end of a run."""
    best = (f"{_number(summary['best_val_ppl'], '.2f')} (step {summary['best_val_step']})"
            if summary["best_val_ppl"] is not None else "–")
    return "\n".join([
        f"summary of {name}:",
        f"  validation ppl   final {_number(summary['final_val_ppl'], '.2f')}, best {best}",
        f"  trained          {summary['steps']} steps, {_number(summary['tokens'], ',')} tokens, "
        f"{_number(summary['seconds'], '.0f', ' s')} in training steps",
        f"  throughput       {_number(summary['tokens_per_s'], ',.0f', ' tokens/s')} (median of log windows), "
        f"MFU {_number(summary['mfu'] and summary['mfu'] * 100, '.1f', ' %')}",
        f"  peak memory      {_number(summary['peak_mem_gb'], '.2f', ' GB')}",
    ])


def format_table(rows: dict) -> str:
    """A Markdown table, one row per run: ``rows`` maps a run's name to its summary."""
    lines = ["| run | steps | tokens | final loss | final val ppl | best val ppl (step) | tokens/s | MFU | peak GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in rows.items():
        best = (f"{_number(s['best_val_ppl'], '.2f')} ({s['best_val_step']})"
                if s["best_val_ppl"] is not None else "–")
        lines.append(f"| {name} | {s['steps']} | {_number(s['tokens'], ',')} | {_number(s['final_loss'], '.3f')} | "
                     f"{_number(s['final_val_ppl'], '.2f')} | {best} | {_number(s['tokens_per_s'], ',.0f')} | "
                     f"{_number(s['mfu'] and s['mfu'] * 100, '.1f', ' %')} | {_number(s['peak_mem_gb'], '.2f')} |")
    return "\n".join(lines)


# Dense bf16 tensor-core rates (datasheets), for MFU when trainer.peak_tflops is not given.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_flops(peak_tflops: float | None, device) -> float | None:
    """The card's dense bf16 FLOP/s for MFU: the configured rate, else the datasheet's when known."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)
