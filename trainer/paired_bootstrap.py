"""Is one model's perplexity really lower than another's on the same target tokens?

Two models scored on the same documents (``python -m trainer.evaluate``, the same ``targets_sha1``)
differ per document, and documents differ far more from each other than the models do. A paired
bootstrap over documents resamples whole documents, the same draw for both models, and reads the
spread of the mean loss difference: a difference whose 95 % interval holds 0 is a tie at this
number of documents, whatever the two perplexities' last digits say.
"""

import math

import numpy as np


class ComparisonError(ValueError):
    """Two evaluations that cannot be compared pairwise; the message says why."""


def paired_difference(losses_a, losses_b, resamples: int = 10000, seed: int = 0,
                      confidence: float = 0.95) -> dict:
    """Mean loss of A minus B over documents (nats; negative: A is better), its bootstrap interval,
    and the perplexity ratio exp(difference) with the same interval. Each document counts once, as
    every document contributes the same number of targets in an evaluation."""
    a, b = np.asarray(losses_a, dtype=np.float64), np.asarray(losses_b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ComparisonError(f"per-document losses of different shapes: {a.shape} and {b.shape}; "
                              "both must score the same documents")
    if a.size < 2:
        raise ComparisonError(f"{a.size} document(s): a bootstrap needs at least 2")
    differences = a - b
    draws = np.random.default_rng(seed).integers(0, differences.size, size=(resamples, differences.size))
    means = differences[draws].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    mean = float(differences.mean())
    return {"documents": int(differences.size), "loss_difference": mean,
            "interval": [float(low), float(high)], "confidence": confidence,
            "ppl_ratio": math.exp(mean), "ppl_ratio_interval": [math.exp(low), math.exp(high)],
            "a_better": bool(high < 0), "b_better": bool(low > 0)}


def context_entry(run: dict, context: int) -> dict:
    """The entry of ``run`` (one of an evaluation's ``runs``) at the requested ``context``."""
    for entry in run["contexts"]:
        if entry["context"] == context:
            if "document_losses" not in entry:
                raise ComparisonError(f"{run['name']}: the evaluation at context {context} has no "
                                      "per-document losses (written by trainer.evaluate since "
                                      "2026-12-02); evaluate the model again")
            return entry
    raise ComparisonError(f"{run['name']}: not evaluated at context {context} "
                          f"(has {[e['context'] for e in run['contexts']]})")


def compare_runs(run_a: dict, run_b: dict, context: int, **options) -> dict:
    """``paired_difference`` of two evaluated runs at ``context``, refusing runs scored on
    different target tokens."""
    if run_a.get("targets_sha1") != run_b.get("targets_sha1"):
        raise ComparisonError(f"{run_a['name']} and {run_b['name']} were scored on different documents "
                              f"(targets {run_a.get('targets_sha1')} and {run_b.get('targets_sha1')})")
    entry_a, entry_b = context_entry(run_a, context), context_entry(run_b, context)
    return {"a": run_a["name"], "b": run_b["name"], "context": context, "ppl_a": entry_a["ppl"],
            "ppl_b": entry_b["ppl"],
            **paired_difference(entry_a["document_losses"], entry_b["document_losses"], **options)}


def describe(comparison: dict) -> str:
    """One line: the two perplexities, the ratio with its interval, and the verdict."""
    low, high = comparison["ppl_ratio_interval"]
    verdict = (f"{comparison['a']} lower" if comparison["a_better"] else
               f"{comparison['b']} lower" if comparison["b_better"] else "a tie")
    return (f"{comparison['a']} {comparison['ppl_a']:.3f} vs {comparison['b']} {comparison['ppl_b']:.3f} "
            f"at {comparison['context']}: ppl ratio {comparison['ppl_ratio']:.4f} "
            f"({comparison['confidence']:.0%} interval {low:.4f}-{high:.4f}, "
            f"{comparison['documents']} documents): {verdict}")
