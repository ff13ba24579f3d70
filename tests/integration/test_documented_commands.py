"""Every command the README and the docs show still parses: a ``python -m trainer`` (or
``torchrun ... -m trainer``) command's overrides compose into a valid run config, and a script's or
tool's arguments are accepted by its parser. Nothing runs: each parser is stopped right after it has
read its arguments. Commands elided with ``...`` or a ``<placeholder>`` are skipped. And the
README's list of config groups names every model and experiment config."""

import argparse
import re
import importlib
import runpy
import shlex
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer.config import register_configs, unknown_keys

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
             *sorted((ROOT / "scripts").glob("*.py")), *sorted((ROOT / "trainer").glob("*.py"))]
PROGRAMS = ("python ", "python3 ", "torchrun ", "flashtrain-")
ELIDED = ("...", "<", "[")
# console scripts of pyproject.toml, by the module whose main() they run
CONSOLE_SCRIPTS = {"flashtrain-train": "trainer", "flashtrain-plot": "trainer.plot_metrics",
                   "flashtrain-evaluate": "trainer.evaluate"}


def documented_commands(path: Path):
    """(line, command) for each indented command line of ``path`` (Markdown code blocks and the
    usage lines of docstrings), continuation lines joined and trailing comments dropped."""
    found, current, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if current is not None:
            current += " " + text
        elif line.startswith("    ") and text.startswith(PROGRAMS):
            current, start = text, number
        else:
            continue
        if current.endswith("\\"):    # (a docstring that is not raw writes it doubled)
            current = current.rstrip("\\")
            continue
        found.append((start, shlex.split(current, comments=True)))
        current = None
    return found


def _cases():
    for path in DOCUMENTS:
        for line, words in documented_commands(path):
            name = f"{path.relative_to(ROOT)}:{line}"
            if any(marker in word for word in words for marker in ELIDED):
                continue
            yield pytest.param(words, id=name)


class Parsed(Exception):
    """Raised by the stopped parser: the arguments were accepted."""


def _program(words):
    """(module or script path, its arguments) of a documented command."""
    if words[0] in CONSOLE_SCRIPTS:
        return CONSOLE_SCRIPTS[words[0]], words[1:]
    if words[0] == "torchrun":      # torchrun's own options come before the module
        words = words[words.index("-m"):]
        return words[1], words[2:]
    words = words[1:]
    if words[0] == "-m":
        return words[1], words[2:]
    return ROOT / words[0], words[1:]


def _compose_run(overrides):
    overrides = [o for o in overrides if not o.startswith("hydra.")]
    if "-m" in overrides:           # a sweep: each comma-separated value is one job; check the first
        overrides = [o.split(",")[0] if "=" in o else o for o in overrides if o != "-m"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    assert unknown_keys(cfg) == []
    return OmegaConf.to_object(cfg)


@pytest.mark.parametrize("words", list(_cases()))
def test_documented_command_parses(words, monkeypatch):
    program, arguments = _program(words)
    if program == "trainer":
        register_configs()
        _compose_run(arguments)
        return
    real_parse = argparse.ArgumentParser.parse_args

    def parse_and_stop(parser, args=None, namespace=None):
        raise Parsed(real_parse(parser, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "path", [str(ROOT / "scripts"), *sys.path])
    if isinstance(program, Path):
        assert program.is_file(), f"{program} does not exist"
        monkeypatch.setattr(sys, "argv", [str(program), *arguments])
        run = lambda: runpy.run_path(str(program), run_name="__main__")  # noqa: E731
    else:                           # a tool's module: its main() reads sys.argv
        monkeypatch.setattr(sys, "argv", [program, *arguments])
        run = importlib.import_module(program).main
    with pytest.raises(Parsed):
        run()


def test_the_commands_are_found():
    """The extraction sees the README's commands (a guard against a format change hiding them)."""
    readme = [words for _, words in documented_commands(ROOT / "README.md")]
    assert ["python", "-m", "trainer", "experiment=gpt2s_owt_4k"] in readme
    assert len(list(_cases())) > 50


def _listed_names(text: str) -> set[str]:
    """Config names the README lists, with its shorthands expanded: ``bert_tiny/base/large`` (one
    prefix, several endings) and ``gpt2_tiny … gpt2_xl`` (every size of that family in the zoo)."""
    from models import size_names
    names = set()
    for match in re.finditer(r"\b([a-z0-9]+(?:_[a-z0-9]+)*_)([a-z0-9_]+(?:/[a-z0-9_]+)+)", text):
        prefix, endings = match.groups()
        names |= {prefix + ending for ending in endings.split("/")}
    names |= set(re.findall(r"\b[a-z0-9_]+\b", text))
    for first, last in re.findall(r"\b(\w+) … (\w+)\b", text):
        family = first.split("_")[0] + "_"
        if last.startswith(family):
            names |= {size for size in size_names() if size.startswith(family)}
    return names


def test_the_readme_lists_every_model_and_experiment_config():
    readme = (ROOT / "README.md").read_text()
    groups = readme[readme.index("- **Config groups.**"):]
    listed = _listed_names(groups[:groups.index("\n- **", 1)])
    for group in ("model", "experiment"):
        configs = {p.stem for p in (ROOT / "configs" / group).glob("*.yaml")}
        assert configs <= listed, f"configs/{group} not in the README: {sorted(configs - listed)}"
