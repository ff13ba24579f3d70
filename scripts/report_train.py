"""Tables and a plot from scripts/bench_train.py's records.

    python scripts/report_train.py docs/results/train_h100.json --md tables.md --plot train_h100.png
    python scripts/report_train.py grid.json long.json bert.json agree.json

Each file is either one ``bench_train.py --out`` file (its part named by its ``part``) or a
collection ``{"parts": {"grid": <bench_train output>, "long": ..., "bert": ..., "agree": ...}}``
(any subset). Ratios are to ``stock_sdpa`` in the same setting of the same run.
"""

import argparse
import json
import statistics
from pathlib import Path


def _rate(record):
    return f"{record['tokens_per_s'] / 1e3:.0f}k" if "tokens_per_s" in record else record.get("error", "–")


def grid_table(part) -> list[str]:
    lines = ["| context × batch | attn dropout | system | compile | tokens/s | vs stock | MFU (989) | "
             "MFU (measured matmul) | peak memory |", "|---|---|---|---|---|---|---|---|---|"]
    stock = {(r["seqlen"], r["attn_dropout"]): r.get("tokens_per_s") for r in part["records"]
             if r["system"] == "stock_sdpa"}
    for r in part["records"]:
        base = stock.get((r["seqlen"], r["attn_dropout"]))
        ratio = f"{r['tokens_per_s'] / base:.3f}" if base and "tokens_per_s" in r else "–"
        mem = f"{r['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in r else "–"
        mfu = (f"{r['mfu'] * 100:.1f} %", f"{r['mfu_measured'] * 100:.1f} %") if "mfu" in r else ("–", "–")
        lines.append(f"| {r['seqlen']} × {r['batch']} | {r['attn_dropout']} | {r['system']} | "
                     f"{'yes' if r['compile'] else 'no'} | {_rate(r)} | {ratio} | {mfu[0]} | {mfu[1]} | {mem} |")
    return lines


def long_table(part) -> list[str]:
    lines = ["| context | system | activation checkpointing | tokens/s | peak memory |", "|---|---|---|---|---|"]
    for r in part["records"]:
        mem = f"{r['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in r else "–"
        lines.append(f"| {r['seqlen']} | {r['system']} | {'yes' if r.get('checkpoint_blocks') else 'no'} | "
                     f"{_rate(r)} | {mem} |")
    return lines


def bert_table(part) -> list[str]:
    lines = ["| system | compile | real tokens/s | padded tokens/s | peak memory |", "|---|---|---|---|---|"]
    for r in part["records"]:
        padded = f"{r['padded_tokens_per_s'] / 1e3:.0f}k" if "padded_tokens_per_s" in r else "–"
        mem = f"{r['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in r else "–"
        system = r["system"] + (f" ({r['layout']})" if "layout" in r else "")
        lines.append(f"| {system} | {'yes' if r['compile'] else 'no'} | {_rate(r)} | {padded} | {mem} |")
    return lines


def agree_table(part) -> list[str]:
    runs = part["records"]
    first = runs[0]
    lines = ["| run | loss at step 200 | mean of the last 10 logged losses | mean difference to the first run |",
             "|---|---|---|---|"]
    for r in runs:
        tail = [loss for _, loss in r["losses"][-10:]]
        diff = statistics.mean(a - b for (_, a), (_, b) in zip(r["losses"][-10:], first["losses"][-10:]))
        label = f"{r['system']} seed {r['seed']}" + (f", dropout seed {r['dropout_seed']}"
                                                    if r.get("dropout_seed") is not None else "")
        lines.append(f"| {label} | {r['losses'][-1][1]:.3f} | {statistics.mean(tail):.3f} | {diff:+.3f} |")
    return lines


def plot(parts, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    records = parts.get("long", {}).get("records", [])
    for system in sorted({r["system"] for r in records}):
        done = [r for r in records if r["system"] == system and "tokens_per_s" in r]
        if not done:
            continue
        contexts = [r["seqlen"] for r in done]
        speed.plot(contexts, [r["tokens_per_s"] / 1e3 for r in done], marker="o", label=system)
        memory.plot(contexts, [r["peak_mem_gb"] for r in done], marker="o", label=system)
    for axis, label in ((speed, "tokens/s (thousands)"), (memory, "peak memory (GB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens), micro-batch 1")
        axis.set_ylabel(label)
        axis.legend()
    failed = {}                          # system -> (first context it could not run, why)
    for r in records:
        if "error" in r and not any(o["system"] == r["system"] and "tokens_per_s" in o for o in records):
            failed.setdefault(r["system"], (r["seqlen"], r["error"]))
    missing = "; ".join(f"{system}: {why} at {context}" for system, (context, why) in failed.items())
    long = parts.get("long", {})
    figure.suptitle(f"GPT-2 small training on {long.get('card', 'one GPU')}, torch {long.get('torch', '')}, "
                    f"Triton {long.get('triton', '')}, {long.get('date', '')}\nflashtrain against stock "
                    "PyTorch (SDPA) in one process" + (f" ({missing})" if missing else ""), fontsize=9)
    figure.text(0.01, 0.01, long.get("command", ""), fontsize=6)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(path, dpi=120)


def load_parts(paths: list[Path]) -> dict:
    """The parts of every file, by name: a collection's own names, a bench_train output's ``part``."""
    parts, source = {}, {}
    for path in paths:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a readable JSON file ({error})") from None
        if isinstance(result, dict) and "parts" in result:
            found = result["parts"]
        elif isinstance(result, dict) and "part" in result and "records" in result:
            found = {result["part"]: result}
        else:
            raise ValueError(f"{path}: neither a bench_train.py output (part, records) nor a "
                             'collection {"parts": ...}')
        for name, part in found.items():
            if name in parts:
                raise ValueError(f"part {name!r} is in both {source[name]} and {path}; put them in one "
                                 'collection {"parts": ...} under different names')
            parts[name], source[name] = part, path
    return parts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--md", type=Path, help="write the tables here (default: print)")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    try:
        parts = load_parts(args.results)
    except ValueError as error:
        parser.error(str(error))
    sections = {"grid": grid_table, "long": long_table, "bert": bert_table, "bert_unpadded": bert_table,
                "bert_captured": bert_table, "agree": agree_table, "agree_dropout_seeds": agree_table}
    text = []
    for name, table in sections.items():
        if name in parts:
            text += [f"### {name}", "", *table(parts[name]), ""]
    if args.md:
        args.md.write_text("\n".join(text))
    else:
        print("\n".join(text))
    if args.plot:
        plot(parts, args.plot)


if __name__ == "__main__":
    main()
