"""The multi-GPU scaling benchmark's plumbing, on the CPU with gloo: torchrun runs, the one-process
baseline, scaling figures, and a SIGKILL after a checkpoint followed by an exact resume (DDP here;
FSDP2's sharded resume is tested in test_trainer.py)."""

import json
import subprocess
import sys

from .helpers import ROOT, make_corpus

TINY = ["data.vocab_size=300", "data.val_windows=4", "data.validation_fraction=0.2", "model.d_model=32",
        "model.n_layer=2", "model.n_head=2", "trainer.precision=fp32", "optim.warmup_steps=2",
        "model.dropout=0.1", "model.attn_dropout=0.0"]


def test_ddp_scaling_records_and_a_killed_run_resumes_exactly(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    out, md = tmp_path / "multigpu.json", tmp_path / "multigpu.md"
    command = [sys.executable, "scripts/bench_distributed.py", "--corpus", str(corpus), "--data", "files",
               "--device", "cpu", "--nproc", "1", "2", "--models", "gpt2_small", "--settings", "32:2",
               "--strategies", "ddp", "--steps", "40", "--log-interval", "4", "--kill-resume",
               "--num-proc", "1", "--cache", str(tmp_path / "cache"), "--workdir", str(tmp_path / "runs"),
               "--out", str(out), "--md", str(md), "--extra", *TINY]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    single, ddp, killed = records
    assert (single["strategy"], single["nproc"], ddp["strategy"], ddp["nproc"]) == ("single", 1, "ddp", 2)
    assert single["returncode"] == 0 and ddp["returncode"] == 0
    assert ddp["tokens_per_s_per_gpu"] == ddp["tokens_per_s"] / 2
    assert ddp["scaling_efficiency"] == ddp["tokens_per_s_per_gpu"] / single["tokens_per_s_per_gpu"]
    assert len(ddp["window_tokens_per_s"]) == 10
    # Killed after the step-20 checkpoint, before the end; the resumed losses are the same bits.
    assert killed["killed_after_checkpoint"] == 20 and killed["final_step"] == 40
    assert killed["compared_steps"] == 5 and killed["bitwise_equal"] and killed["max_loss_rel_diff"] == 0
    events = [json.loads(line) for line in (tmp_path / "runs" / killed["name"] / "metrics.jsonl")
              .read_text().splitlines() if '"event"' in line]
    assert [e["event"] for e in events] == ["resume"]
    table = md.read_text()
    assert "| gpt2_small | 32 | 2 | ddp | 2 |" in table
    assert "killed after the step-20 checkpoint, resumed to step 40" in table
