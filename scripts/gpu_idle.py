"""Where a GPU sits idle during a profiled stretch of training steps.

A step's wall time minus the time its kernels run is time in which no kernel, copy or memset runs.
``kernel_profile`` (train_timing.py) gives the second number; this module says where in the step
the first one falls: the idle intervals between consecutive device activities, each named by the
activity before and after it. Twelve gaps of 100 µs before one kernel of each layer point at that
layer's host work; one long gap before the first kernel of a step points at the step's start (a
batch copy, the optimizer, a sync).

The input is the trace the PyTorch profiler exports (Chrome trace JSON, ``export_chrome_trace``):
events of category ``kernel``, ``gpu_memcpy`` and ``gpu_memset`` with a start ``ts`` and a
duration ``dur`` in microseconds. Activities on several streams may overlap; idle time is time
covered by none of them.
"""

import json
from collections import defaultdict
from pathlib import Path

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def device_activities(trace: dict) -> list[tuple[float, float, str]]:
    """(start µs, end µs, name) of every device activity in an exported trace, by start."""
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    activities = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), str(e.get("name", "?")))
                  for e in events if isinstance(e, dict) and e.get("cat") in DEVICE_CATEGORIES]
    return sorted(activities)


def idle_gaps(activities) -> list[tuple[float, str, str]]:
    """(idle µs, activity before, activity after) for every interval between the first activity's
    start and the last one's end that no activity covers. "Before" is the activity that ended
    last before the gap (on any stream), "after" the one that starts it."""
    gaps = []
    covered_until, last_name = None, None
    for start, end, name in activities:
        if covered_until is not None and start > covered_until:
            gaps.append((start - covered_until, last_name, name))
        if covered_until is None or end >= covered_until:
            covered_until, last_name = end, name
    return gaps


def summarize(activities, steps: int, top: int = 12, short: int = 96) -> dict:
    """Idle time per step, and where it is: the largest gaps, and idle time summed by the activity
    that follows the gap (the one the GPU waited to start), both per step."""
    if not activities:
        return {"idle_ms_per_step": 0.0, "busy_ms_per_step": 0.0, "gaps_per_step": 0.0,
                "largest": [], "by_next": []}
    gaps = idle_gaps(activities)
    span = max(end for _, end, _ in activities) - activities[0][0]
    idle = sum(gap for gap, _, _ in gaps)
    by_next = defaultdict(lambda: [0.0, 0])
    for gap, _, after in gaps:
        by_next[after[:short]][0] += gap
        by_next[after[:short]][1] += 1
    ranked = sorted(by_next.items(), key=lambda item: item[1][0], reverse=True)[:top]
    return {
        "idle_ms_per_step": idle / 1e3 / steps,
        "busy_ms_per_step": (span - idle) / 1e3 / steps,
        "gaps_per_step": len(gaps) / steps,
        "largest": [[round(gap, 1), before[:short], after[:short]]
                    for gap, before, after in sorted(gaps, reverse=True)[:top]],
        "by_next": [[name, total / 1e3 / steps, count / steps] for name, (total, count) in ranked],
    }


def summarize_trace(path: Path, steps: int, top: int = 12) -> dict:
    return summarize(device_activities(json.loads(Path(path).read_text())), steps, top)
