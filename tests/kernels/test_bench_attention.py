"""scripts/bench_attention.py's bookkeeping (the timing itself needs a GPU): which cells it measures,
that it saves after every cell, and its arguments."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_attention  # noqa: E402


def test_the_grid_saves_after_every_cell_and_measures_only_the_cells_asked_for(monkeypatch, tmp_path):
    measured = []

    def fake_cell(providers, batch, seqlen, heads, head_dim, dtype, causal, dropout_p):
        measured.append((seqlen, causal, dropout_p, tuple(providers)))
        return [dict(bench_attention.base_record(p, batch, seqlen, heads, head_dim, dtype, causal,
                                                 dropout_p), fwdbwd_tflops=1.0) for p in providers]
    monkeypatch.setattr(bench_attention, "measure_cell", fake_cell)
    saved = []
    out = tmp_path / "grid.json"

    def save(records):
        bench_attention.write_json(out, dict(complete=False, records=records))
        saved.append(len(records))
    records = bench_attention.run_grid([torch.bfloat16], [64], [2048, 4096], ["flashtrain", "flex"],
                                       log=lambda record: None, causals=[True], dropouts=[0.1],
                                       save=save)
    # Two cells (causal, dropout 0.1 only); flex has no dropout, so it is recorded as skipped.
    assert [(m[0], m[1], m[2]) for m in measured] == [(2048, True, 0.1), (4096, True, 0.1)]
    assert all(m[3] == ("flashtrain",) for m in measured)
    assert saved == [2, 4] and len(records) == 4
    assert "FlexAttention has no attention dropout" in records[1]["error"]
    assert len(json.loads(out.read_text())["records"]) == 4 and not list(tmp_path.glob("*.tmp"))


def test_arguments_select_part_of_the_grid_and_bad_ones_are_named(capsys):
    args = bench_attention.parse_args(["--causal", "1", "--dropouts", "0.1", "--dtypes", "bfloat16"])
    assert args.causal == [1] and args.dropouts == [0.1] and args.dtypes == ["bfloat16"]
    defaults = bench_attention.parse_args([])
    assert defaults.causal == [0, 1] and defaults.dropouts == [0.0, 0.1]
    with pytest.raises(SystemExit):
        bench_attention.parse_args(["--dropouts", "1.5"])
    assert "--dropouts must be in [0, 1)" in capsys.readouterr().err


def test_the_printed_line_warns_of_unsteady_rounds():
    record = dict(bench_attention.base_record("flashtrain", 32, 512, 16, 128, torch.bfloat16, False,
                                              0.0), fwd_tflops=455.0, bwd_tflops=294.0,
                  fwdbwd_tflops=329.0, unsteady={"fwdbwd": 18.9})
    line = bench_attention.record_line(record)
    assert "flashtrain" in line and "d=128" in line and "455.0 /  294.0 /  329.0 TF/s" in line
    assert line.endswith("UNSTEADY rounds (median above fastest: fwdbwd +19 %): re-run")
    assert "UNSTEADY" not in bench_attention.record_line(dict(record, unsteady={}))
