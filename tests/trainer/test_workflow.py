"""The day-to-day workflow: every tool takes what a run leaves behind (run directory, checkpoint
directory, state.pt, model file), and the tokenizer is found without a flag."""

import subprocess
import sys

import pytest
import torch

from trainer.loop import run
from trainer.model_source import ModelSourceError, find_model

from .helpers import ROOT, compose_run, fit_with_hook, tiny_overrides


def _script(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("workflow")
    run(compose_run(tiny_overrides(tmp_path, **{"trainer.max_steps": 4, "trainer.save_interval": 2,
                                                "trainer.eval_interval": 4})), tmp_path / "run")
    return tmp_path / "run"


def test_every_form_of_a_run_resolves_to_a_model_and_its_tokenizer(finished_run):
    step2 = finished_run / "checkpoints" / "step_00000002"
    for path, kind, expected in [(finished_run, "model_file", finished_run / "model.pt"),
                                 (finished_run / "model.pt", "model_file", finished_run / "model.pt"),
                                 (step2, "checkpoint", step2 / "state.pt"),
                                 (step2 / "state.pt", "checkpoint", step2 / "state.pt")]:
        source = find_model(path)
        assert (source.kind, source.path) == (kind, expected)
        assert source.tokenizer == finished_run / "tokenizer.json"
    # the checkpoint holds the step-2 weights, the model file the final ones
    early, final = find_model(step2).load(), find_model(finished_run).load()
    state = torch.load(step2 / "state.pt", weights_only=True)
    assert all(torch.equal(early.state_dict()[k], v) for k, v in state["model"].items())
    assert not all(torch.equal(early.state_dict()[k], final.state_dict()[k]) for k in state["model"])


def test_an_unfinished_run_resolves_to_its_newest_checkpoint(finished_run, tmp_path):
    import shutil
    unfinished = tmp_path / "unfinished"
    shutil.copytree(finished_run, unfinished, ignore=shutil.ignore_patterns("model.pt", "run.lock"))
    source = find_model(unfinished)
    assert source.kind == "checkpoint" and source.path.parent.name == "step_00000004"
    with pytest.raises(ModelSourceError, match="no model here"):
        find_model(tmp_path)
    with pytest.raises(ModelSourceError, match="does not exist"):
        find_model(tmp_path / "missing")


def test_sample_and_convert_take_a_checkpoint_directory_without_flags(finished_run, tmp_path):
    step2 = finished_run / "checkpoints" / "step_00000002"
    sampled = _script("scripts/sample.py", step2, "--prompt", "alpha", "--max-new-tokens", "5",
                      "--device", "cpu")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("alpha") and "checkpoint" in sampled.stderr
    exported = _script("scripts/convert_hf.py", "export", finished_run, tmp_path / "hf")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "hf" / "config.json").exists()


def test_init_from_takes_a_run_directory(finished_run, tmp_path):
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 1, "model.init_from": str(finished_run),
                                            "data.tokenizer_file": str(finished_run / "tokenizer.json")})
    summary = run(compose_run(overrides), tmp_path / "continued")
    assert summary["steps"] == 1


def test_fine_tune_a_hugging_face_directory_at_longer_context(finished_run, tmp_path):
    """experiment=finetune_long's path from a Hugging Face GPT-2 directory: its weights and its
    tokenizer, the learned positions stretched to the new context."""
    exported = _script("scripts/convert_hf.py", "export", finished_run, tmp_path / "hf")
    assert exported.returncode == 0, exported.stderr
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 1, "data.seqlen": 64,
                                            "model.init_from": str(tmp_path / "hf"),
                                            "model.extend_method": "interpolate",
                                            "data.tokenizer_file": str(tmp_path / "hf" / "tokenizer.json")})
    summary = run(compose_run(overrides), tmp_path / "long")
    state = torch.load(tmp_path / "long" / "model.pt", weights_only=True)
    assert summary["steps"] == 1 and state["config"]["max_seqlen"] == 64


