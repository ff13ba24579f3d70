"""The training loop end to end on CPU: runs, resume, checkpoints, failures, DDP, FSDP, logging
(configuration checks: test_run_config.py)."""

import gzip
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import checkpoint as checkpoint_module
from models import causal_lm as causal_lm_module
from trainer.checkpoint import CheckpointError
from trainer.console import wants_progress_bar
from trainer import metrics as trainer_metrics
from trainer.loop import NonFiniteLoss, Trainer, run

from .helpers import ROOT, compose_run, run_cli, tiny_overrides


def read_metrics(run_dir: Path):
    metrics = trainer_metrics.read_metrics(run_dir)
    return metrics["train"], metrics["eval"]


def test_run_writes_metrics_checkpoints_and_evaluates(tmp_path):
    summary = run(compose_run(tiny_overrides(tmp_path)), tmp_path / "run")
    train, evals = read_metrics(tmp_path / "run")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert set(train[0]) >= {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb"}
    assert [r["step"] for r in evals] == [3, 6] and evals[-1]["val_ppl"] > 1
    assert summary["val_loss"] == evals[-1]["val_loss"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (tmp_path / "run" / "train.log").exists()
    assert (tmp_path / "run" / "model.pt").exists() and (tmp_path / "run" / "tokenizer.json").exists()


@pytest.mark.parametrize("extra, stop_at", [({}, 4), ({"data.mix_seqlen": 8}, 3)],
                         ids=["plain", "mixed-context"])
def test_stop_and_resume_is_bit_identical(tmp_path, extra, stop_at):
    # Mixed context: stopped after an odd number of steps, the resumed run must go on with a
    # short micro-batch (the interleave's count is part of the sampler state).
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 8, "trainer.save_interval": 4, **extra})
    run(compose_run(overrides), tmp_path / "whole")
    whole, _ = read_metrics(tmp_path / "whole")

    interrupted = Trainer(compose_run(overrides), tmp_path / "split")
    for _ in range(stop_at):
        interrupted.train_step()
    interrupted.save()
    interrupted.close()                      # the process "dies" after this checkpoint
    run(compose_run(overrides + ["resume=true"]), tmp_path / "split")
    resumed, _ = read_metrics(tmp_path / "split")
    assert [r["step"] for r in resumed] == list(range(stop_at + 1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole[stop_at:]]
    final = lambda d: torch.load(d / "checkpoints" / "step_00000008" / "state.pt", weights_only=False)["model"]
    for name, tensor in final(tmp_path / "whole").items():
        assert torch.equal(tensor, final(tmp_path / "split")[name]), name


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(compose_run(tiny_overrides(tmp_path)), tmp_path / "run")
    trainer.train_step()
    trainer.save()
    trainer.train_step()
    real_save = checkpoint_module._save

    def dies_mid_write(obj, path):
        if path.name == "state.pt":
            path.write_bytes(b"half a checkpoint")
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(checkpoint_module, "_save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    trainer.close()
    latest = checkpoint_module.latest_checkpoint(tmp_path / "run")
    assert latest.name == "step_00000001"
    state, _ = checkpoint_module.load_checkpoint(latest, 0)
    assert state["step"] == 1


def test_corrupt_and_incompatible_checkpoints_are_named(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 3})
    run(compose_run(overrides), tmp_path / "run")
    with pytest.raises(CheckpointError, match="d_model: checkpoint 32, this run 64"):
        Trainer(compose_run(overrides + ["resume=true", "model.d_model=64"]), tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "step_00000003" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(compose_run(overrides + ["resume=true"]), tmp_path / "run")
    with pytest.raises(CheckpointError, match="resume=true"):
        Trainer(compose_run(overrides), tmp_path / "run")


def test_nonfinite_loss_stops_or_is_skipped(tmp_path, monkeypatch):
    real_loss = causal_lm_module.lm_loss
    calls = {"n": 0}

    def poisoned(logits, targets, *args, **kwargs):
        calls["n"] += 1
        loss = real_loss(logits, targets, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(causal_lm_module, "lm_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match="at step 3"):
        run(compose_run(tiny_overrides(tmp_path)), tmp_path / "stop")
    # The loss is read back only at log lines; the stop still names the first bad step.
    calls["n"] = 0
    with pytest.raises(NonFiniteLoss, match="at step 3"):
        run(compose_run(tiny_overrides(tmp_path, **{"trainer.log_interval": 5,
                                                     "trainer.eval_interval": 6})), tmp_path / "late")
    assert not (tmp_path / "late" / "checkpoints" / "latest").exists()   # step 3's save refused
    calls["n"] = 0
    summary = run(compose_run(tiny_overrides(tmp_path, **{"trainer.skip_nonfinite": "true"})), tmp_path / "skip")
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6


def test_quickstart_command_runs(tmp_path):
    """The README's main command, shortened: the stdlib corpus, its own BPE, train, eval, sample."""
    result = run_cli(["trainer.max_steps=4", "trainer.eval_interval=2", "trainer.sample_tokens=8",
                      "data.tokenizer_train_bytes=2000000", "logger=none", f"hydra.run.dir={tmp_path / 'qs'}"],
                     env_extra={"FLASHTRAIN_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "val_ppl" in (tmp_path / "qs" / "metrics.jsonl").read_text()
    assert "sample:" in result.stderr
    assert (tmp_path / "qs" / ".hydra" / "config.yaml").exists()
    # it ends with the commands that use the run (the README's "Using a run")
    assert result.stderr.rstrip().endswith(f"python scripts/convert_hf.py export {tmp_path / 'qs'} hf_model/"
                                           "       # for Hugging Face transformers")
    assert f"python scripts/sample.py {tmp_path / 'qs'} --prompt" in result.stderr


def test_two_process_ddp_matches_one_process(tmp_path):
    """Global batch 4 either way: 1 process x 2 micro-batches of 2, or 2 processes x 1 of 2."""
    common = tiny_overrides(tmp_path, **{"trainer.max_steps": 3, "model.dropout": 0.0,
                                          "model.attn_dropout": 0.0})
    single = run_cli(common + ["trainer.grad_accum=2", f"hydra.run.dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = _torchrun(common + ["trainer.grad_accum=1", f"hydra.run.dir={tmp_path / 'two'}",
                              "trainer.profile_steps=[2,2]", "trainer.save_minutes=1e-9",
                              "trainer.keep_checkpoints=5"], 29533)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    _assert_same_losses(tmp_path / "one", tmp_path / "two")
    # save_minutes, due at every log step here: both processes agree to save at steps 1 and 2
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").glob("step_*")) == [
        "step_00000001", "step_00000002", "step_00000003"]
    # each process profiles its own steps; rank 0 alone writes the log windows' lines
    assert sorted(p.name for p in (tmp_path / "two" / "profile").glob("*.txt")) == [
        "steps2-2_rank0.txt", "steps2-2_rank1.txt"]
    assert (tmp_path / "two" / "train.log").read_text().count("step 2/3: loss") == 1


def _torchrun(args, port):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "-m", "trainer", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=dict(os.environ, WANDB_SILENT="true"))


def _assert_same_losses(run_a, run_b):
    a_lines, _ = read_metrics(run_a)
    b_lines, _ = read_metrics(run_b)
    assert [r["tokens"] for r in a_lines] == [r["tokens"] for r in b_lines]
    for a, b in zip(a_lines, b_lines):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


def test_two_process_fsdp_matches_one_process_and_resumes_exactly(tmp_path):
    """FSDP2 over 2 processes (gloo) with the same global batch as 1 process x 2 micro-batches:
    the same losses; a sharded checkpoint resumes to the same steps bit for bit; every tool reads
    the sharded checkpoint."""
    from trainer.model_source import find_model
    common = tiny_overrides(tmp_path, **{"trainer.max_steps": 4, "trainer.save_interval": 2,
                                          "model.dropout": 0.0, "model.attn_dropout": 0.0})
    single = run_cli(common + ["trainer.grad_accum=2", f"hydra.run.dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-2000:]
    fsdp = common + ["trainer.grad_accum=1", "trainer.distributed=fsdp"]
    whole = _torchrun(fsdp + [f"hydra.run.dir={tmp_path / 'two'}", "trainer.save_best=true"], 29534)
    assert whole.returncode == 0, whole.stderr[-3000:]
    _assert_same_losses(tmp_path / "one", tmp_path / "two")
    two, _ = read_metrics(tmp_path / "two")
    assert (tmp_path / "two" / "checkpoints" / "step_00000004" / "sharded" / ".metadata").exists()

    first = _torchrun(fsdp + ["trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'split'}"], 29535)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _torchrun(fsdp + ["resume=true", f"hydra.run.dir={tmp_path / 'split'}"], 29536)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    split, _ = read_metrics(tmp_path / "split")
    assert [(r["step"], r["loss"]) for r in split] == [(r["step"], r["loss"]) for r in two]

    sharded = find_model(tmp_path / "two" / "checkpoints" / "step_00000004").load()
    final = find_model(tmp_path / "two" / "model.pt").load()
    # the best evaluation's weights, gathered from the shards (evaluations at steps 3 and 4)
    best = torch.load(tmp_path / "two" / "best_model.pt", weights_only=True)
    evals = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path / "two")[1]}
    assert best["step"] == min(evals, key=evals.get) and best["val_loss"] == min(evals.values())
    if best["step"] == 4:
        assert all(torch.equal(best["model"][k], v) for k, v in final.state_dict().items())
    single_final = find_model(tmp_path / "one" / "model.pt").load()
    for name, value in final.state_dict().items():
        assert torch.equal(sharded.state_dict()[name], value), name
        torch.testing.assert_close(single_final.state_dict()[name], value, rtol=1e-4, atol=1e-6)


def test_fine_tune_from_a_run_at_longer_context(tmp_path):
    """Long-document fine-tuning: start from a finished run's model and tokenizer, double the context."""
    run(compose_run(tiny_overrides(tmp_path, **{"trainer.max_steps": 2})), tmp_path / "base")
    overrides = tiny_overrides(tmp_path, **{
        "trainer.max_steps": 2, "data.seqlen": 64, "model.init_from": str(tmp_path / "base" / "model.pt"),
        "data.tokenizer_file": str(tmp_path / "base" / "tokenizer.json")})
    summary = run(compose_run(overrides), tmp_path / "long")
    state = torch.load(tmp_path / "long" / "model.pt", weights_only=True)
    assert state["config"]["max_seqlen"] == 64 and summary["steps"] == 2


def test_multirun_sweep(tmp_path):
    overrides = [o for o in tiny_overrides(tmp_path, **{"trainer.max_steps": 2}) if not o.startswith("data.seqlen=")]
    result = run_cli(["-m", *overrides, "data.seqlen=16,32", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert result.returncode == 0, result.stderr[-2000:]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "metrics.jsonl").exists()
    # each job names its overrides first
    assert "job 0: " in result.stderr and "data.seqlen=16" in result.stderr.split("job 0: ")[1].splitlines()[0]
    # and the sweep ends with the jobs side by side, each named by what sets it apart
    table = result.stderr.split("sweep: the finished jobs\n")[1].splitlines()
    assert table[0].startswith("| run | steps |")
    assert [row.split(" | ")[0] for row in table[2:4]] == ["| 0: data.seqlen=16", "| 1: data.seqlen=32"]


def test_a_failed_sweep_job_is_reported_and_the_others_still_run(tmp_path):
    overrides = [o for o in tiny_overrides(tmp_path, **{"trainer.max_steps": 2})]
    result = run_cli(["-m", *overrides, "optim.grad_clip=-1,1.0,-2", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert result.returncode == 1, result.stderr[-2000:]
    assert (tmp_path / "sweep" / "1" / "model.pt").exists()
    report = result.stderr.split("sweep: ")[1]
    assert report.startswith("2 of 3 jobs failed")
    assert "job 0 (" in report and "job 2 (" in report and "gradient norm" in report
    assert "Traceback" not in result.stderr


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 6, "trainer.save_interval": 2,
                                            "trainer.keep_checkpoints": 2})
    run(compose_run(overrides), tmp_path / "run")
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000006"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_the_final_sample_fits_a_short_context(tmp_path):
    summary = run(compose_run(tiny_overrides(tmp_path, **{"trainer.sample_tokens": 64, "trainer.max_steps": 2})),
                  tmp_path / "run")
    assert summary["steps"] == 2                     # seqlen 32: 16 prompt + 16 new tokens, no error


def test_a_corpus_of_one_file_trains_with_its_end_held_out(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 2})
    single = tmp_path / "one.txt"
    single.write_text(" ".join(f"alpha{i % 13} beta{i % 7}" for i in range(3000)))
    overrides = [o for o in overrides if not o.startswith("data.path=")] + [f"data.path={single}"]
    assert run(compose_run(overrides), tmp_path / "run")["val_loss"] is not None


def test_epochs_are_logged_and_many_repeats_warned(tmp_path):
    run(compose_run(tiny_overrides(tmp_path, **{"trainer.max_steps": 250, "trainer.eval_interval": 250,
                                                 "trainer.save_interval": 250, "trainer.log_interval": 125})),
        tmp_path / "run")
    train, _ = read_metrics(tmp_path / "run")
    assert 0 < train[0]["epoch"] < train[-1]["epoch"]
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert re.search(r"WARNING this run reads its [\d,]+-token training split \d+\.\d times", log_text)


def test_document_aware_batches_compile_once(tmp_path, monkeypatch):
    # Batches hold different numbers of documents (cu_seqlens lengths). The compiled training
    # forward is compiled once for all of them, and once more for evaluation (no_grad); without
    # the trainer's hint dynamo compiles the training graph twice (the first count, then the count
    # made dynamic, which evaluation then inherits): 3 frames, which this test then sees.
    from torch._dynamo.testing import CompileCounter

    from trainer import loop
    counter = CompileCounter()
    monkeypatch.setattr(loop, "compile_model",
                        lambda module, model, mode: torch.compile(module, backend=counter))
    lengths = set()
    original = loop.Trainer._loss

    def recording(self, batch):
        lengths.add(batch.cu_seqlens.shape[0])
        return original(self, batch)
    monkeypatch.setattr(loop.Trainer, "_loss", recording)
    torch._dynamo.reset()
    run(compose_run(tiny_overrides(tmp_path, **{
        "data.document_aware": "true", "model.attention": "flash", "trainer.compile": "true",
        "model.dropout": 0.0, "model.attn_dropout": 0.0, "trainer.max_steps": 4,
        "trainer.eval_interval": 4, "trainer.save_interval": 4})), tmp_path / "run")
    torch._dynamo.reset()
    assert len(lengths) > 1                         # the counts did vary
    assert counter.frame_count == 2


def test_a_refused_run_leaves_no_log_handler_to_the_next(tmp_path):
    # A run refused while being built (here: an init_from that does not exist) must not keep its
    # train.log open: the next run in the same process logs to its own directory.
    with pytest.raises(ValueError, match="model.init_from"):
        run(compose_run(tiny_overrides(tmp_path, **{"model.init_from": str(tmp_path / "none.pt")})),
            tmp_path / "refused")
    run(compose_run(tiny_overrides(tmp_path, **{"trainer.max_steps": 1})), tmp_path / "next")
    assert "summary of" in (tmp_path / "next" / "train.log").read_text()
    refused_log = tmp_path / "refused" / "train.log"
    assert not refused_log.exists() or "summary of" not in refused_log.read_text()


def test_durations_read_as_a_progress_line_gives_them():
    from trainer.console import duration_text
    assert [duration_text(s) for s in (0.4, 45, 185, 3600, 8049)] == [
        "0 s", "45 s", "3 min 5 s", "1 h 0 min", "2 h 14 min"]


@pytest.mark.parametrize("progress", ["bar", "lines"])
def test_log_windows_reach_train_log_and_the_console_without_a_bar(tmp_path, capsys, progress):
    run(compose_run(tiny_overrides(tmp_path, **{"trainer.max_steps": 2, "trainer.progress": progress})),
        tmp_path / "run")
    window = re.compile(r"step (\d)/2: loss \d+\.\d{4}, lr [\d.e+-]+, grad_norm [\d.e+-]+, [\d,]+ tokens/s")
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert [m.group(1) for m in window.finditer(log_text)] == ["1", "2"]
    # the time the remaining steps take, while there are any
    assert re.search(r"step 1/2: .* tokens/s, about \d+ s left\n", log_text)
    assert not re.search(r"step 2/2: .* left", log_text)
    console = capsys.readouterr().err
    assert "summary of" in console                       # other lines reach the console either way
    bar = re.compile(r"(^|\r)train:\s+\d+%", re.M)      # not the token shards' "writing train"
    data_bars = re.compile(r"(tokenizing|writing) train.*\d+%\|")
    assert re.search(r"data: training a bpe tokenizer of [\d,]+ tokens on up to [\d,]+ MB", console)
    assert "data: trained the tokenizer in" in console
    assert "data: tokenizing 30 documents in 1 process(es) into" in console
    if progress == "bar":
        assert bar.search(console) and data_bars.search(console) and not window.search(console)
    else:
        assert not bar.search(console) and not data_bars.search(console)
        assert [m.group(1) for m in window.finditer(console)] == ["1", "2"]
    from datasets.utils import are_progress_bars_disabled
    assert not are_progress_bars_disabled()              # datasets' own setting restored


def test_progress_auto_draws_a_bar_on_a_terminal_only():
    terminal, log_file = type("T", (), {"isatty": lambda self: True})(), io.StringIO()
    assert wants_progress_bar("auto", terminal)
    assert not wants_progress_bar("auto", log_file)
    assert wants_progress_bar("bar", log_file)
    assert not wants_progress_bar("lines", terminal)


@pytest.mark.parametrize("steps, written", [("[2,3]", "steps2-3"), ("[3,9]", "steps3-4")],
                         ids=["inside-the-run", "past-its-end"])
def test_profile_steps_write_a_trace_and_a_time_table(tmp_path, steps, written):
    # A window past max_steps is written when the run ends, naming the steps it holds.
    run(compose_run(tiny_overrides(tmp_path, **{"trainer.max_steps": 4, "trainer.profile_steps": steps})),
        tmp_path / "run")
    profile = tmp_path / "run" / "profile"
    assert sorted(p.name for p in profile.iterdir()) == [f"{written}_rank0.json.gz", f"{written}_rank0.txt"]
    with gzip.open(profile / f"{written}_rank0.json.gz", "rt") as trace:
        events = json.load(trace)["traceEvents"]
    optimizer_steps = [e for e in events if e.get("name", "").startswith("Optimizer.step#AdamW")]
    assert len(optimizer_steps) == int(written[-1]) - int(written[5]) + 1
    table = (profile / f"{written}_rank0.txt").read_text()
    assert "Self CPU" in table and "Self CPU Mem" in table and "aten::mm" in table
    assert f"profile of steps {written[5:]}" in (tmp_path / "run" / "train.log").read_text()


def test_a_profile_window_the_run_never_reaches_is_warned(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 2, "trainer.profile_steps": "[5,6]"})
    run(compose_run(overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "profile").exists()
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert "WARNING trainer.profile_steps=[5,6] starts past trainer.max_steps=2" in log_text
    resumed = tiny_overrides(tmp_path, **{"trainer.max_steps": 4, "trainer.profile_steps": "[2,3]"})
    run(compose_run(resumed + ["resume=true"]), tmp_path / "run")
    assert "starts before step 3, where this run resumes" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize("steps", ["[3]", "[0,2]", "[4,3]"])
def test_profile_steps_out_of_order_are_refused(tmp_path, steps):
    with pytest.raises(Exception, match=re.escape("trainer.profile_steps=") + ".*1 <= FIRST <= LAST"):
        compose_run(tiny_overrides(tmp_path, **{"trainer.profile_steps": steps}))


@pytest.mark.parametrize("packed", [False, True])
def test_masked_lm_run_with_a_fixed_target_count(tmp_path, monkeypatch, packed):
    """data.mlm_max_predictions reaches the model as max_targets, for training and evaluation;
    with data.mlm_pack_sequences the training batches carry cu_seqlens (validation stays one
    sequence per row, comparable across layouts)."""
    from models.masked_lm import MaskedLM
    seen = []
    original = MaskedLM.forward

    def forward(self, *args, **kwargs):
        seen.append((kwargs.get("max_targets"), self.training, kwargs.get("cu_seqlens") is not None))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(MaskedLM, "forward", forward)
    overrides = tiny_overrides(tmp_path, **{"model": "bert_tiny", "data.objective": "mlm",
                                            "data.tokenizer": "wordpiece", "data.mlm_max_predictions": 3,
                                            "data.mlm_pack_sequences": packed, "model.attention": "flash",
                                            "trainer.max_steps": 2, "trainer.eval_interval": 2,
                                            "trainer.save_interval": 2, "trainer.compile": False})
    run(compose_run(overrides), tmp_path / "mlm")
    train, evals = read_metrics(tmp_path / "mlm")
    assert seen and {targets for targets, _, _ in seen} == {3}
    assert {has_segments for _, training, has_segments in seen if training} == {packed}
    assert not any(has_segments for _, training, has_segments in seen if not training)
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in train) and evals


def test_packed_masked_lm_sequences_need_flash(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"model": "bert_tiny", "data.objective": "mlm",
                                            "data.tokenizer": "wordpiece", "data.mlm_pack_sequences": True,
                                            "model.attention": "sdpa"})
    with pytest.raises(ValueError, match="data.mlm_pack_sequences=true packs documents"):
        run(compose_run(overrides), tmp_path / "mlm")


def test_mfu_counts_a_masked_lm_head_on_its_targets_only():
    """The run's FLOPs per token: the MLM head on the expected share of masked positions, or on the
    fixed K per row of data.mlm_max_predictions; a causal LM's on every position."""
    from models import build_model, flops_per_token, named_config
    from trainer.data import DataConfig
    from trainer.fit_report import flops_per_token as run_flops
    bert = build_model(named_config("bert_tiny"))
    for data, fraction in ((DataConfig(objective="mlm", tokenizer="wordpiece", seqlen=128), 0.15),
                           (DataConfig(objective="mlm", tokenizer="wordpiece", seqlen=128,
                                       mlm_max_predictions=20), 20 / 128)):
        assert run_flops(bert, data) == pytest.approx(flops_per_token(bert.config, 128, fraction))
        assert run_flops(bert, data) < flops_per_token(bert.config, 128)
    gpt2 = build_model(named_config("gpt2_tiny"))
    assert run_flops(gpt2, DataConfig(seqlen=128)) == flops_per_token(gpt2.config, 128)
