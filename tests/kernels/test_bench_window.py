"""scripts/bench_window.py's bookkeeping (the timing itself needs a GPU): FLOPs of a windowed
causal pass and the table it writes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_window  # noqa: E402


@pytest.mark.parametrize("seqlen, window", [(10, 3), (10, 1), (10, 10), (10, 50), (7, None)])
def test_window_flops_count_the_visible_pairs(seqlen, window):
    w = seqlen if window is None else window
    pairs = sum(1 for i in range(seqlen) for j in range(seqlen) if 0 <= i - j < w)
    assert bench_window.window_flops(seqlen, window, heads=2, head_dim=8) == 3.5 * 4 * 2 * 8 * pairs


def test_markdown_states_ratios_and_checks():
    header = dict(card="card", torch="t", triton="tr", date="d", command="python x", window=4)
    ok = {part: dict(ours=1e-3, torch=2e-3, ok=True) for part in ("out", "dq", "dk", "dv")}
    records = [dict(provider="flashtrain_window", seqlen=8, head_dim=64, ms=1.0, us_per_1k_tokens=2.0,
                    tflops=3.0, check=ok),
               dict(provider="flex_window", seqlen=8, head_dim=64, ms=1.5, us_per_1k_tokens=3.0, tflops=2.0),
               dict(provider="flashtrain_full_causal", seqlen=8, head_dim=64, error="out of memory")]
    rows = [line for line in bench_window.markdown(header, records).splitlines() if line.startswith("| 64")]
    assert "1.00× | ok" in rows[0] and "1.50× | –" in rows[1] and "out of memory" in rows[2]
