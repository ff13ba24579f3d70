"""Plot and compare runs from their metrics.jsonl.

    python -m trainer.plot_metrics outputs/run1 [outputs/run2 ...] --out plots/
    flashtrain-plot outputs/sweep/*                          # the same, as an installed command

Writes ``loss.png`` (train and validation loss against steps and against tokens) and
``lr_throughput.png`` (learning rate and tokens/s against steps), every run overlaid, and prints a
Markdown table: steps, tokens, final loss, final and best validation perplexity, median tokens/s,
MFU and peak memory. A resumed run's replayed steps count once (the last line of each step). Under
it: the settings in which the runs' configs differ, and a warning when they ran on different devices.
"""

import argparse
import sys
from pathlib import Path

from .checkpoint import default_settings, flat_settings
from .environment import read_environment
from .metrics import read_metrics
from .run_summary import format_table, summarize


def run_name(path: Path, all_paths) -> str:
    """The shortest trailing part of the path that tells the runs apart."""
    parts = path.resolve().parts
    for depth in range(1, len(parts) + 1):
        names = ["/".join(p.resolve().parts[-depth:]) for p in all_paths]
        if len(set(names)) == len(names):
            return "/".join(parts[-depth:])
    return str(path)


def device_note(environments: dict) -> str | None:
    """A warning when the runs' throughput is not comparable: they ran (last started) on
    different devices or process counts, by their environment.json."""
    where = {name: f"{starts[-1]['device']} x {starts[-1]['processes']}"
             for name, starts in environments.items() if starts}
    if len(set(where.values())) < 2:
        return None
    return ("note: these runs ran on different devices, so their tokens/s and MFU do not compare: "
            + "; ".join(f"{name}: {device}" for name, device in where.items()))


def config_differences(configs: dict) -> str | None:
    """A Markdown table of the settings in which the runs' configs (``.hydra/config.yaml``)
    differ; None when fewer than two runs have one or they agree. A key that a run's config
    predates counts as its default, as on a resume."""
    defaults = default_settings()
    flat = {name: {**defaults, **flat_settings(config)} for name, config in configs.items()
            if config is not None}
    if len(flat) < 2:
        return None
    keys = sorted(set().union(*flat.values()))
    differing = [key for key in keys if len({repr(f.get(key, "–")) for f in flat.values()}) > 1]
    if not differing:
        return None
    lines = ["| setting | " + " | ".join(flat) + " |", "|---" * (len(flat) + 1) + "|"]
    lines += [f"| {key} | " + " | ".join(str(f.get(key, "–")) for f in flat.values()) + " |"
              for key in differing]
    return "settings that differ:\n" + "\n".join(lines)


def run_config(path: Path) -> dict | None:
    """A run's resolved config as a dict (None for a run without a readable .hydra/config.yaml)."""
    from omegaconf import OmegaConf
    try:
        return OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml"))
    except (OSError, ValueError):
        return None


def plot(runs: dict, out: Path):
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plot_metrics: plotting needs matplotlib (pip install matplotlib); "
                         "--no-plot prints the table only") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    figure, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, metrics in runs.items():
        train, evals = metrics["train"], metrics["eval"]
        line, = by_step.plot([r["step"] for r in train], [r["loss"] for r in train], label=f"{name} train")
        by_tokens.plot([r["tokens"] for r in train], [r["loss"] for r in train], color=line.get_color())
        if evals:
            steps = [r["step"] for r in evals]
            by_step.plot(steps, [r["val_loss"] for r in evals], "o--", color=line.get_color(),
                         label=f"{name} validation")
            tokens_at = {r["step"]: r["tokens"] for r in train}
            pairs = [(tokens_at[r["step"]], r["val_loss"]) for r in evals if r["step"] in tokens_at]
            if pairs:
                by_tokens.plot(*zip(*pairs), "o--", color=line.get_color())
    by_step.set(xlabel="step", ylabel="loss (nats)", title="loss against steps")
    by_tokens.set(xlabel="tokens", ylabel="loss (nats)", title="loss against tokens")
    _finish(plt, figure, by_step, out / "loss.png")

    figure, (lr, speed) = plt.subplots(1, 2, figsize=(12, 4))
    for name, metrics in runs.items():
        train = metrics["train"]
        lr.plot([r["step"] for r in train], [r["lr"] for r in train], label=name)
        timed = [r for r in train if r.get("tokens_per_s")]
        speed.plot([r["step"] for r in timed], [r["tokens_per_s"] for r in timed], label=name)
    lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    speed.set(xlabel="step", ylabel="tokens/s", title="throughput (per log window)")
    _finish(plt, figure, lr, out / "lr_throughput.png")


def _finish(plt, figure, legend_axis, path: Path):
    legend_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("plots"), help="where the PNGs go (default: plots/)")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.runs if not (p / "metrics.jsonl").is_file()]
    if missing:
        sys.exit("plot_metrics: no metrics.jsonl in " + ", ".join(missing))
    runs = {}
    for path in args.runs:
        try:
            metrics = read_metrics(path)
        except ValueError as error:
            sys.exit(f"plot_metrics: {error}")
        if not metrics["train"]:
            sys.exit(f"plot_metrics: {path}/metrics.jsonl has no training lines yet")
        runs[run_name(path, args.runs)] = metrics
    print(format_table({name: summarize(metrics) for name, metrics in runs.items()}))
    note = device_note({run_name(path, args.runs): read_environment(path) for path in args.runs})
    if note:
        print(note)
    differences = config_differences({run_name(path, args.runs): run_config(path) for path in args.runs})
    if differences:
        print(differences)
    if not args.no_plot:
        plot(runs, args.out)
        print(f"wrote {args.out / 'loss.png'} and {args.out / 'lr_throughput.png'}")


if __name__ == "__main__":
    main()
