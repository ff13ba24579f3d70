"""The attention grid as it stands: every cell from the latest run that measured it.

    python scripts/attention_standing.py docs/results/attention_h200.json \\
        docs/results/tma_h200.json:grid_pingpong_default_v19 \\
        docs/results/hopper_h200.json:grid_d64_warp_specialized_default_v21 --md standing.md

Each source is a ``bench_attention.py`` output (FILE) or a run of bench_attention records kept in
a record file (FILE:RUN, e.g. ``tma_h200.json``'s runs), oldest first. A cell (dtype, head dim,
seqlen, causal, dropout) takes all its providers from the last source that timed flashtrain in
it, so every ratio compares providers measured in one process, never numbers from two runs.
Prints the Markdown table (or writes it with ``--md``). ``--left-out FILE:RUN=REASON`` names a run
that measured cells but is deliberately not a source (e.g. one whose rounds were disturbed), with
the reason, in the table's header; the run must exist. A cell where flashtrain's or the best SDPA
backend's forward+backward rounds were unsteady (``timing_rounds.py``: median round more than
10 % above the fastest, judged from the records' rounds) has its ratio marked "(unsteady)" and is
listed below the table: its ratio measured a disturbance and wants a re-run.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

from timing_rounds import describe, unsteady_bench_record

SDPA = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math")
CELL_FIELDS = ("dtype", "head_dim", "seqlen", "causal", "dropout_p")


class SourceError(ValueError):
    """A source that cannot be read as bench_attention records, with the reason."""


def load_source(spec: str) -> tuple[str, list[dict], str]:
    """(name, records, provenance) of one source: ``FILE`` or ``FILE:RUN``."""
    path, _, run = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SourceError(f"{spec}: no such file") from None
    except json.JSONDecodeError as error:
        raise SourceError(f"{spec}: not JSON ({error})") from None
    if run:
        runs = {r.get("name"): r for r in data.get("runs", [])}
        if run not in runs:
            raise SourceError(f"{spec}: no run named {run!r} in {path} (runs holding bench "
                              f"records: {', '.join(n for n, r in runs.items() if _bench_records(r)) or 'none'})")
        holder, name = runs[run], f"{Path(path).name}:{run}"
    else:
        holder, name = data, Path(path).name
    records = _bench_records(holder)
    if not records:
        raise SourceError(f"{spec}: holds no bench_attention.py records (provider and cell fields)")
    return name, records, _provenance(holder)


def _provenance(holder: dict) -> str:
    """Card, software, date and command of a run, from wherever its record keeps them: the output's
    own fields, a run's ``versions`` and ``command``, or an output nested in the run."""
    fields = {}
    for source in (holder.get("records") if isinstance(holder.get("records"), dict) else {},
                   holder, holder.get("versions", {})):
        fields.update({k: v for k, v in source.items()
                       if k in ("card", "torch", "triton", "cuda", "cudnn", "date", "command") and v})
    software = ", ".join(f"{label} {fields[key]}" for key, label in
                         (("torch", "PyTorch"), ("triton", "Triton"), ("cuda", "CUDA"), ("cudnn", "cuDNN"))
                         if key in fields)
    return "; ".join(part for part in (fields.get("card"), software, fields.get("date"),
                                       f"`{fields['command']}`" if "command" in fields else None) if part)


def _bench_records(holder: dict) -> list[dict]:
    """The bench_attention records of a run or output: a list, or a whole output nested in it."""
    records = holder.get("records", [])
    if isinstance(records, dict):
        records = records.get("records", [])
    return [r for r in records if isinstance(r, dict) and "provider" in r
            and all(field in r for field in CELL_FIELDS) and not r.get("sweep")]


def standing(sources: list[tuple]) -> dict:
    """{cell: (source name, {provider: record})}: each cell from the last source with flashtrain."""
    cells = {}
    for name, records, *_ in sources:
        by_cell = {}
        for record in records:
            by_cell.setdefault(tuple(record[f] for f in CELL_FIELDS), {})[record["provider"]] = record
        for cell, providers in by_cell.items():
            if "fwdbwd_tflops" in providers.get("flashtrain", {}):
                cells[cell] = (name, providers)
    return cells


def _best_sdpa(providers: dict) -> tuple[str, float] | None:
    timed = [(p, providers[p]["fwdbwd_tflops"]) for p in SDPA if "fwdbwd_tflops" in providers.get(p, {})]
    return max(timed, key=lambda item: item[1]) if timed else None


def parse_left_out(spec: str) -> tuple[str, str]:
    """(name, reason) of a ``FILE:RUN=REASON`` run left out; SourceError if the run is not there."""
    run, sep, reason = spec.partition("=")
    if not sep or not reason.strip():
        raise SourceError(f"--left-out {spec!r}: expected FILE:RUN=REASON")
    name, _, _ = load_source(run)
    return name, reason.strip()


