"""scripts/reproduce.py report: rows per variant series, time against the series' own 1K run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import compose_run

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))          # tests import reproduce from there


def record(name, seconds, ppl, context=None):
    tokens = 1_000_000
    metrics = [{"step": 10, "tokens": tokens, "tokens_per_s": tokens / seconds, "loss": 3.0},
               {"step": 10, "val_loss": 2.0, "val_ppl": ppl}]
    evaluation = None if context is None else {"runs": [{"trained_context": context, "contexts": [
        {"context": 1024, "effective_context": min(1024, context), "ppl": ppl + 1}]}]}
    return {"name": name, "command": "-m trainer", "returncode": 0, "wall_s": seconds, "metrics": metrics,
            "tokens": tokens, "evaluation": evaluation, "date": "2026-01-01"}


def test_report_groups_variant_series_and_sums_stages(tmp_path):
    records = [record("1k", 100, 10, 1024), record("4k", 150, 30, 4096), record("1k_x", 200, 11, 1024),
               record("4k_x", 220, 31, 4096), record("4k_x_lr1", 300, 40), record("1k_stage1", 50, 20),
               record("1k_to_4k", 60, 15, 4096)]
    for entry in records:
        (tmp_path / f"{entry['name']}.json").write_text(json.dumps(entry))
    result = subprocess.run([sys.executable, "scripts/reproduce.py", "report", str(tmp_path),
                             "--contexts", "1024"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1].strip() for line in result.stdout.splitlines()[2:] if line.startswith("|")]
    assert rows == ["1k", "4k", "1k_to_4k", "1k_x", "4k_x", "4k_x_lr1"]
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in result.stdout.splitlines()[2:] if line.startswith("|")}
    assert table["4k"][2:4] == ["150", "1.50"]            # against 1k
    assert table["4k_x"][2:4] == ["220", "1.10"]          # against 1k_x, its own series
    assert table["1k_to_4k"][1:4] == ["2.0M", "110", "1.10"]   # both stages: 50 s + 60 s, 2M tokens
    assert table["4k_x_lr1"][0] == "–" and table["4k_x_lr1"][5] == "–"   # not evaluated
    assert table["4k"][5] == "31.00 (at 1024)"


def run_report(tmp_path, records, *extra):
    for entry in records:
        (tmp_path / f"{entry['name']}.json").write_text(json.dumps(entry))
    result = subprocess.run([sys.executable, "scripts/reproduce.py", "report", str(tmp_path), "--contexts", "1024",
                             *extra], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_short_to_long_rows_count_the_shared_first_stage_in_every_arm(tmp_path):
    out = run_report(tmp_path, [record("s2l_stage1", 80, 9), record("s2l_1k", 20, 8, 1024),
                                record("s2l_4k", 40, 7, 4096)], "--rows", "s2l_1k", "s2l_4k")
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in out.splitlines()[2:] if line.startswith("|")}
    assert table["s2l_1k"][1:4] == ["2.0M", "100", "1.00"]
    assert table["s2l_4k"][1:4] == ["2.0M", "120", "1.20"]     # (80 + 40) / (80 + 20)


def test_table2_times_each_attention_to_the_eager_runs_final_perplexity(tmp_path):
    def curve(name, seconds_per_window, ppls):
        metrics, tokens = [], 0
        for step, ppl in enumerate(ppls, start=1):
            tokens += 1000
            metrics += [{"step": step, "tokens": tokens, "tokens_per_s": 1000 / seconds_per_window, "loss": 1.0},
                        {"step": step, "val_loss": 1.0, "val_ppl": ppl}]
        return {"name": name, "command": "-m trainer", "returncode": 0, "metrics": metrics, "tokens": tokens}
    out = run_report(tmp_path, [curve("t2_eager", 4.0, [50, 30, 20]), curve("t2_flash", 1.0, [40, 19, 15]),
                                curve("t2_sdpa", 2.0, [60, 50, 25])])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.split("time to val ppl 20.00")[1].splitlines()[2:] if line.startswith("|")}
    assert rows["t2_eager"][2:] == ["12", "250", "20.00", "12", "1.00"]
    assert rows["t2_flash"][5:] == ["2", "6.00"]         # 19 <= 20 at its second validation: 2 s
    assert rows["t2_sdpa"][5:] == ["not reached", "–"]


def test_a_tagged_second_stage_reads_the_first_stage_of_its_own_series(tmp_path):
    import argparse
    import reproduce
    args = argparse.Namespace(tag="_ntk", corpus="C", cache="K", num_proc=1, extra=["model.extend_method=ntk"])
    for run in ("s2l_2k", "1k_to_4k"):
        (first, _), (second, overrides) = reproduce.STAGES[run]
        command = " ".join(reproduce.stage_command(second, overrides, args, tmp_path))
        assert f"model.init_from={tmp_path}/{first}_ntk/model.pt" in command
        assert f"hydra.run.dir={tmp_path}/{second}_ntk" in command and command.endswith("extend_method=ntk")


def test_each_progressive_stage_continues_the_stage_before_it(tmp_path):
    import argparse
    import reproduce
    args = argparse.Namespace(tag="_s2", corpus="C", cache="K", num_proc=1, extra=[])
    for run, contexts in (("p2l_1k", ["1024", "1024"]), ("p2l_2k", ["2048", "2048"]), ("p2l_4k", ["2048", "4096"])):
        stages = reproduce.STAGES[run]
        assert "trainer.max_steps=549" in stages[0][1]
        for (previous, _), (name, overrides), seqlen in zip(stages, stages[1:], contexts):
            command = " ".join(reproduce.stage_command(name, overrides, args, tmp_path))
            assert f"model.init_from={tmp_path}/{previous}_s2/model.pt" in command
            assert f"data.seqlen={seqlen}" in command
            assert f"trainer.micro_batch_size={16 * 1024 // int(seqlen)}" in command


def test_run_trains_a_shared_stage_once_and_reuses_a_finished_one(tmp_path, monkeypatch):
    import argparse
    import reproduce
    trained = []

    def fake_stage(name, overrides, args, runs):
        trained.append(name)
        (runs / (name + args.tag)).mkdir(parents=True, exist_ok=True)
        (runs / (name + args.tag) / "model.pt").write_bytes(b"")
        return {"name": name + args.tag, "returncode": 0, "metrics": []}

    monkeypatch.setattr(reproduce, "run_stage", fake_stage)
    args = argparse.Namespace(out=tmp_path / "out", runs=str(tmp_path / "runs"), only=["p2l_4k", "p2l_2k"],
                              tag="", no_eval=True)
    reproduce.run(args)
    assert trained == ["p2l_stage1", "p2l_mid2k", "p2l_4k", "p2l_2k"]
    args.only = ["p2l_1k"]
    reproduce.run(args)                  # a later command on the same runs directory
    assert trained[4:] == ["p2l_mid1k", "p2l_1k"]
    assert json.loads((tmp_path / "out" / "p2l_4k.json").read_text())["returncode"] == 0


def test_a_stage_record_carries_the_environment_its_run_recorded(tmp_path, monkeypatch):
    import argparse
    import reproduce

    def fake_trainer(command, cwd):
        run_dir = Path(next(a for a in command if a.startswith("hydra.run.dir=")).split("=", 1)[1])
        run_dir.mkdir(parents=True)
        starts = [{"code": {"commit": "old"}}, {"code": {"commit": "abc123"}, "device": "NVIDIA H200"}]
        (run_dir / "environment.json").write_text(json.dumps({"starts": starts}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(reproduce.subprocess, "run", fake_trainer)
    args = argparse.Namespace(tag="", corpus="C", cache="K", num_proc=1, extra=[])
    record = reproduce.run_stage("1k", ["experiment=repro_linux_1k"], args, tmp_path)
    assert record["environment"] == {"code": {"commit": "abc123"}, "device": "NVIDIA H200"}   # the last start


def test_progressive_rows_count_every_earlier_stage(tmp_path):
    out = run_report(tmp_path, [record("p2l_stage1", 60, 9), record("p2l_mid1k", 20, 8), record("p2l_mid2k", 25, 8),
                                record("p2l_1k", 20, 8, 1024), record("p2l_4k", 40, 7, 4096)])
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in out.splitlines()[2:] if line.startswith("|")}
    assert list(table) == ["p2l_1k", "p2l_4k"]                 # earlier stages are not rows
    assert table["p2l_1k"][1:4] == ["3.0M", "100", "1.00"]
    assert table["p2l_4k"][1:4] == ["3.0M", "125", "1.25"]     # (60 + 25 + 40) / (60 + 20 + 20)


def test_sixty_four_sequence_arms_keep_the_sequences_and_the_tokens_of_the_1k_arm():
    import reproduce
    import reproduce_recipes

    def setting(run):
        overrides = dict(o.split("=", 1) for o in reproduce.STAGES[run][-1][1])
        return {key: int(overrides[f"trainer.{key}"]) if f"trainer.{key}" in overrides else None
                for key in ("micro_batch_size", "grad_accum", "max_steps")} | {"seqlen": int(overrides["data.seqlen"])}

    from omegaconf import OmegaConf
    stage2 = OmegaConf.load(ROOT / "configs/experiment/repro_linux_s2l_stage2.yaml").trainer
    one_k = setting("s2l_1k") | {"grad_accum": stage2.grad_accum, "max_steps": stage2.max_steps}
    tokens = one_k["micro_batch_size"] * one_k["grad_accum"] * one_k["max_steps"] * 1024
    for run in ("s2l_2k_seq64", "s2l_4k_seq64", "s2l_2k_seq64_sqrtlr", "s2l_4k_seq64_sqrtlr"):
        arm = setting(run)
        assert arm["micro_batch_size"] * arm["grad_accum"] == 64
        arm_tokens = 64 * arm["seqlen"] * arm["max_steps"]
        assert tokens <= arm_tokens < tokens * 1.01
        assert reproduce.BASELINE[run] == "s2l_1k"
    lr = {run: dict(o.split("=", 1) for o in reproduce.STAGES[run][-1][1]).get("optim.lr")
          for run in ("s2l_4k_seq64", "s2l_2k_seq64_sqrtlr", "s2l_4k_seq64_sqrtlr")}
    assert lr["s2l_4k_seq64"] is None           # the stage's configured rate
    assert float(lr["s2l_2k_seq64_sqrtlr"]) == pytest.approx(OmegaConf.load(
        ROOT / "configs/experiment/repro_linux_s2l_stage2.yaml").optim.lr * 2 ** 0.5, rel=1e-3)
    assert float(lr["s2l_4k_seq64_sqrtlr"]) == pytest.approx(2 * reproduce_recipes.S2L_STAGE2_LR)


@pytest.mark.parametrize("name, divisor", [("halflr", 2), ("quarterlr", 4)])
def test_lower_learning_rate_arms_differ_from_the_s2l_arms_only_in_the_rate(name, divisor):
    import reproduce
    import reproduce_recipes
    for k in (1, 2, 4):
        plain, lower = reproduce.STAGES[f"s2l_{k}k"], reproduce.STAGES[f"s2l_{k}k_{name}"]
        assert lower[0] == plain[0]                                   # the shared first stage
        extra = [o for o in lower[1][1] if o not in plain[1][1]]
        assert [o for o in plain[1][1] if o not in lower[1][1]] == []
        assert len(extra) == 1 and extra[0].startswith("optim.lr=")
        assert float(extra[0].split("=")[1]) == pytest.approx(reproduce_recipes.S2L_STAGE2_LR / divisor)
    assert reproduce.BASELINE[f"s2l_4k_{name}"] == f"s2l_1k_{name}"
    assert reproduce.series_of("s2l_4k_halflr_h200") == ("s2l_4k_halflr", "_h200")


def test_mixed_context_arms_are_the_half_rate_arms_with_1k_micro_batches_mixed_in():
    import reproduce
    for k in (1, 2, 4):
        half, mixed = reproduce.STAGES[f"s2l_{k}k_halflr"], reproduce.STAGES[f"s2l_{k}k_mix"]
        assert mixed[0] == half[0]                                    # the shared first stage
        extra = [o for o in mixed[1][1] if o not in half[1][1]]
        assert [o for o in half[1][1] if o not in mixed[1][1]] == []
        assert extra == ([] if k == 1 else ["data.mix_seqlen=1024", "data.mix_fraction=0.5"])
    assert reproduce.BASELINE["s2l_4k_mix"] == reproduce.BASELINE["s2l_4k_mix75"] == "s2l_1k_mix"
    assert "data.mix_fraction=0.75" in reproduce.STAGES["s2l_4k_mix75"][1][1]
    # The 4K arm's settings compose into a valid run config (tokens per micro-batch: 4 x 4096).
    overrides = [o.format(runs="/runs", tag="") for o in reproduce.STAGES["s2l_4k_mix"][1][1]]
    config = compose_run(overrides + ["data.path=/corpus"])
    assert (config.data.seqlen, config.data.mix_seqlen, config.trainer.micro_batch_size) == (4096, 1024, 4)


def evaluated(tmp_path, name, losses, sha="same"):
    """A run record evaluated at 4096 with per-document losses."""
    entry = record(name, 100, 10, 4096)
    entry["evaluation"]["runs"][0].update(name=name.split("_h")[0], targets_sha1=sha, contexts=[
        {"context": 4096, "effective_context": 4096, "ppl": 2.0, "document_losses": losses}])
    (tmp_path / f"{name}.json").write_text(json.dumps(entry))


def test_report_compares_each_arm_with_its_series_next_shorter_context(tmp_path):
    evaluated(tmp_path, "s2l_1k_mix_h1", [1.2, 1.7, 2.2, 2.7])
    evaluated(tmp_path, "s2l_2k_mix75_h1", [1.1, 1.6, 2.1, 2.6])     # no 1k_mix75 arm: 1k_mix
    evaluated(tmp_path, "s2l_4k_mix75_h1", [1.1, 1.6, 2.1, 2.6])     # a tie with 2K
    evaluated(tmp_path, "s2l_4k_mix_h1", [1.0, 1.5, 2.0, 2.5])       # no 2k_mix arm in this series
    result = subprocess.run([sys.executable, "scripts/reproduce.py", "report", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    paired = [line[2:] for line in result.stdout.splitlines() if line.startswith("- ")]
    assert len(paired) == 3, result.stdout
    assert any(line.startswith("s2l_2k_mix75_h1") and "s2l_1k_mix_h1" in line and line.endswith("s2l_2k_mix75_h1 lower")
               for line in paired)
    assert any(line.startswith("s2l_4k_mix75_h1") and "s2l_2k_mix75_h1" in line and line.endswith("a tie")
               for line in paired)
    assert any(line.startswith("s2l_4k_mix_h1") and "s2l_1k_mix_h1" in line for line in paired)


def test_compare_pairs_runs_on_their_shared_target_documents(tmp_path):
    evaluated(tmp_path, "4k", [1.0, 1.5, 2.0, 2.5])
    evaluated(tmp_path, "2k", [1.1, 1.6, 2.1, 2.6])
    evaluated(tmp_path, "other", [1.0, 1.5, 2.0, 2.5], sha="elsewhere")
    command = [sys.executable, "scripts/reproduce.py", "compare", str(tmp_path)]
    result = subprocess.run(command + ["--pairs", "4k:2k", "--json", str(tmp_path / "c.out")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("4k lower")
    assert json.loads((tmp_path / "c.out").read_text())[0]["loss_difference"] == pytest.approx(-0.1)
    for pairs, message in ((["4k:other"], "different documents"), (["4k:missing"], "no evaluated run"),
                           (["4k"], "takes A:B")):
        result = subprocess.run(command + ["--pairs", *pairs], capture_output=True, text=True, cwd=ROOT,
                                timeout=120)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_the_long_finetune_config_for_rotary_models_is_the_recipe_that_was_measured():
    """configs/experiment/finetune_long_rope.yaml packages s2l_4k_mix75 with model.extend_method=ntk
    (the series that gave 1K > 2K > 4K); the two must not drift apart."""
    import reproduce
    measured = [o.format(runs="/runs", tag="_ntk") for o in reproduce.STAGES["s2l_4k_mix75"][1][1]]
    recipe = compose_run(measured + ["model.extend_method=ntk", "data.path=/corpus"])
    packaged = compose_run(["experiment=finetune_long_rope", "model.init_from=/runs/model.pt",
                            "data.path=/corpus"])
    for section, fields in {"model": ("extend_method",),
                            "data": ("seqlen", "document_aware", "mix_seqlen", "mix_fraction"),
                            "optim": ("lr", "warmup_steps", "schedule", "min_lr_ratio", "weight_decay"),
                            "trainer": ("max_steps", "micro_batch_size", "grad_accum", "compile")}.items():
        for field in fields:
            assert getattr(getattr(packaged, section), field) == getattr(getattr(recipe, section), field), \
                f"{section}.{field}"


def test_the_long_context_recipe_runs_are_the_measured_series_and_the_default_is_table_4():
    import reproduce
    for k in (1, 2, 4):
        measured = reproduce.STAGES["s2l_1k_mix" if k == 1 else f"s2l_{k}k_mix75"]
        named = reproduce.STAGES[f"lc_{k}k"]
        assert named[0] == measured[0]                                # the shared first stage
        extra = [o for o in named[1][1] if o not in measured[1][1]]
        assert [o for o in measured[1][1] if o not in named[1][1]] == []
        assert extra == ([] if k == 1 else ["model.extend_method=ntk"])
    assert reproduce.BASELINE["lc_4k"] == reproduce.BASELINE["lc_2k"] == "lc_1k"
    assert reproduce.DEFAULT_RUNS == ["1k", "2k", "4k", "1k_to_4k"]
