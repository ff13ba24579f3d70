"""scripts/bench_loss.py's mask forms, on the CPU: each masked form is the sliced logits' loss and
gradient (the benchmark compares their speed, so they must compute the same thing)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_loss  # noqa: E402


def test_every_masked_form_gives_the_sliced_loss_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(1, 6, bench_loss.HIDDEN).to(torch.bfloat16).requires_grad_()
    weight = (0.02 * torch.randn(bench_loss.PADDED, bench_loss.HIDDEN)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, bench_loss.VOCAB, (1, 6))
    results = {}
    for name, form in bench_loss.forms(bench_loss.padding_row()).items():
        loss = form(x, weight, targets)
        results[name] = (loss, *torch.autograd.grad(loss, (x, weight)))
    sliced = results.pop("sliced")
    unmasked = results.pop("unmasked")
    assert unmasked[0] != sliced[0]          # the padding columns enter its softmax
    assert len(results) == 4
    for name, (loss, grad_x, grad_weight) in results.items():
        torch.testing.assert_close(loss, sliced[0], rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(grad_x, sliced[1], msg=name)
        torch.testing.assert_close(grad_weight, sliced[2], msg=name)
        assert torch.all(grad_weight[bench_loss.VOCAB:] == 0), name