def _start_cli(tmp_path, run_dir, *extra):
    import os
    import time
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 100000, "trainer.save_interval": 100000,
                                            "trainer.eval_interval": 100000, "model.dropout": 0.0,
                                            "model.attn_dropout": 0.0})
    env = dict(os.environ, WANDB_SILENT="true")
    env.pop("HYDRA_FULL_ERROR", None)
    process = subprocess.Popen([sys.executable, "-m", "trainer", *overrides, *extra,
                                f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.2)
    return process, overrides


def test_ctrl_c_saves_a_checkpoint_and_prints_the_command_that_resumes(tmp_path):
    import signal
    from trainer.metrics import read_metrics
    signal_name, status = "SIGINT", 130
    run_dir = tmp_path / "run"
    process, overrides = _start_cli(tmp_path, run_dir)
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr[-2000:]
    assert "Traceback" not in stderr and f"{signal_name}: stopped after step" in stderr
    command = stderr.split("Resume with:")[1].strip().splitlines()[0]
    assert command.startswith("python -m trainer ") and f"hydra.run.dir={run_dir}" in command
    assert "resume=true" in command and all(o.split("=")[0] in command for o in overrides)
    metrics = read_metrics(run_dir)
    stopped = metrics["events"][-1]
    assert stopped["event"] == "interrupted" and stopped["signal"] == signal_name
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped['step']:08d}" and not (run_dir / "model.pt").exists()
    # the printed command continues the run (here for two more steps)
    resumed = subprocess.run([*command.replace("python", sys.executable, 1).split(),
                              f"trainer.max_steps={stopped['step'] + 2}"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = read_metrics(run_dir)
    assert [e["event"] for e in metrics["events"]] == ["interrupted", "resume"]
    assert metrics["events"][-1]["step"] == stopped["step"]
    steps = [r["step"] for r in metrics["train"]]
    assert steps == sorted(set(steps)) and steps[-1] == stopped["step"] + 2


def test_metrics_readers_keep_the_last_line_of_a_replayed_step(tmp_path):
    import json
    from trainer.metrics import read_metrics
    lines = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "val_loss": 4.1},
             {"step": 3, "loss": 3.9},                           # lost: the run died before saving it
             {"event": "resume", "step": 2, "checkpoint": "step_00000002"},
             {"step": 3, "loss": 3.8}, {"step": 4, "loss": 3.5}, {"step": 4, "val_loss": 3.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    metrics = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in metrics["train"]] == [(1, 5.0), (2, 4.0), (3, 3.8), (4, 3.5)]
    assert [r["step"] for r in metrics["eval"]] == [2, 4]
    assert metrics["events"] == [lines[4]]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON line"):
        read_metrics(tmp_path)


def test_a_run_ends_with_a_summary_and_plot_metrics_compares_runs(finished_run, tmp_path):
    import json
    import shutil
    from trainer.metrics import read_metrics
    log = (finished_run / "train.log").read_text()
    evals = read_metrics(finished_run)["eval"]
    assert "summary of" in log and f"final {evals[-1]['val_ppl']:.2f}" in log
    assert "tokens/s (median of log windows)" in log and "peak memory" in log
    base, other = tmp_path / "run", tmp_path / "other"
    for run_dir, lr in ((base, 0.001), (other, 0.5)):          # the second with another learning rate
        shutil.copytree(finished_run, run_dir)
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / "config.yaml").write_text(f"optim:\n  lr: {lr}\n")
    with open(other / "metrics.jsonl", "a") as file:     # a replayed step: counted once
        file.write(json.dumps({"event": "resume", "step": 3}) + "\n")
        file.write(json.dumps({**read_metrics(finished_run)["train"][-1], "loss": 0.5}) + "\n")
    result = _script("scripts/plot_metrics.py", base, other, "--out", tmp_path / "plots")
    assert result.returncode == 0, result.stderr
    table, differences = result.stdout.split("settings that differ:\n")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "steps" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["run", "other"]
    assert differences.splitlines()[2:-1] == ["| optim.lr | 0.001 | 0.5 |"]    # that setting alone
    assert rows[0].split("|")[2].strip() == rows[1].split("|")[2].strip() == "4"
    assert rows[1].split("|")[4].strip() == "0.500"
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 10_000
    assert (tmp_path / "plots" / "lr_throughput.png").exists()
    missing = _script("scripts/plot_metrics.py", tmp_path / "nothing")
    assert missing.returncode != 0 and "no metrics.jsonl in" in missing.stderr


def test_the_hugging_face_export_is_complete(finished_run, tmp_path):
    """AutoTokenizer + AutoModelForCausalLM from the export generate what our own model does."""
    transformers = pytest.importorskip("transformers")
    import json
    from tokenizers import Tokenizer
    from models import generate
    result = _script("scripts/convert_hf.py", "export", finished_run, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    ours_tokenizer = Tokenizer.from_file(str(finished_run / "tokenizer.json"))
    eos = ours_tokenizer.token_to_id("<|endoftext|>")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == eos
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "# document 3\nalpha beta gamma"
    ids = ours_tokenizer.encode(text).ids
    assert hf_tokenizer(text)["input_ids"] == ids and len(ids) > 3
    assert hf_tokenizer.eos_token_id == eos and hf_tokenizer.decode(ids) == ours_tokenizer.decode(ids)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.tensor([ids])
    with torch.no_grad():
        theirs = hf_model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                   pad_token_id=eos)
    ours = generate(find_model(finished_run).load(), prompt, 8, temperature=0)
    assert torch.equal(theirs, ours)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_termination_and_preemption_signals_stop_after_the_step_with_a_checkpoint(tmp_path, signal_name):
    """The same handler as Ctrl-C, in-process: the signal arrives during step 2."""
    import os
    import signal
    from trainer.loop import Trainer
    from trainer.metrics import read_metrics
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 50, "trainer.save_interval": 50})
    trainer = Trainer(compose_run(overrides), tmp_path / "run")
    handler_before = signal.getsignal(getattr(signal, signal_name))

    def signal_during_step_2():
        if trainer.step == 1:
            os.kill(os.getpid(), getattr(signal, signal_name))

    summary = fit_with_hook(trainer, signal_during_step_2)
    assert summary["interrupted"] == signal_name and summary["steps"] == 2
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert read_metrics(tmp_path / "run")["events"][-1] == {"event": "interrupted", "step": 2,
                                                           "signal": signal_name}
    assert signal.getsignal(getattr(signal, signal_name)) is handler_before   # handlers restored
