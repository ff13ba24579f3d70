"""Paired bootstrap over documents: exact on constructed differences, honest about ties, and refusing
evaluations that did not score the same targets."""

import math

import numpy as np
import pytest

from trainer.paired_bootstrap import ComparisonError, compare_runs, describe, paired_difference


def test_a_constant_per_document_difference_is_found_exactly():
    rng = np.random.default_rng(1)
    b = rng.normal(2.0, 0.5, size=40)          # documents differ a lot from each other
    result = paired_difference(b - 0.02, b)    # the models differ by 0.02 nats on every document
    assert result["loss_difference"] == pytest.approx(-0.02)
    assert result["interval"] == pytest.approx([-0.02, -0.02])
    assert result["ppl_ratio"] == pytest.approx(math.exp(-0.02))
    assert result["a_better"] and not result["b_better"]


def test_identical_evaluations_are_a_tie():
    losses = [1.0, 2.0, 3.0]
    result = paired_difference(losses, losses)
    assert result["loss_difference"] == 0 and result["interval"] == [0, 0]
    assert not result["a_better"] and not result["b_better"]


def test_noise_larger_than_the_difference_is_a_tie_and_more_documents_resolve_it():
    rng = np.random.default_rng(2)

    def draw(documents):
        b = rng.normal(2.0, 0.5, size=documents)
        return b + 0.01 + rng.normal(0, 0.05, size=documents), b     # A worse by 0.01 nats, noisily

    few, many = paired_difference(*draw(16)), paired_difference(*draw(4000))
    assert few["interval"][0] < 0 < few["interval"][1] and not (few["a_better"] or few["b_better"])
    # 4000 documents: standard error 0.05 / sqrt(4000) = 0.0008 nats around the true 0.01.
    assert many["b_better"] and many["loss_difference"] == pytest.approx(0.01, abs=0.004)
    assert many["interval"][1] - many["interval"][0] < few["interval"][1] - few["interval"][0]


def _run(name, losses, sha="abc", context=4096):
    loss = float(np.mean(losses))
    return {"name": name, "targets_sha1": sha, "contexts": [
        {"context": context, "ppl": math.exp(loss), "loss": loss, "document_losses": list(losses)}]}


def test_compare_runs_names_the_runs_and_the_verdict():
    comparison = compare_runs(_run("4k", [1.0, 1.5, 2.0]), _run("2k", [1.1, 1.6, 2.1]), 4096)
    assert comparison["a"] == "4k" and comparison["a_better"]
    line = describe(comparison)
    assert line.startswith("4k 4.482 vs 2k 4.953 at 4096") and line.endswith("4k lower")


@pytest.mark.parametrize("runs,message", [
    ((_run("a", [1, 2]), _run("b", [1, 2], sha="other")), "different documents"),
    ((_run("a", [1, 2]), _run("b", [1, 2], context=2048)), "not evaluated at context 4096"),
    ((_run("a", [1, 2]), _run("b", [1, 2, 3])), "different shapes"),
    ((_run("a", [1]), _run("b", [1])), "at least 2"),
])
def test_evaluations_that_cannot_be_paired_are_refused(runs, message):
    with pytest.raises(ComparisonError, match=message):
        compare_runs(*runs, 4096)


def test_an_evaluation_without_per_document_losses_asks_for_a_new_one():
    old = _run("old", [1, 2])
    del old["contexts"][0]["document_losses"]
    with pytest.raises(ComparisonError, match="evaluate the model again"):
        compare_runs(old, _run("b", [1, 2]), 4096)
