"""Turn the attention benchmark's JSON into Markdown tables and PNG plots beside it.

    python scripts/report_attention.py docs/results/attention_h100.json
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

SDPA = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math")


def _cells(records):
    cells = defaultdict(dict)
    for record in records:
        if record.get("sweep"):
            continue
        key = (record["dtype"], record["head_dim"], record["seqlen"], record["causal"], record["dropout_p"])
        cells[key][record["provider"]] = record
    return cells


def _fmt(record, field):
    if record is None or field not in record:
        return "–"
    return f"{record[field]:.0f}"


def speed_table(cells, dtype):
    lines = [f"### {dtype}: forward / forward+backward TFLOP/s",
             "",
             "| head dim | seqlen | causal | dropout | flashtrain | sdpa_flash (FA2) | sdpa_cudnn | "
             "sdpa_efficient | flex | vs FA2 (fwd+bwd) | vs best SDPA (fwd+bwd) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(k for k in cells if k[0] == dtype):
        row = cells[key]
        ours = row.get("flashtrain", {}).get("fwdbwd_tflops")
        fa2 = row.get("sdpa_flash", {}).get("fwdbwd_tflops")
        best = max((row[p].get("fwdbwd_tflops", 0) for p in SDPA if p in row), default=0)
        pair = lambda p: f"{_fmt(row.get(p), 'fwd_tflops')} / {_fmt(row.get(p), 'fwdbwd_tflops')}"
        ratio_fa2 = f"{ours / fa2:.2f}{'' if ours >= fa2 else ' ✗'}" if ours and fa2 else "–"
        ratio_best = f"{ours / best:.2f}" if ours and best else "–"
        _, head_dim, seqlen, causal, dropout_p = key
        lines.append(f"| {head_dim} | {seqlen} | {int(causal)} | {dropout_p} | **{pair('flashtrain')}** | "
                     f"{pair('sdpa_flash')} | {pair('sdpa_cudnn')} | {pair('sdpa_efficient')} | "
                     f"{pair('flex')} | {ratio_fa2} | {ratio_best} |")
    return "\n".join(lines)


def memory_table(records):
    sweep = [r for r in records if r.get("sweep") == "memory"]
    seqlens = sorted({r["seqlen"] for r in sweep})
    by = {(r["provider"], r["seqlen"]): r for r in sweep}
    providers = sorted({r["provider"] for r in sweep})
    lines = ["| seqlen | " + " | ".join(f"{p} peak GB" for p in providers) + " |",
             "|---|" + "---|" * len(providers)]
    for seqlen in seqlens:
        cells = []
        for provider in providers:
            record = by.get((provider, seqlen), {})
            cells.append(f"{record['peak_mem_gb']:.2f}" if "peak_mem_gb" in record
                         else ("out of memory" if "OutOfMemory" in record.get("error", "") else "–"))
        lines.append(f"| {seqlen} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _repetitions(records):
    """How each cell was timed, from the records (older records carry no rep_ms or rounds)."""
    reps = " or ".join(f"{r:.0f}" for r in sorted({r["rep_ms"] for r in records if "rep_ms" in r}))
    rounds = max((len(r.get("rounds_ms", [])) for r in records), default=0)
    window = f"a do_bench median over {reps or '~50'} ms of repetitions"
    if rounds:
        return (f"Each timing is the median of {rounds} rounds that alternate between the cell's "
                f"providers, each round {window} (the longer budget at 16K tokens, where one "
                "forward+backward takes ~10 ms).")
    return f"Each timing is {window}."


def numerics(records):
    """The benchmark's own correctness check of every flashtrain cell, summarized."""
    checked = [r for r in records if "check_passed" in r]
    if not checked:
        return []
    passed = sum(r["check_passed"] for r in checked)
    worst = ", ".join(
        f"{dtype} {max(max(r['rel_err']) for r in checked if r['dtype'] == dtype):.1e} (PyTorch's own "
        f"{max(max(r['torch_rel_err']) for r in checked if r['dtype'] == dtype):.1e})"
        for dtype in sorted({r["dtype"] for r in checked}))
    return [f"- Numerics: {passed} of {len(checked)} flashtrain cells pass the check against float32 "
            f"(output and gradients of one head, at most 2x PyTorch's own error in the dtype); largest "
            f"relative error {worst}."]


