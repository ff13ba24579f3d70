"""Long-context evaluation: the same target tokens scored at several context lengths.

    python -m trainer.evaluate outputs/run1 --documents /data/linux-6.1 --split test \
        --contexts 256 1024 2048 4096 --out eval.json --plot eval.png

Documents of at least ``--doc-tokens`` tokens (default: the longest context) are cut to that
length. Every position p >= 1 of every document is scored once, with up to C tokens of its own
document before it: a sliding window whose first placement scores positions 1..C and whose later
placements each score the next ``stride`` positions (so every token sees at least C - stride + 1
tokens of context, or its whole prefix). A model trained on a shorter context than C is evaluated
at its own. Reported per context: perplexity on the shared targets (positions from
``--target-start``, by default the last quarter of each document), and the loss per log-spaced
position bucket (1-64, 64-128, ..., 2K-4K) which shows how much the model uses longer context.
"""

import argparse
import glob
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import CheckpointError

from .data import load_tokenizer
from .model_source import ModelSourceError, find_model


class EvaluationError(ValueError):
    """Bad evaluation input: no model, no tokenizer, too few long documents. The message names it."""


def window_plan(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(start, end, first)`` over a document of ``length`` tokens: the model reads tokens
    [start, end) and its predictions score target positions first..end (position p is predicted
    from the tokens before it). Positions 1..length-1 are each scored exactly once."""
    context = min(context, length - 1)
    if context < 1 or stride < 1:
        raise EvaluationError(f"context ({context}) and stride ({stride}) must be >= 1")
    plan, last = [(0, context, 1)], context
    while last < length - 1:
        end = min(last + stride, length - 1)
        plan.append((end - context, end, last + 1))
        last = end
    return plan


@torch.no_grad()
def score_positions(model, documents: torch.Tensor, context: int, stride: int, batch_tokens: int,
                    device, description: str = "scoring") -> torch.Tensor:
    """Negative log-likelihood (nats) of every position 1..L-1 of each document, as (D, L) float64
    with NaN at position 0: windows of equal length, batched across documents. A progress bar
    (``description``) is drawn when stderr is a terminal."""
    count, length = documents.shape
    nll = torch.full((count, length), float("nan"), dtype=torch.float64)
    plan = window_plan(length, context, stride)
    rows = [(d, start, end, first) for d in range(count) for start, end, first in plan]
    per_batch = max(1, batch_tokens // (plan[0][1] - plan[0][0]))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)
    for index in tqdm(range(0, len(rows), per_batch), desc=description, unit="batch", leave=False,
                      disable=None):   # None: no bar unless stderr is a terminal
        chunk = rows[index:index + per_batch]
        inputs = torch.stack([documents[d, start:end] for d, start, end, _ in chunk]).to(device)
        targets = torch.stack([documents[d, start + 1:end + 1] for d, start, end, _ in chunk]).to(device)
        with autocast:
            logits = model(inputs)
        losses = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none").double().cpu()
        for row, (d, start, end, first) in enumerate(chunk):
            # losses[row, i] scores position start + 1 + i; keep positions first..end.
            nll[d, first:end + 1] = losses[row, first - start - 1:end - start]
    return nll


def position_buckets(length: int) -> list[tuple[int, int]]:
    """Log-spaced position ranges: [1, 64), [64, 128), [128, 256), ... up to ``length``."""
    edges = [1, 64]
    while edges[-1] < length:
        edges.append(edges[-1] * 2)
    edges[-1] = length
    return list(zip(edges[:-1], edges[1:]))


def summarize(nll: torch.Tensor, target_start: int) -> dict:
    """Loss and perplexity on the targets, loss per position bucket, and each document's mean loss on
    its targets (for paired comparisons between models: ``trainer.paired_bootstrap``)."""
    targets = nll[:, target_start:]
    loss = float(targets.mean())
    buckets = [{"start": lo, "end": hi, "loss": float(nll[:, lo:hi].mean()), "tokens": nll[:, lo:hi].numel()}
               for lo, hi in position_buckets(nll.shape[1])]
    return {"loss": loss, "ppl": math.exp(loss), "target_tokens": targets.numel(), "buckets": buckets,
            "document_losses": targets.double().mean(dim=1).tolist()}


def model_context(model) -> int | None:
    """The context the model was trained for (learned positions or rope), or None if unbounded."""
    config = getattr(model, "config", None)
    return getattr(config, "max_seqlen", None)


def evaluate_contexts(model, documents: torch.Tensor, contexts, stride_fraction: float = 0.5,
                      target_start: int | None = None, batch_tokens: int = 16384, device=None) -> list:
    device = device or next(model.parameters()).device
    length = documents.shape[1]
    target_start = target_start if target_start is not None else length * 3 // 4
    trained = model_context(model)
    results = []
    for requested in contexts:
        effective = min(requested, trained) if trained else requested
        stride = max(1, int(effective * stride_fraction))
        nll = score_positions(model, documents, effective, stride, batch_tokens, device,
                              f"context {requested}")
        results.append({"context": requested, "effective_context": effective, "stride": stride,
                        **summarize(nll, target_start)})
    return results


# -- inputs ----------------------------------------------------------------------------------------
def load_any_model(path: Path, attention: str):
    """(model, tokenizer path or None): see trainer.model_source for what ``path`` may be."""
    try:
        source = find_model(path)
        return source.load(attention=attention), source.tokenizer
    except (ModelSourceError, CheckpointError) as error:
        raise EvaluationError(str(error)) from None


def read_documents(source: str, split: str) -> list[str]:
    """Texts from a parquet file, a directory of {split}.parquet (the Linux corpus layout), or a
    glob of text files."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / f"{split}.parquet").exists():
        path = path / f"{split}.parquet"
    if path.suffix == ".parquet" and path.is_file():
        import pyarrow.parquet as pq
        return [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]
    files = sorted(glob.glob(str(path), recursive=True)) if not path.is_dir() else \
        sorted(str(p) for p in path.rglob("*") if p.is_file())
    texts = [Path(f).read_text(errors="replace") for f in files]
    if not texts:
        raise EvaluationError(f"--documents {source}: no parquet split {split!r} and no text files")
    return texts


def long_documents(texts, tokenizer, length: int, max_documents: int) -> torch.Tensor:
    """The first ``length`` tokens of the first ``max_documents`` documents that have as many."""
    kept = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        if len(ids) >= length:
            kept.append(ids[:length])
            if len(kept) == max_documents:
                break
    if not kept:
        raise EvaluationError(f"no document has {length} tokens; lower --doc-tokens or use longer documents")
    return torch.tensor(np.array(kept, dtype=np.int64))


def plot(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for run in results["runs"]:
        for entry in run["contexts"]:
            centers = [(b["start"] + b["end"]) / 2 for b in entry["buckets"]]
            axis.plot(centers, [b["loss"] for b in entry["buckets"]], marker="o",
                      label=f"{run['name']} @ {entry['effective_context']}")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("position in document (tokens)")
    axis.set_ylabel("loss (nats)")
    axis.set_title(f"loss by position, {results['documents']} documents of {results['doc_tokens']} tokens")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="run directories, model files or HF directories")
    parser.add_argument("--documents", required=True, help="parquet file, corpus directory or text glob")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: next to each model)")
    parser.add_argument("--contexts", nargs="+", type=int, default=[256, 1024, 2048, 4096])
    parser.add_argument("--doc-tokens", type=int, help="document length scored (default: longest context)")
    parser.add_argument("--target-start", type=int, help="first shared target position (default: 3/4 of doc-tokens)")
    parser.add_argument("--max-documents", type=int, default=128)
    parser.add_argument("--stride-fraction", type=float, default=0.5, help="stride = context x this")
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    parser.add_argument("--plot", type=Path, help="PNG of loss by position")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    length = args.doc_tokens or max(args.contexts)
    try:
        texts = read_documents(args.documents, args.split)
        results = {"documents_source": args.documents, "split": args.split, "doc_tokens": length,
                   "target_start": args.target_start or length * 3 // 4, "runs": []}
        for path in args.models:
            model, found_tokenizer = load_any_model(path, "auto" if device.type == "cuda" else "sdpa")
            tokenizer_path = args.tokenizer or found_tokenizer
            if tokenizer_path is None or not Path(tokenizer_path).is_file():
                raise EvaluationError(f"{path}: no tokenizer.json next to the model or in its run "
                                      "directory; pass --tokenizer")
            documents = long_documents(texts, load_tokenizer(tokenizer_path), length, args.max_documents)
            model = model.to(device).eval()
            contexts = evaluate_contexts(model, documents, args.contexts, args.stride_fraction,
                                         args.target_start, args.batch_tokens, device)
            digest = hashlib.sha1(documents.numpy().tobytes()).hexdigest()[:12]
            results["runs"].append({"name": path.name if path.is_dir() else path.stem, "path": str(path),
                                    "trained_context": model_context(model), "targets_sha1": digest,
                                    "contexts": contexts})
            results["documents"] = documents.shape[0]
            for entry in contexts:
                print(f"{path}: context {entry['context']} (effective {entry['effective_context']}, "
                      f"stride {entry['stride']}): ppl {entry['ppl']:.2f} on {entry['target_tokens']} "
                      f"targets", flush=True)
    except (EvaluationError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1))
    temporary.replace(args.out)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
