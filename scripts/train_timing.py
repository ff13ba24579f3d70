"""Timing of training systems on one GPU, for scripts/bench_train.py.

A system is any object with ``step()`` (queue one optimizer step), ``sync()`` (wait for the GPU),
``tokens_per_step``, ``flops_per_token`` and ``close()``. ``measure`` times one system after its
warm-up window; ``measure_interleaved`` builds and warms up several, then times them in
alternating windows, each paired with the first system's window of the same round.
"""

import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import triton

import gpu_idle

DATASHEET_FLOPS = 989e12       # dense bf16, H100 SXM


def matmul_ceiling() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    seconds = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median") / 1e3
    return 2 * 8192**3 / seconds


def timed_window(step, sync, window) -> float:
    """Seconds for ``window`` steps: step() queues one step; sync() waits for the GPU."""
    begin = time.perf_counter()
    for _ in range(window):
        step()
    sync()
    return time.perf_counter() - begin


def timed_windows(step, sync, tokens_per_step, window, windows):
    """Returns (tokens/s per window, warm-up s): one warm-up window, then ``windows`` timed ones."""
    warmup_s = timed_window(step, sync, window)
    rates = [tokens_per_step * window / timed_window(step, sync, window) for _ in range(windows)]
    return rates, warmup_s


def measure(record, build, window, windows, ceiling, profile_steps=0):
    """Fill ``record`` with the timing of the system ``build()`` returns (an object with step(),
    sync(), tokens_per_step, flops_per_token and close()), or with the error that stopped it."""
    torch._dynamo.reset()                # a fresh compile per setting (and no recompile limit)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    system = None
    try:
        system = build()
        rates, warmup_s = timed_windows(system.step, system.sync, system.tokens_per_step, window, windows)
        fill_timing(record, system, rates, warmup_s, ceiling)
        record["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        if profile_steps:
            record.update(profiles(system, profile_steps))
    except Exception as error:  # noqa: BLE001 - record why a setting could not run, keep going
        record["error"] = failure(error)
    finally:
        if system is not None:
            system.close()
        system = None                    # free this setting's memory before the next one
        gc.collect()
        torch.cuda.empty_cache()
    print(json.dumps({k: v for k, v in record.items() if k != "window_tokens_per_s"}), flush=True)
    return record


def kernel_profile(system, steps, activity=torch.profiler.ProfilerActivity.CUDA,
                   own_time=lambda event: event.self_device_time_total, top=40) -> dict:
    """Where ``steps`` steps spend their GPU time: the ``top`` kernels by their own time, as
    [name, ms per step, launches per step], and every kernel's total ms per step."""
    with torch.profiler.profile(activities=[activity]) as profiler:
        for _ in range(steps):
            system.step()
        system.sync()
    events = sorted((event for event in profiler.key_averages() if own_time(event) > 0),
                    key=own_time, reverse=True)
    return {"total_ms_per_step": sum(own_time(event) for event in events) / 1e3 / steps,
            "top": [[event.key[:160], own_time(event) / 1e3 / steps, event.count / steps]
                    for event in events[:top]]}


def host_profile(system, steps) -> dict:
    """Where ``steps`` steps spend host time: operators (and the compiled graphs' and custom ops'
    calls) by their own CPU time, as ``kernel_profile`` lists kernels. A step whose GPU kernels
    take less than its wall time waits on this (the profiler's own overhead inflates it alike)."""
    return kernel_profile(system, steps, torch.profiler.ProfilerActivity.CPU,
                          own_time=lambda event: event.self_cpu_time_total)


def idle_profile(system, steps) -> dict:
    """Where the GPU is idle during ``steps`` steps (``gpu_idle.summarize``): the intervals in which
    no kernel, copy or memset runs, with what runs either side of them. One step is queued before
    the profiler starts: profiling from an idle GPU (after the last window's sync) would count the
    host's head start on the first step, which a window pays once, as idle time of every step."""
    system.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            system.step()
        system.sync()
    with tempfile.TemporaryDirectory() as scratch:
        trace = Path(scratch) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        return gpu_idle.summarize_trace(trace, steps)


def profiles(system, steps) -> dict:
    """``kernel_profile`` (GPU time), ``host_profile`` (CPU time) and ``idle_profile`` (the GPU's
    idle intervals) of ``steps`` steps each."""
    return {"kernel_profile": kernel_profile(system, steps), "host_profile": host_profile(system, steps),
            "idle_profile": idle_profile(system, steps)}


def fill_timing(record, system, rates, warmup_s, ceiling):
    tokens_per_s = statistics.median(rates)
    record.update(tokens_per_s=tokens_per_s, window_tokens_per_s=rates, warmup_s=warmup_s,
                  step_ms=system.tokens_per_step / tokens_per_s * 1e3,
                  mfu=tokens_per_s * system.flops_per_token / DATASHEET_FLOPS,
                  mfu_measured=tokens_per_s * system.flops_per_token / ceiling)


def failure(error: Exception) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory"
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"


def measure_interleaved(records, builds, window, windows, ceiling, profile_steps=0):
    """Time several systems in turns: each is built and warmed up (compiled), then window k of every
    system runs before window k + 1 of any, so a machine whose speed drifts during the run (clocks,
    power, neighbours; seen at ±10 % between windows) slows all of them alike. Each record after the
    first also gets ``paired_ratio``: the median over rounds of its tokens/s over the first
    system's in the same round. ``peak_mem_gb`` is a system's own peak during its warm-up, above
    what the systems built before it hold."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    built = []
    try:
        for record, build in zip(records, builds):
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            try:
                system = build()
                built.append((record, system))
                record["warmup_s"] = timed_window(system.step, system.sync, window)
                record["peak_mem_gb"] = (torch.cuda.max_memory_allocated() - held) / 1e9
            except Exception as error:  # noqa: BLE001 - record why a system could not run, keep going
                record["error"] = failure(error)
        running = [(record, system) for record, system in built if "error" not in record]
        rates = {id(record): [] for record, _ in running}
        for _ in range(windows):
            for record, system in running:
                seconds = timed_window(system.step, system.sync, window)
                rates[id(record)].append(system.tokens_per_step * window / seconds)
        for record, system in running:
            fill_timing(record, system, rates[id(record)], record["warmup_s"], ceiling)
            record["interleaved"] = True
            if profile_steps:
                record.update(profiles(system, profile_steps))
            if running[0][0] is not record:
                first = rates[id(running[0][0])]
                record["paired_ratio"] = statistics.median(
                    mine / theirs for mine, theirs in zip(rates[id(record)], first))
                record["paired_with"] = running[0][0]["system"]
    finally:
        for _, system in built:
            system.close()
        built = running = None
        gc.collect()
        torch.cuda.empty_cache()
    for record in records:
        print(json.dumps({k: v for k, v in record.items() if k != "window_tokens_per_s"}), flush=True)
    return records