def targets(cells, records):
    """Where the project's speed targets stand, computed from the records (not typed by hand)."""
    def fwdbwd(row, provider):
        return row.get(provider, {}).get("fwdbwd_tflops")

    lines = ["## Targets, cell by cell (computed from the records)", ""] + numerics(records)
    for dropout_p in (0.0, 0.1):
        keys = [k for k in sorted(cells) if k[4] == dropout_p]
        misses = [k for k in keys if (fwdbwd(cells[k], "flashtrain") or 0) < (fwdbwd(cells[k], "sdpa_flash") or 0)]
        lines.append(f"- Target 1, dropout {dropout_p}: flashtrain forward+backward >= sdpa_flash in "
                     f"{len(keys) - len(misses)} of {len(keys)} cells." + (" Misses: " + "; ".join(
                         f"{k[0]} d={k[1]} N={k[2]} causal={int(k[3])} "
                         f"({fwdbwd(cells[k], 'flashtrain'):.0f} vs {fwdbwd(cells[k], 'sdpa_flash'):.0f})"
                         for k in misses) if misses else ""))
    keys = [k for k in sorted(cells) if k[4] > 0]
    ratios = []
    for k in keys:
        best = max(fwdbwd(cells[k], p) or 0 for p in SDPA)
        ratios.append((fwdbwd(cells[k], "flashtrain") / best, k))
    met = sum(r >= 1 for r, _ in ratios)
    if ratios:      # a partial grid (--seqlens, --head-dims) may lack some targets' cells
        lines.append(f"- Target 2 (dropout 0.1, >= the best SDPA backend): met in {met} of {len(ratios)} "
                     f"cells; ratio to the best ranges {min(ratios)[0]:.2f}–{max(ratios)[0]:.2f}.")
    for head_dim in sorted({k[1] for k in cells}):
        long = [k for k in cells if k[1] == head_dim and k[4] == 0 and k[2] >= 4096]
        values = [fwdbwd(cells[k], "flashtrain") / fwdbwd(cells[k], "sdpa_cudnn") for k in long
                  if fwdbwd(cells[k], "sdpa_cudnn")]
        if not values:
            continue
        lines.append(f"- Target 3 (no dropout, ratio to cuDNN), head dim {head_dim}, seqlen >= 4096: "
                     f"{min(values):.2f}–{max(values):.2f}.")
    longest = [r for r in records if r.get("sweep") == "memory" and r["provider"] == "flashtrain"
               and "peak_mem_gb" in r]
    if longest:
        top = max(longest, key=lambda r: r["seqlen"])
        lines.append(f"- Target 4: a {top['seqlen']}-token sequence runs forward+backward "
                     f"(batch 1, 16 heads, head dim 64, causal) with {top['peak_mem_gb']:.2f} GB peak.")
    return "\n".join(lines)


