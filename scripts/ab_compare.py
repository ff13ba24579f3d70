"""Side by side, the A/B runs of ``scripts/ab_tiles.py`` from several processes: for every cell and
candidate, its change against its pass's default in each run, their mean, and whether the runs
agree on the sign (the same kernel moves 1-3 % between processes, so a change is only read as
real when every process shows it).

    python scripts/ab_compare.py ab_a.json ab_b.json [--threshold 1.0]

Prints one line per (cell, candidate), e.g.

    d=128 N=2048 causal=1 p=0.1  pers  -3.4 / -3.4 %  mean -3.4 %  agree

``agree``: every run's change is past ``--threshold`` percent in the same direction; ``level``:
every one within it; ``mixed`` otherwise. A run whose record marks the candidate or its pass's
default unsteady (``timing_rounds.py``: its median round more than 10 % above its fastest; a
record written before ``ab_tiles.py`` kept the mark is judged from its rounds) adds ``unsteady in
run N``: that value measures a disturbance. Needs no GPU.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from timing_rounds import unsteady

CELL = ("head_dim", "seqlen", "causal", "dropout_p")


def load_runs(paths: list[Path]) -> list[list[dict]]:
    """The records of each ``ab_tiles.py`` output; a clear error for a file that is not one."""
    runs = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error})") from None
        records = data.get("records") if isinstance(data, dict) else None
        if not records or not all("median" in r and "forward_candidates" in r for r in records):
            raise ValueError(f"{path}: no ab_tiles.py records in it")
        runs.append(records)
    return runs


def changes(record: dict) -> dict[str, float]:
    """Each candidate's change (percent) against the default of its pass in this record."""
    median = record["median"]
    out = {}
    for name in median:
        default = _default_of(record, name)
        if default:
            out[name] = 100 * (median[name] / median[default] - 1)
    return out


def _default_of(record: dict, name: str) -> str | None:
    return ("forward" if name in record["forward_candidates"]
            else "backward" if name in record["backward_candidates"] else None)


def _unsteady_of(record: dict) -> dict[str, float]:
    """The record's ``unsteady``, or for records written before it existed, from its rounds."""
    return record["unsteady"] if "unsteady" in record else unsteady(record.get("ms", {}))


def verdict(values: list[float], threshold: float) -> str:
    if all(v < -threshold for v in values) or all(v > threshold for v in values):
        return "agree"
    if all(abs(v) <= threshold for v in values):
        return "level"
    return "mixed"


def compare(runs: list[list[dict]], threshold: float = 1.0) -> list[str]:
    """One line per (cell, candidate) found in the first run, with the other runs' values for
    the same cell and candidate where they have them."""
    by_cell = [{tuple(r[k] for k in CELL): r for r in records} for records in runs]
    lines = []
    for cell, first in by_cell[0].items():
        head_dim, seqlen, causal, dropout_p = cell
        for name in changes(first):
            # (run number, record) of the runs that timed this candidate in this cell
            timed = [(i + 1, run[cell]) for i, run in enumerate(by_cell)
                     if cell in run and name in changes(run[cell])]
            values = [changes(record)[name] for _, record in timed]
            disturbed = [str(i) for i, record in timed
                         if {name, _default_of(record, name)} & set(_unsteady_of(record))]
            lines.append(f"d={head_dim} N={seqlen} causal={int(causal)} p={dropout_p}  {name}  "
                         + " / ".join(f"{v:+.1f}" for v in values) + " %"
                         + f"  mean {statistics.mean(values):+.1f} %  {verdict(values, threshold)}"
                         + (f"  unsteady in run {', '.join(disturbed)}" if disturbed else ""))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="ab_tiles.py outputs")
    parser.add_argument("--threshold", type=float, default=1.0,
                        help="percent within which a change counts as level")
    args = parser.parse_args(argv)
    try:
        lines = compare(load_runs(args.runs), args.threshold)
    except ValueError as error:
        sys.exit(f"ab_compare.py: {error}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
