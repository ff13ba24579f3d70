"""Reproduce the FlashAttention paper's context-length experiment (Table 4) at one-GPU scale.

    python scripts/reproduce.py run --corpus /data/linux-6.1 --out results/ [--only 1k 4k]
    python scripts/reproduce.py report results/ [more dirs] --md docs/results/reproduction_h100.md
    python scripts/reproduce.py compare results/ --pairs s2l_4k:s2l_2k [--context 4096]

``run`` trains each model with ``python -m trainer`` (configs/experiment/repro_linux_*.yaml: GPT-2
small, the same tokens per step and in total at every context), times it, and scores it with
``python -m trainer.evaluate`` on the same held-out target tokens: the first 4096 tokens of test
documents at least that long, targets at positions 3072-4095, each model at 1K, 2K and 4K
context (a model trained on less is scored with a sliding window at its own context). One JSON per
run (``<name>.json``: command, wall time, metrics, evaluation) lands in ``--out``.

Runs (their stages and overrides: ``scripts/reproduce_recipes.py``): 1k, 2k, 4k (from scratch);
1k_to_4k (75% of the tokens at 1K, then 25% at 4K with the positions stretched: the long-document
fine-tuning recipe); s2l_1k, s2l_2k, s2l_4k (the rotary decoder, 80% of the tokens at 1K in a shared
first stage, the last 20% at 1K, 2K or 4K); p2l_1k, p2l_2k, p2l_4k (progressive: 60% at 1K, then 20%
at 1K/2K/2K, then 20% at 1K/2K/4K); s2l_2k_seq64, s2l_4k_seq64 (the s2l arms with 64 sequences per
step, as s2l_1k has, in fewer steps), and s2l_2k_seq64_sqrtlr, s2l_4k_seq64_sqrtlr (the same with
the learning rate raised by the square root of the batch's growth); s2l_1k_halflr, s2l_2k_halflr,
s2l_4k_halflr (the s2l arms at half the last stage's peak learning rate) and s2l_*_quarterlr (at a
quarter of it); s2l_*_mix and s2l_*_mix75 (the half-rate arms with a half or three quarters of the
last stage's micro-batches at 1K context); t2_flash, t2_sdpa, t2_eager (Table 2 analog: a 300-step
1K run with each attention; run with --no-eval); lc_1k, lc_2k, lc_4k (the long-context recipe that
gave 1K > 2K > 4K: s2l_1k_mix and the mix75 arms with the rotary base raised). Without --only,
``run`` trains the Table 4 set: 1k, 2k, 4k, 1k_to_4k. ``report`` writes the Markdown tables and a PNG of
loss against position. ``compare`` says whether one run's perplexity on the shared targets is lower
than another's beyond document-to-document noise (a paired bootstrap over the target documents,
``trainer/paired_bootstrap.py``). """

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import metrics as trainer_metrics  # noqa: E402
from trainer import paired_bootstrap  # noqa: E402
from trainer.environment import read_environment  # noqa: E402
from trainer.run_summary import training_seconds  # noqa: E402

from reproduce_recipes import BASELINE, DEFAULT_RUNS, EARLIER_STAGES, STAGES, TABLE2_RUNS  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    """Every metric line of a run, the last of each replayed step (see trainer.metrics.read_metrics)."""
    if not (run_dir / "metrics.jsonl").exists():
        return []
    metrics = trainer_metrics.read_metrics(run_dir)
    return sorted(metrics["train"] + metrics["eval"], key=lambda r: (r["step"], "val_loss" in r)) \
        + metrics["events"]


def stage_command(name, overrides, args, runs: Path) -> list[str]:
    """``python -m trainer ...`` for one stage; {runs} and {tag} in overrides name the run directory
    and the variant series, so a later stage reads the earlier stage of its own series."""
    return [sys.executable, "-m", "trainer", *[o.format(runs=runs, tag=args.tag) for o in overrides],
            f"data.path={args.corpus}", f"data.cache_dir={args.cache}", f"data.num_proc={args.num_proc}",
            "logger=none", f"hydra.run.dir={runs / (name + args.tag)}", *args.extra]


