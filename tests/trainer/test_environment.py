"""What a run and a benchmark record about where they ran: environment.json per start of a run, and
the provenance header of the benchmark scripts' records."""

import json
import shutil
import subprocess
import sys

import torch

from trainer.environment import benchmark_header, code_version, record_environment
from trainer.loop import run

from .helpers import ROOT, compose_run, tiny_overrides


def test_each_start_of_a_run_records_its_code_and_environment(tmp_path):
    run(compose_run(tiny_overrides(tmp_path, **{"trainer.max_steps": 3})), tmp_path / "run")
    run(compose_run(tiny_overrides(tmp_path, **{"trainer.max_steps": 6, "resume": "true"})), tmp_path / "run")
    starts = json.loads((tmp_path / "run" / "environment.json").read_text())["starts"]
    assert len(starts) == 2
    assert starts[0]["libraries"]["torch"] == torch.__version__ and starts[0]["processes"] == 1
    assert (tmp_path / "run" / "train.log").read_text().count("environment: torch ") == 2
    assert code_version(tmp_path) is None                   # not a git checkout
    if shutil.which("git") is None:                         # a copy of the source without git
        assert starts[1]["code"] is None
        return
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:     # a checkout (CI's clean clone is one); an installed copy has no commit
        assert starts[1]["code"]["commit"] == head.stdout.strip()
    outer = tmp_path / "project"
    (outer / "venv" / "site-packages").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    subprocess.run(["git", "-C", str(outer), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "start"], check=True)
    assert len(code_version(outer)["commit"]) == 40
    # an installed copy inside another repository is not attributed to that repository's commit
    assert code_version(outer / "venv" / "site-packages") is None

def test_an_unreadable_environment_record_is_started_anew(tmp_path, caplog):
    (tmp_path / "environment.json").write_text("{truncated")
    record_environment(tmp_path, {"started": "now"})
    assert json.loads((tmp_path / "environment.json").read_text()) == {"starts": [{"started": "now"}]}
    assert "unreadable" in caplog.text


def test_a_benchmark_record_opens_with_its_provenance(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["scripts/bench_attention.py", "--dtypes", "bfloat16"])
    header = benchmark_header()
    assert header["command"] == "python scripts/bench_attention.py --dtypes bfloat16"
    assert header["torch"] == torch.__version__ and header["card"] == ("cpu" if not torch.cuda.is_available()
                                                                        else torch.cuda.get_device_name())
    assert header["code"] == code_version() and len(header["date"]) == 10


def test_comparing_runs_from_different_devices_says_so():
    from trainer.plot_metrics import device_note
    h200 = [{"device": "NVIDIA H200", "processes": 1}]
    assert device_note({"a": h200, "b": h200, "old": []}) is None         # a run without a record
    note = device_note({"a": h200, "b": [{"device": "NVIDIA H100 80GB HBM3", "processes": 1}]})
    assert note.startswith("note: these runs ran on different devices")
    assert "a: NVIDIA H200 x 1; b: NVIDIA H100 80GB HBM3 x 1" in note