def plots(result, out_dir: Path, stem: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Every figure says where, when and how it was measured; the baselines are in the same run.
    provenance = (f"{result['card']}, PyTorch {result['torch']}, Triton {result['triton']}, "
                  f"{result['date']}; baselines measured in the same process. {result['command']}")
    cells = _cells(result["records"])
    dtype = "bfloat16"
    head_dims = sorted({k[1] for k in cells})
    figure, axes = plt.subplots(len(head_dims), 4, figsize=(18, 4.2 * len(head_dims)), squeeze=False)
    for row, head_dim in enumerate(head_dims):
        for col, (causal, dropout_p) in enumerate([(False, 0.0), (True, 0.0), (False, 0.1), (True, 0.1)]):
            axis = axes[row][col]
            keys = sorted(k for k in cells if k[:2] == (dtype, head_dim) and k[3:] == (causal, dropout_p))
            for provider in ("flashtrain", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex"):
                points = [(k[2], cells[k][provider]["fwdbwd_tflops"]) for k in keys
                          if provider in cells[k] and "fwdbwd_tflops" in cells[k][provider]]
                if points:
                    axis.plot(*zip(*points), marker="o", label=provider,
                              linewidth=3 if provider == "flashtrain" else 1.5)
            axis.set_xscale("log", base=2)
            axis.set_title(f"d={head_dim}, causal={int(causal)}, dropout={dropout_p}")
            axis.set_xlabel("sequence length")
            axis.set_ylabel("fwd+bwd TFLOP/s")
            axis.grid(alpha=0.3)
    axes[0][0].legend()
    figure.suptitle(f"Attention forward+backward, {dtype}, {result['card']}, 16k tokens per batch")
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.text(0.5, 0.005, provenance, ha="center", fontsize=9)
    figure.savefig(out_dir / f"{stem}_speed.png", dpi=80)
    plt.close(figure)

    sweep = [r for r in result["records"] if r.get("sweep") == "memory"]
    if not sweep:       # a run with --skip-memory-sweep
        return
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for provider in sorted({r["provider"] for r in sweep}):
        points = [(r["seqlen"], r["peak_mem_gb"]) for r in sweep
                  if r["provider"] == provider and "peak_mem_gb" in r]
        axis.plot(*zip(*points), marker="o", label=provider)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("sequence length (batch 1, 16 heads, head dim 64, causal)")
    axis.set_ylabel("peak memory, forward+backward (GB)")
    axis.set_title("Memory: linear (flashtrain) vs quadratic (standard attention)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.text(0.5, 0.005, provenance.replace("; ", "\n", 1), ha="center", fontsize=7)
    figure.savefig(out_dir / f"{stem}_memory.png", dpi=80)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", type=Path)
    args = parser.parse_args()
    result = json.loads(args.json.read_text())
    cells = _cells(result["records"])
    stem = args.json.stem
    swept = any(r.get("sweep") == "memory" for r in result["records"])
    plot_names = f"`{stem}_speed.png`" + (f", `{stem}_memory.png`" if swept else "")
    header = (f"# Attention benchmark: {result['card']}\n\n"
              f"Measured {result['date']} with PyTorch {result['torch']}, Triton {result['triton']}, "
              f"CUDA {result['cuda']}, cuDNN {result['cudnn']}, Python {result['python']}; each "
              f"cell's providers in one process on one card ({result['seconds']} s of benchmark).\n\n"
              + ("**This run was cut short**: the file holds the cells measured before it stopped.\n\n"
                 if result.get("complete") is False else "") +
              f"Command: `{result['command']}` (records: `{args.json.name}`; plots: {plot_names}).\n\n"
              "Protocol: batch × seqlen = 16384 tokens, hidden 2048 (32 heads of 64 or 16 heads of "
              "128); FLOPs 4·B·H·N²·D forward (halved when causal), ×2.5 backward, ×3.5 "
              "forward+backward; `triton.testing.do_bench` medians. flashtrain reads (B, N, H, D) "
              "inputs; SDPA and flex get their native (B, H, N, D). ✗ marks a cell where flashtrain "
              "is slower than sdpa_flash (FlashAttention-2). Cells a provider could not run say why "
              f"in the JSON. {_repetitions(result['records'])} 512- and 1024-token cells are the "
              "most sensitive to host overhead: there a forward+backward's GPU work (~0.5–1 ms) is "
              "within 2x of the time the host takes to issue it.\n")
    dtypes = sorted({k[0] for k in cells})
    body = "\n\n".join(speed_table(cells, dtype) for dtype in dtypes)
    memory = ("## Memory sweep (forward+backward)\n\n"
              + (memory_table(result["records"]) if swept else "Not run here (--skip-memory-sweep)."))
    out = args.json.with_suffix(".md")
    existing = out.read_text() if out.exists() else ""
    # Everything below this marker is written by hand (analysis, targets) and kept.
    marker = "<!-- analysis -->"
    analysis = existing[existing.index(marker):] if marker in existing else marker + "\n"
    temporary = out.with_suffix(".md.tmp")
    temporary.write_text(header + "\n" + targets(cells, result["records"]) + "\n\n## Speed\n\n"
                         + body + "\n\n" + memory + "\n\n" + analysis)
    temporary.replace(out)
    plots(result, args.json.parent, stem)
    print(f"wrote {out} and plots")


if __name__ == "__main__":
    main()
