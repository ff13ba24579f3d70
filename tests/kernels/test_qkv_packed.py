"""flash_attention_qkvpacked: the same outputs and gradients as flash_attention on the q, k, v views
of one tensor, compiled (the packed custom ops) and eager; its compiled backward writes one gradient,
so no concatenation of three follows it."""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from kernels import _backward, _eager_plan, flash_attention, flash_attention_qkvpacked
from kernels._launch import Tiles
from kernels.qkv_packed import split_qkv


def packed_and_split(qkv, heads_k, options, compiled):
    """(out, grad of qkv) from the packed call and from flash_attention on the split views."""
    torch.manual_seed(7)
    grad_out = None
    results = []
    for call in (lambda t: flash_attention_qkvpacked(t, heads_k, **options),
                 lambda t: flash_attention(*split_qkv(t, heads_k), **options)):
        fn = torch.compile(call, backend="aot_eager", fullgraph=True) if compiled else call
        torch.manual_seed(11)                      # the same dropout seed and offset for both
        leaf = qkv.detach().clone().requires_grad_()
        out = fn(leaf)
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        out.backward(grad_out)
        results.append((out, leaf.grad))
    return results


@pytest.mark.parametrize("compiled, heads_k, options", [
    (True, 1, dict(causal=True)),                                  # GQA: 2 query heads on 1 kv-head
    (False, 1, dict(causal=True)),                                 # eager: flash_attention's path
    (True, 2, dict(causal=False, dropout_p=0.2)),
    (True, 2, dict(causal=True, window=(7, 0)))],
    ids=["gqa-causal-compiled", "gqa-causal-eager", "dropout-compiled", "window-compiled"])
def test_packed_equals_the_split_views(device, compiled, heads_k, options):
    heads = 2 + 2 * heads_k if heads_k == 1 else 3 * heads_k
    qkv = torch.randn(2, 37 if not options.get("dropout_p") else 21, heads, 16, device=device)
    (out, grad), (want_out, want_grad) = packed_and_split(qkv, heads_k, options, compiled)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_packed_documents_and_the_fused_pass_write_their_slices(device, monkeypatch):
    # Variable length, and the fused backward (dQ through a float32 buffer copied into its slice).
    default = _backward.dkdv_tiles
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: Tiles(
        *(getattr(default(*args, **kwargs), f) for f in ("block_m", "block_n", "num_warps", "num_stages")),
        fused=True))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    qkv = torch.randn(50, 6, 16, device=device)
    cu_seqlens = torch.tensor([0, 20, 31, 50], dtype=torch.int32, device=device)
    options = dict(causal=True, cu_seqlens=cu_seqlens, max_seqlen=20)
    (out, grad), (want_out, want_grad) = packed_and_split(qkv, 2, options, compiled=True)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_the_compiled_backward_has_no_concatenation(device):
    backward_graphs = []

    def keep_backward(graph_module, _):
        backward_graphs.append(graph_module)
        return make_boxed_func(graph_module)
    backend = aot_autograd(fw_compiler=lambda graph_module, _: make_boxed_func(graph_module),
                           bw_compiler=keep_backward)
    projection = torch.nn.Linear(32, 96).to(device)
    x = torch.randn(2, 24, 32, device=device)

    def layer(x, packed):
        qkv = projection(x).view(2, 24, 6, 16)
        if packed:
            return flash_attention_qkvpacked(qkv, causal=True)
        return flash_attention(*split_qkv(qkv, 2), causal=True)
    for packed in (True, False):
        torch._dynamo.reset()
        torch.compile(layer, backend=backend, fullgraph=True)(x, packed).sum().backward()
    torch._dynamo.reset()
    targets = [{str(node.target) for node in graph.graph.nodes} for graph in backward_graphs]
    assert not any("cat" in target for target in targets[0])
    assert any("cat" in target for target in targets[1])         # what the split views cost


def test_bad_packings_are_named():
    with pytest.raises(ValueError, match="are not three equal groups; pass heads_k"):
        flash_attention_qkvpacked(torch.randn(1, 8, 4, 16))
    with pytest.raises(ValueError, match="heads_k=2 must be >= 1 and leave query heads among the 4"):
        flash_attention_qkvpacked(torch.randn(1, 8, 4, 16), heads_k=2)
    with pytest.raises(ValueError, match="qkv must be a 4-D"):
        flash_attention_qkvpacked(torch.randn(8, 16))
