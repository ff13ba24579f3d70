"""Every configuration key, its type, its default and what it does, read from the schema
(``RunConfig`` and the dataclasses it holds) and the comments beside each field in the source,
so the reference cannot drift from the code: ``docs/config.md`` is written from it
(``scripts/config_reference.py``), and a test fails when a field has no comment or the file is
out of date.

A field's description is the comment block directly above it (no blank line between, at the
field's indentation) followed by the comment on its own line and the comment lines under it that
are indented past the field.
"""

import ast
import dataclasses
import inspect
import io
import tokenize
from dataclasses import dataclass
from typing import Any

from .config import RunConfig


@dataclass(frozen=True)
class ConfigKey:
    key: str            # the dotted override name, e.g. "trainer.max_steps"
    type: str           # the annotation as written, e.g. "float | None"
    default: Any
    description: str


def _comments_by_line(source: str) -> dict[int, tuple[int, str]]:
    """1-based line -> (column, text without '#') of each comment in ``source``."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.start[1], token.string.lstrip("#").strip())
    return comments


def _fields_in_source(schema: type) -> dict[str, tuple[str, str]]:
    """Field name -> (annotation as written, description) of each annotated field of the
    dataclass ``schema``, from its class's source."""
    source = inspect.getsource(schema)
    lines = source.splitlines()
    comments = _comments_by_line(source)

    def comment_only(line: int) -> bool:
        return line in comments and lines[line - 1].lstrip().startswith("#")

    node = ast.parse(source).body[0]
    fields = {}
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        above, line = [], statement.lineno - 1
        while comment_only(line) and comments[line][0] == statement.col_offset:
            above.insert(0, comments[line][1])
            line -= 1
        beside = [comments[n][1] for n in range(statement.lineno, statement.end_lineno + 1)
                  if n in comments]
        line = statement.end_lineno + 1
        while comment_only(line) and comments[line][0] > statement.col_offset:
            beside.append(comments[line][1])
            line += 1
        fields[statement.target.id] = (ast.unparse(statement.annotation), " ".join(above + beside))
    return fields


def config_keys(schema: type = RunConfig, prefix: str = "") -> list[ConfigKey]:
    """Every leaf key of ``schema`` in declaration order, sections expanded."""
    in_source = _fields_in_source(schema)
    keys = []
    for field in dataclasses.fields(schema):
        if dataclasses.is_dataclass(field.type):
            keys += config_keys(field.type, f"{prefix}{field.name}.")
            continue
        default = (field.default_factory() if field.default_factory is not dataclasses.MISSING
                   else field.default)
        annotation, description = in_source[field.name]
        keys.append(ConfigKey(prefix + field.name, annotation, default, description))
    return keys


def _command_line_value(value: Any) -> str:
    """A default as an override writes it (``key=value``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_command_line_value(item) for item in value) + "]"
    return str(value)


# Defaults that depend on the machine, written as the rule that computes them.
MACHINE_DEFAULTS = {"data.cache_dir": "$FLASHTRAIN_CACHE or ~/.cache/flashtrain"}


def render_markdown(keys: list[ConfigKey]) -> str:
    """``docs/config.md``: one table per section (model, data, optim, trainer, logger, run)."""
    sections: dict[str, list[ConfigKey]] = {}
    for key in keys:
        sections.setdefault(key.key.split(".")[0] if "." in key.key else "run", []).append(key)
    out = ["# Configuration reference", "",
           "Every key a run takes, with the schema's default (`trainer/config.py`,",
           "`trainer/data/config.py`). Config groups (`model=gpt2_small`, `data=linux`,",
           "`experiment=...`) set some of these; `python -m trainer [overrides] --help` shows the",
           "values a command line composes. Override any key on the command line, e.g.",
           "`trainer.max_steps=2000`. Written by `python scripts/config_reference.py` from the",
           "comments in the schema; a test fails when this file is out of date."]
    for section, members in sections.items():
        out += ["", f"## {section}", "", "| key | type | default | description |",
                "|---|---|---|---|"]
        for key in members:
            default = MACHINE_DEFAULTS.get(key.key, _command_line_value(key.default))
            # A table cell ends at any unescaped |, in code spans too (GitHub's tables).
            cells = [f"`{key.key}`", f"`{key.type}`", f"`{default}`",
                     key.description.replace("<", "&lt;")]    # <run> is not an HTML tag
            out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(out) + "\n"