def markdown(cells: dict, specs: list[str], sources: list[tuple],
             left_out: list[tuple[str, str]] = ()) -> str:
    lines = ["# Attention grid: where each cell stands", "",
             "Each cell as its latest run measured it (all its providers from that run, in one "
             "process); the run is named per row, and its record (card, software, date, command) is "
             "in that file. Written by `python scripts/attention_standing.py "
             + " ".join(specs) + "`. The runs, oldest first:", "",
             *(f"- `{name}`: {provenance}" for name, _, provenance in sources), "",
             *(["Runs left out:", "", *(f"- `{name}`: {reason}" for name, reason in left_out), ""]
               if left_out else []),
             "| dtype | head dim | seqlen | causal | dropout | flashtrain fwd / bwd / fwd+bwd | best SDPA "
             "(by fwd+bwd): fwd / bwd / fwd+bwd | ours / best SDPA | ours / FA2 | float32 check | run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary, unsteady_cells = {}, []
    for cell in sorted(cells):
        name, providers = cells[cell]
        ours = providers["flashtrain"]
        best = _best_sdpa(providers)
        fa2 = providers.get("sdpa_flash", {}).get("fwdbwd_tflops")
        ratio = ours["fwdbwd_tflops"] / best[1] if best else None
        if ratio is not None:
            summary.setdefault(cell[:2] + cell[3:], []).append(ratio)
        check = {True: "passed", False: "**failed**"}.get(ours.get("check_passed"), "–")
        timings = _timings(ours)
        dtype, head_dim, seqlen, causal, dropout_p = cell
        # The ratio is of forward+backward times: their rounds decide whether it is trustworthy.
        shaky = {provider: excess for provider in ("flashtrain", *(best[:1] if best else ()))
                 for timing, excess in unsteady_bench_record(providers[provider]).items()
                 if timing == "fwdbwd"}
        if shaky:
            unsteady_cells.append(f"- {dtype}, head dim {head_dim}, seqlen {seqlen}, causal "
                                  f"{int(causal)}, dropout {dropout_p} (`{name}`): " + describe(shaky))
        lines.append(
            f"| {dtype} | {head_dim} | {seqlen} | {int(causal)} | {dropout_p} | {timings} | "
            + (f"{best[0]} {_timings(providers[best[0]])}" if best else "–") + " | "
            + (f"**{_ratio_text(ratio)}**" + (" (unsteady)" if shaky else "")
               if ratio is not None else "–") + " | "
            + (f"{ours['fwdbwd_tflops'] / fa2:.2f}" if fa2 else "–") + f" | {check} | `{name}` |")
    lines += ["", "Forward+backward against the best SDPA backend of the same run, by setting:", ""]
    for (dtype, head_dim, causal, dropout_p), ratios in sorted(summary.items()):
        span = f"{_ratio_text(min(ratios))}–{_ratio_text(max(ratios))}"
        lines.append(f"- {dtype}, head dim {head_dim}, causal {int(causal)}, dropout {dropout_p}: "
                     f"{span} ({sum(r >= 1 for r in ratios)} of {len(ratios)} cells at or past it)")
    if unsteady_cells:
        lines += ["", "Cells whose forward+backward rounds were unsteady (a provider's median round "
                  "more than 10 % above its fastest: the ratio measured a disturbance; re-run it):",
                  "", *unsteady_cells]
    return "\n".join(lines) + "\n"


def _timings(record: dict) -> str:
    """Forward / backward / forward+backward TFLOP/s of one provider's record: which pass trails
    shows beside the ratio of the sums."""
    return " / ".join(f"{record[f]:.0f}" if f in record else "–"
                      for f in ("fwd_tflops", "bwd_tflops", "fwdbwd_tflops"))


def _ratio_text(ratio: float) -> str:
    """Two decimals, or three where two would round a cell still behind (0.998) up to 1.00: the
    counts of cells at or past the baseline are of the exact ratios."""
    text = f"{ratio:.2f}"
    return f"{ratio:.3f}" if ratio < 1 and text == "1.00" else text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="FILE or FILE:RUN, oldest first")
    parser.add_argument("--md", type=Path, help="write the table here (else print it)")
    parser.add_argument("--left-out", action="append", default=[], metavar="FILE:RUN=REASON",
                        help="a run deliberately not used, and why (repeatable)")
    args = parser.parse_args()
    try:
        sources = [load_source(spec) for spec in args.sources]
        left_out = [parse_left_out(spec) for spec in args.left_out]
    except SourceError as error:
        sys.exit(f"attention_standing: {error}")
    specs = args.sources + [f"--left-out {shlex.quote(spec)}" for spec in args.left_out]
    text = markdown(standing(sources), specs, sources, left_out)
    if args.md is None:
        print(text, end="")
        return
    temporary = args.md.with_name(args.md.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(args.md)
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