def run_stage(name, overrides, args, runs: Path) -> dict:
    run_dir = runs / (name + args.tag)
    command = stage_command(name, overrides, args, runs)
    print(" ".join(command), flush=True)
    started = time.time()
    result = subprocess.run(command, cwd=ROOT)
    record = {"name": name + args.tag, "command": " ".join(command[1:]), "returncode": result.returncode,
              "wall_s": time.time() - started, "metrics": read_metrics(run_dir)}
    starts = read_environment(run_dir)
    if starts:               # the code's commit, versions and card of the stage's (last) start
        record["environment"] = starts[-1]
    train = [m for m in record["metrics"] if "tokens_per_s" in m]
    if train:
        record["tokens"] = train[-1]["tokens"]
    return record


def evaluate(run_dir: Path, args) -> dict | None:
    out = run_dir / "eval.json"
    command = [sys.executable, "-m", "trainer.evaluate", str(run_dir), "--documents", args.corpus,
               "--split", "test", "--contexts", *map(str, args.contexts), "--out", str(out)]
    if subprocess.run(command, cwd=ROOT).returncode != 0 or not out.exists():
        return None
    return json.loads(out.read_text())


def run(args):
    args.out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="reproduce-"))
    trained = set()
    for key in args.only:
        for name, overrides in STAGES[key]:
            if name in trained:
                continue
            if name in EARLIER_STAGES and (runs / (name + args.tag) / "model.pt").exists():
                print(f"{name}: reusing {runs / (name + args.tag)} (delete it to train again)")
                trained.add(name)
                continue
            record = run_stage(name, overrides, args, runs)
            if record["returncode"] == 0 and name == key and not args.no_eval:
                record["evaluation"] = evaluate(runs / (name + args.tag), args)
            record["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
            target = args.out / f"{name}{args.tag}.json"
            target.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
            target.with_suffix(".tmp").replace(target)
            if record["returncode"] != 0:
                print(f"{name}: failed (exit {record['returncode']}); skipping the rest of {key}")
                break
            trained.add(name)


def collect(directories) -> dict:
    records = {}
    for directory in directories:
        for path in sorted(Path(directory).glob("*.json")):
            record = json.loads(path.read_text())
            if "metrics" in record:
                records[record["name"]] = record
    return records


def train_time(record) -> float:
    """Seconds in training steps of one run record (see trainer.run_summary.training_seconds)."""
    return training_seconds(record["metrics"])


def series_of(name: str) -> tuple[str, str]:
    """'4k_doc_lr2e-4' -> ('4k', '_doc_lr2e-4'): the run, and the tag of the variant series."""
    for run in sorted(STAGES, key=len, reverse=True):
        if name.startswith(run):
            return run, name[len(run):]
    return name, ""


def stage_totals(name: str, records: dict) -> tuple[float, int]:
    """Training seconds and tokens of a run, summed over its stages (an earlier stage it shares counts
    for every run built on it)."""
    run, tag = series_of(name)
    parts = [records[part + tag] for part, _ in STAGES.get(run, [(run, None)]) if part + tag in records]
    return sum(train_time(part) for part in parts), sum(part.get("tokens", 0) for part in parts)


def report_row(name: str, records: dict, contexts) -> str:
    record = records[name]
    run, tag = series_of(name)
    seconds, tokens = stage_totals(name, records)
    baseline = BASELINE.get(run, "1k") + tag
    ratio = f"{seconds / stage_totals(baseline, records)[0]:.2f}" if baseline in records else "–"
    evals = [m for m in record["metrics"] if "val_ppl" in m]
    if record["returncode"] != 0 or not evals:
        return f"| {name} | failed (exit {record['returncode']}) |"
    entries = (record.get("evaluation") or {}).get("runs") or [{"contexts": [], "trained_context": "–"}]
    by_context = {e["context"]: e for e in entries[0]["contexts"]}
    cells = "".join(f" {by_context[c]['ppl']:.2f} (at {by_context[c]['effective_context']}) |"
                    if c in by_context else " – |" for c in contexts)
    return (f"| {name} | {entries[0]['trained_context']} | {tokens / 1e6:.1f}M | {seconds:.0f} | {ratio} | "
            f"{evals[-1]['val_ppl']:.2f} |{cells}")


def report(args):
    records = collect(args.dirs)
    rows = args.rows or [name for name in sorted(records) if series_of(name)[0] in args.runs_in_order
                         and not name.startswith(tuple(EARLIER_STAGES) + TABLE2_RUNS)]
    if not args.rows:
        order = {run: i for i, run in enumerate(args.runs_in_order)}
        rows.sort(key=lambda name: (series_of(name)[1], order[series_of(name)[0]]))
    lines = ["| run | trained context | tokens | training time (s) | time / 1K run | final val ppl "
             "(own windows) |" + "".join(f" ppl @ {c} |" for c in args.contexts),
             "|---|---|---|---|---|---|" + "---|" * len(args.contexts)]
    lines += [report_row(name, records, args.contexts) for name in rows if name in records]
    text = "\n".join(lines) + "\n"
    paired = paired_lines([name for name in rows if name in records], records, max(args.contexts))
    if paired:
        text += (f"\nEach run against its series' next shorter context, on the shared targets at "
                 f"{max(args.contexts)} (paired bootstrap over the documents):\n\n"
                 + "".join(f"- {line}\n" for line in paired))
    if any(name in records for name in TABLE2_RUNS):
        text += "\n" + table2(records)
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"records": records}, indent=1))
    if args.plot:
        plot(records, args.plot, args.caption, args.plot_rows or [r for r in ("1k", "2k", "4k", "1k_to_4k")],
             args.title)


