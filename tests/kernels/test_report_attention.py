"""scripts/report_attention.py: the Markdown and plots it writes from a benchmark's JSON (the
benchmark itself needs a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "report_attention.py"


def cell(provider, fwd, fwdbwd, **extra):
    return dict(provider=provider, dtype="bfloat16", head_dim=64, seqlen=1024, causal=True,
                dropout_p=0.1, fwd_tflops=fwd, fwdbwd_tflops=fwdbwd, **extra)


def write_run(path: Path, records, **extra):
    path.write_text(json.dumps(dict(card="card", torch="t", triton="tr", cuda="c", cudnn=1,
                                    python="3", date="2026-12-02", command="python x", seconds=5,
                                    records=records, **extra)))


def test_a_run_without_a_memory_sweep_gets_no_memory_table_or_plot(tmp_path):
    run = tmp_path / "grid.json"
    write_run(run, [cell("flashtrain", 300, 250, rel_err=[1e-3] * 4, torch_rel_err=[2e-3] * 4,
                         check_passed=True),
                    cell("sdpa_flash", 200, 200), cell("sdpa_cudnn", 180, 275)])
    subprocess.run([sys.executable, str(SCRIPT), str(run)], check=True, capture_output=True)
    text = (tmp_path / "grid.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 64 | 1024"))
    assert "**300 / 250**" in row and row.endswith("| 1.25 | 0.91 |")    # vs FA2, vs cuDNN (the best)
    assert "Not run here (--skip-memory-sweep)." in text and "grid_memory.png" not in text
    assert (tmp_path / "grid_speed.png").exists() and not (tmp_path / "grid_memory.png").exists()

    # The hand-written analysis below the marker survives a re-run.
    (tmp_path / "grid.md").write_text(text + "\nA reading of the run.\n")
    subprocess.run([sys.executable, str(SCRIPT), str(run)], check=True, capture_output=True)
    assert (tmp_path / "grid.md").read_text().endswith("<!-- analysis -->\n\nA reading of the run.\n")


def test_a_run_cut_short_says_so(tmp_path):
    run = tmp_path / "cut.json"
    write_run(run, [cell("flashtrain", 300, 250), cell("sdpa_flash", 200, 200)], complete=False)
    subprocess.run([sys.executable, str(SCRIPT), str(run)], check=True, capture_output=True)
    assert "**This run was cut short**" in (tmp_path / "cut.md").read_text()
