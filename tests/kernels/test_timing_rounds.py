"""scripts/timing_rounds.py: whether a kernel's timing rounds measured the kernel or a
disturbance."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import timing_rounds  # noqa: E402


def test_a_median_round_more_than_ten_percent_above_the_fastest_marks_a_name_unsteady():
    # The first: a cell where every round after the first was slow (v36); "one slow": a single
    # outlier, which the median absorbs.
    ms = {"forward": [0.1345, 0.4158, 0.4103, 0.4023], "steady": [1.00, 1.02, 1.01, 1.00],
          "one slow": [6.907, 7.729, 7.218, 7.302], "under": [1.0, 1.0999, 1.0999],
          "over": [1.0, 1.1001, 1.1001], "none": []}
    assert timing_rounds.unsteady(ms) == {"forward": 202.1, "over": 10.0}


def test_a_bench_record_is_judged_by_each_of_its_three_timings():
    # bench_attention.py's rounds: [forward, backward, forward+backward] each (v35's disturbed
    # 512-token cell).
    record = dict(rounds_ms=[[0.15, 0.638, 0.905], [0.151, 0.964, 0.873], [0.151, 0.585, 0.734]])
    assert timing_rounds.unsteady_bench_record(record) == {"fwdbwd": 18.9}
    assert timing_rounds.unsteady_bench_record({}) == {}
    assert timing_rounds.unsteady_bench_record(dict(rounds_ms=[[1.0, 2.0, 3.0]])) == {}


def test_the_excess_is_described_in_whole_percent():
    assert timing_rounds.describe({"fwdbwd": 18.9, "bwd": 12.2}) == "fwdbwd +19 %, bwd +12 %"
    assert timing_rounds.describe({}) == ""
