"""Whether a kernel's timing rounds measured the kernel or a disturbance.

The benchmarks time each kernel in several rounds, interleaved with the other kernels of the same
cell, and keep the median round. A single slow round (10-20 % off) happens now and then and the
median absorbs it. When most rounds are slow, the median measures the disturbance: at 512 tokens a
process's first cell has had every provider 2-3x slow after its first round (attention_notes v35,
v36), a host stall the kernels cannot cause. Such a kernel's median lies well above its fastest
round, which is what ``unsteady`` looks for.
"""

import statistics

# A median round further than this (percent) above the fastest round marks a kernel as unsteady.
# Undisturbed, the rounds of one kernel in one process agree within 1-3 %.
UNSTEADY_PERCENT = 10.0
# The three timings of a bench_attention.py round, in the order of its ``rounds_ms`` entries.
BENCH_TIMINGS = ("fwd", "bwd", "fwdbwd")


def unsteady(ms: dict[str, list[float]]) -> dict[str, float]:
    """Each name whose median round is more than UNSTEADY_PERCENT above its fastest, with that
    excess in percent."""
    excess = {name: 100 * (statistics.median(rounds) / min(rounds) - 1)
              for name, rounds in ms.items() if rounds and min(rounds) > 0}
    return {name: round(value, 1) for name, value in excess.items() if value > UNSTEADY_PERCENT}


def describe(excess: dict[str, float]) -> str:
    """``unsteady``'s result as printed: ``fwdbwd +19 %, bwd +12 %``."""
    return ", ".join(f"{name} +{value:.0f} %" for name, value in excess.items())


def unsteady_bench_record(record: dict) -> dict[str, float]:
    """``unsteady`` of one bench_attention.py record's forward, backward and forward+backward
    rounds (``rounds_ms``: one [fwd, bwd, fwd+bwd] per round); empty without rounds."""
    rounds = record.get("rounds_ms") or []
    return unsteady(dict(zip(BENCH_TIMINGS, map(list, zip(*rounds)))))
