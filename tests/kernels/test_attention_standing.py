"""scripts/attention_standing.py: the grid as it stands, each cell from the latest run that timed
it, every ratio within one run."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "attention_standing.py"


def record(provider, fwdbwd, seqlen=4096, causal=False, **extra):
    return dict(provider=provider, dtype="bfloat16", head_dim=64, seqlen=seqlen, causal=causal,
                dropout_p=0.0, fwd_tflops=fwdbwd, bwd_tflops=fwdbwd, fwdbwd_tflops=fwdbwd, **extra)


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def row(text, seqlen):
    return next(line for line in text.splitlines() if line.startswith(f"| bfloat16 | 64 | {seqlen} |"))


def test_each_cell_comes_whole_from_the_latest_run_that_timed_it(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(dict(card="card", torch="2.11", date="2026-12-02", command="python bench", records=[
        record("flashtrain", 300, check_passed=True), record("sdpa_flash", 200),
        record("sdpa_cudnn", 400), record("flashtrain", 100, seqlen=1024, check_passed=True),
        record("sdpa_cudnn", 200, seqlen=1024),
        dict(provider="flashtrain", sweep="memory", seqlen=65536, peak_mem_gb=1.0)])))
    # A later re-run of the 4K cell, kept as a named run in a record file (bench output nested
    # the way some runs keep it), and a run of other measurements that is not a grid.
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps(dict(runs=[
        dict(name="rerun", command="python rerun", versions=dict(card="card2", date="2026-12-03"),
             records=dict(records=[
            record("flashtrain", 450, check_passed=True), record("sdpa_cudnn", 440)])),
        dict(name="diagnostic", records=[{"measure": "bwd", "tflops": {"ws": 1}}])])))
    result = run(grid, f"{notes}:rerun")
    assert result.returncode == 0, result.stderr
    # 4K from the re-run: cuDNN of that run (440), not the grid's 400; no FA2 in that run.
    assert row(result.stdout, 4096).endswith("| 450 / 450 / 450 | sdpa_cudnn 440 / 440 / 440 | **1.02** | – "
                                             "| passed | `notes.json:rerun` |")
    assert row(result.stdout, 1024).endswith("| sdpa_cudnn 200 / 200 / 200 | **0.50** | – | passed | "
                                             "`grid.json` |")
    assert "- bfloat16, head dim 64, causal 0, dropout 0.0: 0.50–1.02 (1 of 2 cells at or past it)" \
        in result.stdout
    # Sources in the other order: the older grid wins every cell it has.
    assert "**0.75** | 1.50 |" in row(run(f"{notes}:rerun", grid).stdout, 4096)

    out = tmp_path / "standing.md"
    assert run(grid, "--md", out).returncode == 0
    assert out.read_text().startswith("# Attention grid") and f"attention_standing.py {grid}`" in out.read_text()
    # Each run's card, software, date and command, from wherever its record keeps them.
    assert "- `grid.json`: card; PyTorch 2.11; 2026-12-02; `python bench`" in out.read_text()
    assert "- `notes.json:rerun`: card2; 2026-12-03; `python rerun`" in run(grid, f"{notes}:rerun").stdout


def test_a_run_left_out_is_named_with_its_reason_and_must_exist(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(dict(card="card", records=[
        record("flashtrain", 300, check_passed=True), record("sdpa_cudnn", 400)])))
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps(dict(runs=[dict(name="noisy", records=[
        record("flashtrain", 100, check_passed=True), record("sdpa_cudnn", 400)])])))
    result = run(grid, "--left-out", f"{notes}:noisy=rounds varied by 65 %")
    assert result.returncode == 0, result.stderr
    assert "**0.75**" in row(result.stdout, 4096)                  # the cell from grid.json only
    assert "Runs left out:\n\n- `notes.json:noisy`: rounds varied by 65 %" in result.stdout
    assert f"--left-out '{notes}:noisy=rounds varied by 65 %'`" in result.stdout
    assert "no run named 'typo'" in run(grid, "--left-out", f"{notes}:typo=why").stderr
    assert "expected FILE:RUN=REASON" in run(grid, "--left-out", f"{notes}:noisy").stderr


def test_sources_that_are_not_grids_are_named(tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps(dict(runs=[dict(name="grid", records=[record("flashtrain", 1)]),
                                           dict(name="diagnostic", records=[{"measure": "bwd"}])])))
    missing = run(f"{notes}:nope")
    assert missing.returncode != 0
    assert "no run named 'nope'" in missing.stderr and "(runs holding bench records: grid)" in missing.stderr
    assert "holds no bench_attention.py records" in run(f"{notes}:diagnostic").stderr
    assert "no such file" in run(tmp_path / "absent.json").stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert "not JSON" in run(broken).stderr


def test_a_cell_just_behind_is_not_rounded_up_to_level(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(dict(card="card", records=[
        record("flashtrain", 499, check_passed=True), record("sdpa_cudnn", 500),
        record("flashtrain", 1000, seqlen=1024, check_passed=True), record("sdpa_cudnn", 1000, seqlen=1024)])))
    result = run(grid)
    assert result.returncode == 0, result.stderr
    assert "| **0.998** |" in row(result.stdout, 4096) and "| **1.00** |" in row(result.stdout, 1024)
    assert "0.998–1.00 (1 of 2 cells at or past it)" in result.stdout


def test_a_cell_whose_rounds_were_mostly_slow_is_marked_unsteady(tmp_path):
    # The 512 cell: flashtrain's forward+backward rounds 0.905 / 0.873 / 0.734 ms (v35), a median
    # 19 % above the fastest. The 1K cell: one slow round, which the median absorbs, and a slow
    # forward alone, which the forward+backward ratio does not use.
    disturbed = [[0.15, 0.638, 0.905], [0.151, 0.964, 0.873], [0.151, 0.585, 0.734]]
    one_slow = [[0.3, 1.0, 1.3], [0.3, 1.0, 1.6], [0.4, 1.0, 1.3]]
    steady = [[0.2, 0.8, 1.0], [0.2, 0.8, 1.0], [0.2, 0.8, 1.0]]
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(dict(card="card", records=[
        record("flashtrain", 300, seqlen=512, check_passed=True, rounds_ms=disturbed),
        record("sdpa_cudnn", 400, seqlen=512, rounds_ms=steady),
        record("flashtrain", 300, seqlen=1024, check_passed=True, rounds_ms=one_slow),
        record("sdpa_cudnn", 400, seqlen=1024, rounds_ms=[[0.2, 0.8, 1.0], [0.3, 0.8, 1.0],
                                                          [0.3, 0.8, 1.0]])])))
    result = run(grid)
    assert result.returncode == 0, result.stderr
    assert "| **0.75** (unsteady) |" in row(result.stdout, 512)
    assert "| **0.75** |" in row(result.stdout, 1024)
    assert ("- bfloat16, head dim 64, seqlen 512, causal 0, dropout 0.0 (`grid.json`): flashtrain +19 %"
            in result.stdout)
    assert "seqlen 1024, causal 0" not in result.stdout
