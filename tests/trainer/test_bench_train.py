"""scripts/bench_train.py: the two-pass A/B system swaps the attention backward for its own steps only;
the CUDA-graph systems are built at every dropout."""

import sys

import torch

from .helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench_train  # noqa: E402
from kernels import _backward  # noqa: E402


def test_two_pass_system_turns_the_fused_pass_off_during_its_own_steps():
    # The default at head dim 64 with dropout is the fused pass; no GPU is needed to choose tiles.
    fused_now = lambda: _backward.dkdv_tiles(64, torch.device("cuda"), torch.bfloat16, True, True).fused
    seen = []

    class Trainer:
        def train_step(self):
            seen.append(fused_now())
            return {}
    for two_pass in (True, False):
        system = object.__new__(bench_train.TrainerSystem)
        system.trainer, system.two_pass = Trainer(), two_pass
        system.step()
    assert seen == [False, True]
    assert fused_now()                       # restored after the step


def test_cuda_graph_systems_run_with_and_without_dropout(monkeypatch):
    """With dropout too: flash then draws its seeds on the device (tests/kernels/test_device_seeds.py)."""
    chosen = []
    monkeypatch.setattr(bench_train, "time_systems",
                        lambda args, systems, ceiling: chosen.append(systems) or [r for r, _ in systems])
    args = type("Args", (), dict(settings=["1024:16"], dropouts=[0.1, 0.0], corpus="C", cache="K",
                                 num_proc=1, systems=["stock_sdpa_graphs", "flashtrain_flash_graphs"]))()
    bench_train.part_grid(args, "W", 1.0, [])
    for systems, dropout in zip(chosen, (0.1, 0.0)):
        (stock_record, stock_build), (flash_record, flash_build) = systems
        assert stock_record["system"] == "stock_sdpa_graphs" and stock_build.keywords == {"mode": "reduce-overhead"}
        assert stock_record["attn_dropout"] == flash_record["attn_dropout"] == dropout
        assert flash_record["compile_mode"] == "reduce-overhead"
        assert "trainer.compile_mode=reduce-overhead" in flash_build.args[0]


def test_bert_graphs_runs_compile_with_cuda_graphs_and_a_fixed_target_count(monkeypatch):
    chosen = []
    monkeypatch.setattr(bench_train, "time_systems",
                        lambda args, systems, ceiling: chosen.extend(systems) or [r for r, _ in systems])
    monkeypatch.setattr(bench_train, "build_data", lambda *a, **k: type(
        "Data", (), {"train": type("Train", (), {"real_fraction": 0.95})()})())
    args = type("Args", (), dict(corpus="C", cache="K", num_proc=1, bert_batch=16, bert_max_predictions=80,
                                 bert_runs=["flash:graphs:rows", "sdpa:graphs", "sdpa:compiled"]))()
    bench_train.part_bert(args, "W", 1.0, [])
    (rows, rows_build), (sdpa, sdpa_build), (plain, plain_build) = chosen
    assert (rows["system"], sdpa["system"], plain["system"]) == (
        "flashtrain_flash_graphs", "flashtrain_sdpa_graphs", "flashtrain_sdpa")
    for build in (rows_build, sdpa_build):
        assert "trainer.compile_mode=reduce-overhead" in build.args[0] and "trainer.compile=True" in build.args[0]
    assert "data.mlm_max_predictions=80" in rows_build.args[0]
    assert not any("compile_mode" in o for o in plain_build.args[0])
    assert rows["layout"] == "rows" and "data.mlm_pack_sequences=true" in rows_build.args[0]


def test_report_takes_bench_outputs_or_a_collection_and_refuses_a_part_twice(tmp_path):
    import json
    import subprocess
    collection = json.loads((ROOT / "docs" / "results" / "train_h100.json").read_text())
    for name in ("grid", "long"):
        (tmp_path / f"{name}.json").write_text(json.dumps(collection["parts"][name]))
    (tmp_path / "both.json").write_text(json.dumps({"parts": {n: collection["parts"][n]
                                                               for n in ("grid", "long")}}))

    def report(*files):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "report_train.py"),
                               *map(str, files)], capture_output=True, text=True)
    separate, together = report(tmp_path / "grid.json", tmp_path / "long.json"), report(tmp_path / "both.json")
    assert separate.returncode == 0, separate.stderr
    assert "### grid" in separate.stdout and "### long" in separate.stdout
    assert separate.stdout == together.stdout
    twice = report(tmp_path / "grid.json", tmp_path / "both.json")
    assert twice.returncode == 2 and "part 'grid' is in both" in twice.stderr