def seconds_to_reach(metrics, target_ppl: float) -> float | None:
    """Training seconds until the first validation at or below ``target_ppl`` (None if never)."""
    for line in metrics:
        if line.get("val_ppl") is not None and line["val_ppl"] <= target_ppl:
            return training_seconds([m for m in metrics if m["step"] <= line["step"]])
    return None


def table2(records) -> str:
    """Table 2 analog: each attention's training time, and the time it took to reach the final
    validation perplexity of the eager (Hugging Face style) run."""
    eager = records.get("t2_eager")
    evals = [m for m in eager["metrics"] if "val_ppl" in m] if eager else []
    target = evals[-1]["val_ppl"] if evals else None
    lines = ["| run | attention | tokens | training time (s) | median tokens/s | final val ppl | "
             f"time to val ppl {target:.2f} (eager's final) (s) | speed-up over eager |"
             if target else "| run | attention | tokens | training time (s) | median tokens/s | final val ppl | – | – |",
             "|---|---|---|---|---|---|---|---|"]
    reference = seconds_to_reach(eager["metrics"], target) if target else None
    for name in TABLE2_RUNS:
        record = records.get(name)
        if not record:
            continue
        rates = [m["tokens_per_s"] for m in record["metrics"] if m.get("tokens_per_s")]
        final = [m["val_ppl"] for m in record["metrics"] if "val_ppl" in m]
        reached = seconds_to_reach(record["metrics"], target) if target else None
        speedup = f"{reference / reached:.2f}" if reached and reference else "–"
        lines.append(f"| {name} | {name[3:]} | {record.get('tokens', 0) / 1e6:.1f}M | "
                     f"{train_time(record):.0f} | {statistics.median(rates[1:] or rates):,.0f} | "
                     f"{final[-1]:.2f} | {f'{reached:.0f}' if reached else 'not reached'} | {speedup} |"
                     if rates and final else f"| {name} | failed (exit {record['returncode']}) |")
    return "\n".join(lines) + "\n"


