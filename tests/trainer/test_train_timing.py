"""scripts/train_timing.py (train_timing.py --interleave, --profile-steps): systems timed in alternating windows, each paired with the
first system's window of the same round, so a machine that slows down mid-run slows all alike."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import train_timing  # noqa: E402


class Clock:
    """perf_counter stood in for: advanced by the fake systems' steps."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeSystem:
    """A step costs ``cost`` seconds times the machine's slowdown, which grows with every step of
    any system (a drifting machine)."""

    def __init__(self, name, cost, clock, log, drift):
        self.name, self.cost, self.clock, self.log, self.drift = name, cost, clock, log, drift
        self.tokens_per_step, self.flops_per_token = 1000, 1e9
        self.closed = False

    def step(self):
        self.log.append(self.name)
        self.drift[0] *= 1.01
        self.clock.now += self.cost * self.drift[0]

    def sync(self):
        pass                                 # its steps take their time when called: nothing queued

    def close(self):
        self.closed = True


@pytest.fixture
def machine(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(train_timing.time, "perf_counter", clock)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(train_timing.torch.cuda, name, lambda: 0)
    for name in ("reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(train_timing.torch.cuda, name, lambda: None)
    return clock


def test_systems_alternate_windows_and_pair_each_round(machine):
    log, drift, systems = [], [1.0], {}

    def build(name, cost):
        systems[name] = FakeSystem(name, cost, machine, log, drift)
        return systems[name]

    def broken():
        raise RuntimeError("no kernel for this card\nmore detail")
    records = [{"system": "stock"}, {"system": "broken"}, {"system": "flash"}]
    train_timing.measure_interleaved(records, [lambda: build("stock", 1.0), broken,
                                              lambda: build("flash", 0.8)], window=2, windows=3, ceiling=1e15)
    # Warm-up windows one system after the other, then timed windows in turns.
    assert log == ["stock"] * 2 + ["flash"] * 2 + ["stock", "stock", "flash", "flash"] * 3
    assert records[1] == {"system": "broken", "error": "RuntimeError: no kernel for this card"}
    # The machine slows by 1 % a step: the medians drift, the paired ratio of each round does not
    # (flash's window runs right after stock's: 0.8x the cost at a 2 % higher slowdown).
    assert records[2]["paired_ratio"] == pytest.approx(1 / 0.8 / 1.01 ** 2, rel=1e-9)
    assert records[2]["paired_with"] == "stock" and "paired_ratio" not in records[0]
    assert all(len(r["window_tokens_per_s"]) == 3 and r["interleaved"] for r in (records[0], records[2]))
    assert all(system.closed for system in systems.values())


def test_host_profile_ranks_operators_by_their_own_time_per_step():
    import torch

    class Matmuls:
        def __init__(self):
            self.a = torch.randn(256, 256)

        def step(self):
            (self.a @ self.a).relu_()

        def sync(self):
            pass                             # CPU operators: done when they return
    profile = train_timing.host_profile(Matmuls(), 3)      # kernel_profile's ranking, on CPU time
    names = [name for name, _, _ in profile["top"]]
    assert "aten::mm" in names and "aten::relu_" in names
    per_step = dict((name, (ms, calls)) for name, ms, calls in profile["top"])
    assert per_step["aten::mm"][1] == 1              # one launch per step
    assert profile["total_ms_per_step"] >= sum(ms for _, ms, _ in profile["top"]) - 1e-9
