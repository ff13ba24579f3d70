"""scripts/gpu_idle.py: the GPU's idle intervals in an exported profiler trace, computed by hand on
small traces (overlapping streams, host events ignored) and read from a real exported trace."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import gpu_idle  # noqa: E402


def event(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_gaps_between_activities_are_named_by_their_neighbours():
    trace = {"traceEvents": [
        event("cpu_op", "aten::mm", 0, 500),           # host events do not count
        event("kernel", "gemm", 100, 50),              # 100-150
        event("gpu_memset", "Memset (Device)", 160, 5),  # gap 10 before it, 165
        event("kernel", "attention", 200, 100),        # gap 35, 200-300
        event("kernel", "norm", 310, 10),              # gap 10, 310-320
    ]}
    activities = gpu_idle.device_activities(trace)
    assert [name for _, _, name in activities] == ["gemm", "Memset (Device)", "attention", "norm"]
    assert gpu_idle.idle_gaps(activities) == [(10.0, "gemm", "Memset (Device)"),
                                              (35.0, "Memset (Device)", "attention"),
                                              (10.0, "attention", "norm")]
    summary = gpu_idle.summarize(activities, steps=1)
    assert summary["idle_ms_per_step"] == pytest.approx(55e-3)
    assert summary["busy_ms_per_step"] == pytest.approx((220 - 55) * 1e-3)
    assert summary["largest"][0] == [35.0, "Memset (Device)", "attention"]
    assert summary["by_next"][0] == ["attention", pytest.approx(35e-3), 1.0]


def test_overlapping_streams_leave_no_gap_where_either_runs():
    activities = gpu_idle.device_activities([
        event("kernel", "long", 0, 100),          # stream 1: 0-100
        event("kernel", "short", 20, 10),         # stream 2 inside it: no gap after it
        event("gpu_memcpy", "Memcpy HtoD", 90, 30),  # overlaps the end: 90-120
        event("kernel", "next", 150, 10),         # gap of 30 after the copy, the last to end
    ])
    assert gpu_idle.idle_gaps(activities) == [(30.0, "Memcpy HtoD", "next")]


def test_per_step_numbers_divide_by_the_steps_and_sum_by_the_kernel_waited_for():
    activities = []
    for step in range(2):                          # two steps of three "layers"
        base = step * 1000
        for layer in range(3):
            start = base + layer * 100
            activities.append((start, start + 60.0, "attention"))  # then 40 idle before the next
    summary = gpu_idle.summarize(sorted(activities), steps=2)
    # two gaps of 40 within each step and one of 1000 - 260 = 740 between the steps
    assert summary["gaps_per_step"] == 2.5
    assert summary["idle_ms_per_step"] == pytest.approx((4 * 40 + 740) / 2 / 1e3)
    assert summary["largest"][0] == [740.0, "attention", "attention"]
    assert summary["by_next"] == [["attention", pytest.approx((4 * 40 + 740) / 2 / 1e3), 2.5]]


def test_an_empty_trace_has_no_idle_time():
    assert gpu_idle.summarize([], steps=3)["idle_ms_per_step"] == 0.0


def test_reads_a_trace_the_profiler_exported(tmp_path):
    """The format is the profiler's own: on this CPU-only machine it holds host events only, which
    must be parsed and ignored (a GPU run adds the kernel events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        torch.ones(64, 64) @ torch.ones(64, 64)
    path = tmp_path / "trace.json"
    profiler.export_chrome_trace(str(path))
    assert any(e.get("cat") == "cpu_op" for e in json.loads(path.read_text())["traceEvents"])
    assert gpu_idle.summarize_trace(path, steps=1)["gaps_per_step"] == 0.0
