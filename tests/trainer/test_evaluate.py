"""Long-context evaluation: window coverage, exact scores, context sensitivity, the command line."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from models import build_model, save_model
from trainer.evaluate import evaluate_contexts, position_buckets, score_positions, window_plan

from .helpers import ROOT


@pytest.mark.parametrize("length,context,stride", [(12, 4, 2), (50, 16, 8), (50, 16, 16), (9, 30, 5),
                                                   (33, 8, 3)])
def test_every_position_is_scored_once_with_enough_context(length, context, stride):
    seen = []
    for start, end, first in window_plan(length, context, stride):
        assert end - start == min(context, length - 1)
        for position in range(first, end + 1):
            seen.append(position)
            # position p reads tokens start..p-1: its whole prefix, or at least C - S + 1 tokens
            assert start == 0 or position - start >= min(context, length - 1) - stride + 1
    assert seen == list(range(1, length))


def _tiny_gpt(vocab=40, positions=64):
    return build_model("gpt2_tiny", vocab_size=vocab, max_seqlen=positions, attention="sdpa",
                       dropout=0.0, attn_dropout=0.0, seed=3).eval()


@pytest.mark.parametrize("terminal", [True, False])
def test_a_progress_bar_is_drawn_on_a_terminal_only(terminal, monkeypatch):
    import io

    class Stderr(io.StringIO):
        def isatty(self):
            return terminal
    stderr = Stderr()
    monkeypatch.setattr(sys, "stderr", stderr)
    score_positions(_tiny_gpt(), torch.randint(0, 40, (3, 12)), 4, 2, batch_tokens=8,
                    device=torch.device("cpu"), description="context 4")
    assert ("context 4:" in stderr.getvalue()) == terminal


def test_scores_equal_a_hand_computation_per_position():
    model = _tiny_gpt()
    documents = torch.randint(0, 40, (3, 12))
    context, stride = 4, 2
    nll = score_positions(model, documents, context, stride, batch_tokens=8, device=torch.device("cpu"))
    assert torch.isnan(nll[:, 0]).all()
    for start, end, first in window_plan(12, context, stride):
        for position in range(first, end + 1):
            for d in range(3):
                logits = model(documents[d:d + 1, start:position])[0, -1].double()
                expected = -F.log_softmax(logits, -1)[documents[d, position]]
                torch.testing.assert_close(nll[d, position], expected, rtol=1e-5, atol=1e-5)


def test_a_window_that_covers_the_document_equals_one_full_pass():
    model = _tiny_gpt()
    documents = torch.randint(0, 40, (2, 30))
    with torch.no_grad():
        full = F.cross_entropy(model(documents[:, :-1]).transpose(1, 2), documents[:, 1:], reduction="none")
    result = evaluate_contexts(model, documents, [29, 64], device=torch.device("cpu"), target_start=10)
    for entry in result:
        assert entry["effective_context"] == 29 if entry["context"] == 29 else entry["effective_context"] == 64
        torch.testing.assert_close(torch.tensor(entry["loss"], dtype=torch.float64), full[:, 9:].double().mean(), rtol=1e-5, atol=1e-6)


class KGram(nn.Module):
    """A model that sees exactly the last k tokens (a causal convolution): it cannot use more."""

    def __init__(self, vocab, k):
        super().__init__()
        self.k = k
        self.embed = nn.Embedding(vocab, 16)
        self.conv = nn.Conv1d(16, 16, k)
        self.out = nn.Linear(16, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids).transpose(1, 2)
        x = self.conv(F.pad(x, (self.k - 1, 0)))
        return self.out(torch.tanh(x.transpose(1, 2)))


def test_a_model_blind_beyond_k_tokens_gains_nothing_from_longer_context():
    torch.manual_seed(0)
    k = 8
    model = KGram(30, k).eval()
    documents = torch.randint(0, 30, (4, 128))
    with torch.no_grad():
        by_context = {c: score_positions(model, documents, c, c // 2, 4096, torch.device("cpu"))
                      for c in (2 * k, 32, 127)}
    for c in (32, 127):   # every position p >= k sees >= k tokens at these contexts
        torch.testing.assert_close(by_context[c][:, k:], by_context[2 * k][:, k:], rtol=1e-6, atol=1e-6)
    # with fewer than k tokens of context (context k, stride k/2) it does lose information
    short = score_positions(model, documents, k, k // 2, 4096, torch.device("cpu"))
    assert not torch.allclose(short[:, k:], by_context[127][:, k:])
    assert position_buckets(4096)[-1] == (2048, 4096) and position_buckets(4096)[0] == (1, 64)


def test_command_line_end_to_end_and_errors(tmp_path):
    text = " ".join(f"word{i % 17} token{i % 5}" for i in range(400))
    (tmp_path / "docs").mkdir()
    for index in range(3):
        (tmp_path / "docs" / f"d{index}.txt").write_text(text)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    run = tmp_path / "run"
    run.mkdir()
    tokenizer.save(str(run / "tokenizer.json"))
    save_model(_tiny_gpt(tokenizer.get_vocab_size(), 32), run / "model.pt")
    command = [sys.executable, "-m", "trainer.evaluate", str(run), "--documents", str(tmp_path / "docs" / "*.txt"),
               "--contexts", "16", "64", "--device", "cpu", "--out", str(tmp_path / "eval.json")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    entries = report["runs"][0]["contexts"]
    assert [e["effective_context"] for e in entries] == [16, 32]   # trained on 32 positions
    assert report["documents"] == 3 and entries[0]["target_tokens"] == 3 * 16
    # Each document's mean target loss, for paired comparisons: their mean is the reported loss.
    for entry in entries:
        assert len(entry["document_losses"]) == 3
        assert sum(entry["document_losses"]) / 3 == pytest.approx(entry["loss"], rel=1e-6)
    (run / "tokenizer.json").unlink()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "no tokenizer" in result.stderr and "Traceback" not in result.stderr