def plot(records, path: Path, caption: str, rows, title: str = "GPT-2 small on the Linux corpus"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name in rows:
        evaluation = (records.get(name) or {}).get("evaluation")
        if not evaluation:
            continue
        entry = max(evaluation["runs"][0]["contexts"], key=lambda e: e["effective_context"])
        centers = [(b["start"] + b["end"]) / 2 for b in entry["buckets"]]
        axis.plot(centers, [b["loss"] for b in entry["buckets"]], marker="o",
                  label=f"{name} (scored at {entry['effective_context']})")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("token position in document")
    axis.set_ylabel("validation loss (nats)")
    axis.set_title(f"{title}: loss by position, same target tokens")
    axis.legend()
    dates = sorted({r.get("date", "") for r in records.values()})
    figure.text(0.01, 0.01, f"{caption}; {', '.join(dates)}\npython scripts/reproduce.py run (configs/"
                "experiment/repro_linux_*.yaml); all models on the same 131,072 target tokens", fontsize=6)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(path, dpi=120)


def evaluated_run(records: dict, name: str | None) -> dict | None:
    """The evaluation of run record ``name`` (``trainer.evaluate``'s entry, named as the record), or
    None."""
    runs = ((records.get(name) or {}).get("evaluation") or {}).get("runs")
    return dict(runs[0], name=name) if runs else None


def shorter_arm(name: str, records: dict) -> str | None:
    """The record of the same series at the next shorter context: 4k -> 2k -> 1k in the run's name,
    else the run its time is compared with (a 2K arm whose series has no 1K arm of its own)."""
    run, tag = series_of(name)
    for longer, shorter in (("4k", "2k"), ("2k", "1k")):
        if longer in run:
            candidate = run.replace(longer, shorter, 1) + tag
            if candidate in records:
                return candidate
            fallback = BASELINE.get(run, "1k") + tag
            return fallback if fallback in records and fallback != name else None
    return None


def paired_lines(rows, records: dict, context: int) -> list[str]:
    """``paired_bootstrap.describe`` of each row against ``shorter_arm``, where both evaluations
    hold per-document losses at ``context`` (older records do not)."""
    lines = []
    for name in rows:
        mine, theirs = evaluated_run(records, name), evaluated_run(records, shorter_arm(name, records))
        if mine is None or theirs is None:
            continue
        try:
            lines.append(paired_bootstrap.describe(paired_bootstrap.compare_runs(mine, theirs, context)))
        except paired_bootstrap.ComparisonError:
            continue
    return lines


def compare(args):
    """Paired bootstrap over the shared target documents for each ``A:B`` pair of run records."""
    records = collect(args.dirs)
    comparisons = []
    try:
        for pair in args.pairs:
            names = pair.split(":")
            if len(names) != 2:
                raise paired_bootstrap.ComparisonError(f"--pairs takes A:B, got {pair!r}")
            evaluated = [evaluated_run(records, name) for name in names]
            for name, run in zip(names, evaluated):
                if run is None:
                    raise paired_bootstrap.ComparisonError(f"{name}: no evaluated run record in {args.dirs}")
            comparisons.append(paired_bootstrap.compare_runs(*evaluated, args.context))
            print(paired_bootstrap.describe(comparisons[-1]))
    except paired_bootstrap.ComparisonError as error:
        sys.exit(f"error: {error}")
    if args.json:
        args.json.write_text(json.dumps(comparisons, indent=1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    running = commands.add_parser("run", help="train and evaluate")
    running.add_argument("--corpus", required=True, help="the Linux corpus directory")
    running.add_argument("--out", type=Path, required=True, help="where the per-run JSON goes")
    running.add_argument("--runs", help="where run directories go (default: a new temporary one)")
    running.add_argument("--only", nargs="+", choices=list(STAGES), default=DEFAULT_RUNS, metavar="RUN",
                         help=f"runs to train (default: {' '.join(DEFAULT_RUNS)}, the Table 4 set; "
                              "lc_1k lc_2k lc_4k: the long-context recipe); one of: " + " ".join(STAGES))
    running.add_argument("--cache", default="/tmp/flashtrain-cache")
    running.add_argument("--num-proc", type=int, default=12)
    running.add_argument("--contexts", nargs="+", type=int, default=[1024, 2048, 4096])
    running.add_argument("--extra", nargs="*", default=[], help="more trainer overrides for every run")
    running.add_argument("--tag", default="", help="suffix of run names (variants of a run)")
    running.add_argument("--no-eval", action="store_true", help="train only")
    reporting = commands.add_parser("report", help="tabulate runs")
    reporting.add_argument("dirs", nargs="+")
    reporting.add_argument("--contexts", nargs="+", type=int, default=[1024, 2048, 4096])
    reporting.add_argument("--md", type=Path)
    reporting.add_argument("--json", type=Path)
    reporting.add_argument("--plot", type=Path)
    reporting.add_argument("--caption", default="", help="card and software versions, for the plot")
    reporting.add_argument("--title", default="GPT-2 small on the Linux corpus", help="the plot's model and data")
    reporting.add_argument("--rows", nargs="+", help="records to tabulate, in order (default: every "
                           "run of every variant series, grouped by series)")
    reporting.add_argument("--plot-rows", nargs="+", help="records to plot (default: 1k 2k 4k 1k_to_4k)")
    comparing = commands.add_parser("compare", help="is A's perplexity lower than B's beyond noise? "
                                    "(paired bootstrap over the shared target documents)")
    comparing.add_argument("dirs", nargs="+")
    comparing.add_argument("--pairs", nargs="+", required=True, help="A:B record names")
    comparing.add_argument("--context", type=int, default=4096, help="the evaluation context compared")
    comparing.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.runs_in_order = list(STAGES)
    {"run": run, "report": report, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
