"""What a run ran on: the code's commit, the library versions, the devices and the command line,
in ``<run>/environment.json``, one entry per start (the first and every resume), so that a result
can be traced to the code and card that produced it even without a logger; and the same
provenance for the benchmark scripts' records (``benchmark_header``)."""

import datetime
import json
import logging
import os
import platform
import shlex
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

log = logging.getLogger("flashtrain")
SOURCE_ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "triton", "numpy", "datasets", "tokenizers", "hydra-core")


def code_version(root: Path = SOURCE_ROOT) -> dict | None:
    """The commit of the checkout the trainer runs from, and whether tracked files differ from it;
    None where it is not a git checkout (an installed package) or git is missing."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        # an installed copy inside some other repository (a virtualenv in a project) is not that
        # repository's code: the checkout must be the trainer's own
        if Path(git("rev-parse", "--show-toplevel")).resolve() != Path(root).resolve():
            return None
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "uncommitted_changes": bool(changed)}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe_environment(device: torch.device, world_size: int) -> dict:
    cuda = device.type == "cuda"
    return {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            # as typed: ``python -m trainer ...``, not the module's file that sys.argv names
            "command": " ".join(shlex.quote(a) for a in sys.orig_argv),
            "host": socket.gethostname(), "python": platform.python_version(),
            "libraries": {**{name: _version(name) for name in LIBRARIES}, "torch": torch.__version__},
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
            "cpu_cores": os.cpu_count(), "processes": world_size, "code": code_version()}


def environment_line(entry: dict) -> str:
    code = entry["code"]
    where = ("code: not a git checkout" if code is None else
             f"code {code['commit'][:10]}" + (" with uncommitted changes" if code["uncommitted_changes"] else ""))
    cuda = f", CUDA {entry['cuda']}" if entry["cuda"] else ""
    return (f"environment: torch {entry['libraries']['torch']}, triton {entry['libraries']['triton']}{cuda}, "
            f"{entry['device']} x {entry['processes']} process(es), {where}")


def read_environment(run_dir: Path) -> list[dict]:
    """The run's starts, oldest first ([] for a run without a readable environment.json)."""
    try:
        return json.loads((Path(run_dir) / "environment.json").read_text())["starts"]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def record_environment(run_dir: Path, entry: dict):
    """Append ``entry`` to ``environment.json`` (atomically; an unreadable file is started anew)."""
    path = Path(run_dir) / "environment.json"
    starts = read_environment(run_dir)
    if path.exists() and not starts:
        log.warning(f"{path} was unreadable; it now lists this start only")
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps({"starts": [*starts, entry]}, indent=1))
    os.replace(staging, path)


def benchmark_header() -> dict:
    """The provenance every benchmark record opens with: card, versions, date, the command as it
    was typed (``python scripts/...``) and the code's commit."""
    cuda = torch.cuda.is_available()
    return dict(card=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                triton=_version("triton"), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if cuda else None,
                python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                command="python " + " ".join(shlex.quote(a) for a in sys.argv), code=code_version())
