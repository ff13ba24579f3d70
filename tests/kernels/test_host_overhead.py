"""scripts/host_overhead.py: its arguments, records and printed line on the CPU; the timing itself
on the card."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import host_overhead  # noqa: E402


def test_a_pass_is_host_bound_when_its_issue_takes_as_long_as_its_gpu_work():
    fast_host = host_overhead.summarize([0.030, 0.032, 0.031], [0.130, 0.131, 0.129], 0.135)
    assert fast_host["issue_us"] == 31.0 and fast_host["gpu_us"] == 130.0
    assert fast_host["bench_us"] == 135.0 and not fast_host["host_bound"]
    assert fast_host["issue_loops_us"] == [30.0, 32.0, 31.0]
    slow_host = host_overhead.summarize([0.21, 0.20, 0.22], [0.13, 0.13, 0.13], 0.19)
    assert slow_host["host_bound"]
    record = dict(provider="flashtrain", head_dim=128, seqlen=512, causal=True, dropout_p=0.0,
                  forward=slow_host, backward=fast_host)
    assert host_overhead.line(record) == (
        "flashtrain d=128 N=512 causal=1 p=0.0: forward issue 210 / GPU 130 / do_bench 190 us "
        "HOST BOUND; backward issue 31 / GPU 130 / do_bench 135 us")


@pytest.mark.parametrize("argv, message", [
    (["--seqlens", "1000"], "multiple of every seqlen"),
    (["--head-dims", "96"], "divide the hidden size"),
    (["--dropouts", "1.0"], "--dropouts must be in [0, 1)"),
    (["--calls", "0"], "at least 1"),
    (["--providers", "flex"], "invalid choice"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        host_overhead.parse_args(argv)
    assert message in capsys.readouterr().err


def test_without_a_gpu_it_says_so(monkeypatch):
    monkeypatch.setattr(host_overhead.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        host_overhead.main(["--seqlens", "512"])


@pytest.mark.gpu
def test_one_cell_on_the_card(tmp_path):
    host_overhead.main(["--head-dims", "64", "--seqlens", "512", "--causal", "1", "--calls", "10",
                        "--loops", "2", "--out", str(tmp_path / "host.json")])
    records = json.loads((tmp_path / "host.json").read_text())["records"]
    assert [r["provider"] for r in records] == ["flashtrain", "sdpa_cudnn"]
    for record in records:
        for name in ("forward", "backward"):
            assert 0 < record[name]["issue_us"] and 0 < record[name]["gpu_us"]
