"""docs/config.md and the schema comments it is written from (trainer/config_reference.py)."""

import importlib.util
import sys
import textwrap
from pathlib import Path

from omegaconf import OmegaConf

from trainer.config import RunConfig
from trainer.config_reference import _fields_in_source, config_keys, render_markdown

ROOT = Path(__file__).resolve().parents[2]


def leaf_keys(node, prefix=""):
    keys = []
    for name, value in node.items():
        keys += leaf_keys(value, f"{prefix}{name}.") if OmegaConf.is_dict(value) else [prefix + name]
    return keys


def test_every_key_of_the_schema_is_listed_with_a_description():
    keys = config_keys()
    assert [key.key for key in keys] == leaf_keys(OmegaConf.structured(RunConfig))
    undocumented = [key.key for key in keys if not key.description]
    assert not undocumented, f"fields without a comment in the schema: {undocumented}"


def test_docs_config_md_is_up_to_date():
    written = (ROOT / "docs" / "config.md").read_text()
    assert written == render_markdown(config_keys()), \
        "docs/config.md is out of date: run python scripts/config_reference.py"


def test_the_check_command_reports_a_stale_file(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("config_reference_script",
                                                  ROOT / "scripts" / "config_reference.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    stale = tmp_path / "config.md"
    stale.write_text("# old\n")
    assert script.main(["--out", str(stale), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert script.main(["--out", str(stale)]) == 0
    assert stale.read_text() == render_markdown(config_keys())
    assert script.main(["--out", str(stale), "--check"]) == 0
    assert not list(tmp_path.glob(".*.tmp"))      # written through a staging file, then renamed


def test_which_comments_describe_a_field(tmp_path):
    # Above it at its indentation (no blank line), beside it, and under it indented past it; a
    # field's continuation lines are not the next field's, and a blank line ends a block.
    source = textwrap.dedent('''
        from dataclasses import dataclass


        @dataclass
        class Example:
            # Orphaned block.

            # Above.
            first: int = 1      # beside
                                # and under
            second: str = "x"
            third: float | None = None  # only beside
    ''')
    path = tmp_path / "example_schema.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("example_schema", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["example_schema"] = module
    try:
        spec.loader.exec_module(module)
        fields = _fields_in_source(module.Example)
    finally:
        del sys.modules["example_schema"]
    assert fields == {"first": ("int", "Above. beside and under"), "second": ("str", ""),
                      "third": ("float | None", "only beside")}


def test_cells_escape_what_would_break_the_table():
    text = render_markdown([key for key in config_keys()
                            if key.key in ("model.d_model", "trainer.profile_steps")])
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows[0].startswith("| `model.d_model` | `int \\| None` | `null` |")
    assert "&lt;run>/profile/" in rows[1]
    # Four cells a row: no unescaped | inside one.
    assert all(row.replace("\\|", "").count("|") == 5 for row in rows)
