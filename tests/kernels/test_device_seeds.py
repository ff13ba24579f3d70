"""Dropout seeds drawn on the device (``device_dropout_seeds``), the form CUDA graphs can capture:
the kernels read the seed from memory, the backward regenerates the forward's mask from it, and
``torch.manual_seed`` still governs it."""

import pytest
import torch

from kernels import flash_attention, flash_attention_qkvpacked
from kernels._debug_mask import keep_mask
from kernels._launch import call_geometry
from kernels._philox import drop_threshold
from kernels.flash_attention import device_dropout_seeds, seeds_on_device

from .numerics import check_against_reference, random_qkv

P = 0.3


def _forward_with_device_seed(q, k, v, causal):
    out, lse, rng_state = torch.ops.flashtrain.flash_attention_forward(
        q, k, v, None, 0, q.shape[-1] ** -0.5, causal, P, -1, -1, True)
    return out, lse, rng_state


def _mask_of(rng_state, q, k):
    """The keep-mask a device seed selects (counter base 0), made by the debug kernel."""
    return keep_mask(call_geometry(q, k, None, None), int(rng_state.item()), 0, drop_threshold(P),
                     q.device)


@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_backward_use_the_mask_of_the_device_seed(causal, device):
    q, k, v = random_qkv((2, 40, 4, 32), (2, 40, 2, 32), torch.float32, device)
    out, lse, rng_state = _forward_with_device_seed(q, k, v, causal)
    assert rng_state.shape == (1,) and rng_state.dtype == torch.int64
    assert rng_state.device == q.device                  # nothing on the host for a graph to capture
    assert 2**62 <= int(rng_state.item()) < 2**63
    keep = _mask_of(rng_state, q, k)
    assert 0.55 < keep.float().mean().item() < 0.85      # a real dropout mask (p rounded to 77/256)
    grad_out = torch.randn_like(out)
    grads = torch.ops.flashtrain.flash_attention_backward(
        grad_out, q, k, v, out, lse, rng_state, None, 0, q.shape[-1] ** -0.5, causal, P, -1, -1)
    # The reference under the same mask, in float64: output and every gradient.
    check_against_reference(q, k, v, causal=causal, dropout_p=P, dropout_mask=keep,
                            flash_outputs=(out, grads, grad_out))


def test_packed_documents_use_the_mask_of_the_device_seed(device):
    # The variable-length path (document-aware GPT batches, packed BERT rows) under CUDA graphs.
    cu_seqlens = torch.tensor([0, 7, 30, 31], dtype=torch.int32, device=device)
    q, k, v = random_qkv((31, 2, 32), (31, 2, 32), torch.float32, device)
    scale = q.shape[-1] ** -0.5
    out, lse, rng_state = torch.ops.flashtrain.flash_attention_forward(
        q, k, v, cu_seqlens, 23, scale, True, P, -1, -1, True)
    assert rng_state.device == q.device
    keep = keep_mask(call_geometry(q, k, cu_seqlens, 23), int(rng_state.item()), 0, drop_threshold(P),
                     q.device)
    assert keep.shape == (3, 2, 23, 23)
    grad_out = torch.randn_like(out)
    grads = torch.ops.flashtrain.flash_attention_backward(
        grad_out, q, k, v, out, lse, rng_state, cu_seqlens, 23, scale, True, P, -1, -1)
    check_against_reference(q, k, v, causal=True, dropout_p=P, cu_seqlens=cu_seqlens, max_seqlen=23,
                            dropout_mask=keep, flash_outputs=(out, grads, grad_out))


def test_seeds_differ_per_call_and_follow_manual_seed(device):
    q, k, v = random_qkv((1, 32, 2, 16), (1, 32, 2, 16), torch.float32, device, requires_grad=False)
    torch.manual_seed(7)
    first = [int(_forward_with_device_seed(q, k, v, True)[2].item()) for _ in range(3)]
    torch.manual_seed(7)
    again = [int(_forward_with_device_seed(q, k, v, True)[2].item()) for _ in range(3)]
    assert first == again and len(set(first)) == 3


def test_compiled_calls_inside_the_context_draw_on_the_device(device):
    """flash_attention reads the setting while torch.compile traces it: the graph calls the op
    with seed_on_device, and its output is the op's with the same generator state."""
    torch._dynamo.reset()
    q, k, v = random_qkv((1, 24, 2, 32), (1, 24, 2, 32), torch.float32, device, requires_grad=False)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(lambda q, k, v: flash_attention(q, k, v, causal=True, dropout_p=P),
                             backend=recording_backend)
    assert not seeds_on_device()
    with device_dropout_seeds():
        assert seeds_on_device()
        torch.manual_seed(3)
        first, second = compiled(q, k, v), compiled(q, k, v)
    assert not seeds_on_device()
    calls = [node for graph in graphs for node in graph.graph.nodes
             if "flash_attention_forward" in str(node.target)]
    assert calls and all(node.args[-1] is True for node in calls)
    torch.manual_seed(3)
    assert torch.equal(first, _forward_with_device_seed(q, k, v, True)[0])
    assert not torch.equal(first, second)                # a fresh mask per call


def test_the_packed_qkv_op_takes_the_setting_too(device):
    torch._dynamo.reset()
    qkv = torch.randn(1, 24, 6, 32, device=device, requires_grad=True)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(lambda qkv: flash_attention_qkvpacked(qkv, causal=True, dropout_p=P),
                             backend=recording_backend)
    with device_dropout_seeds():
        torch.manual_seed(5)
        out = compiled(qkv)
        out.sum().backward()
    calls = [node for graph in graphs for node in graph.graph.nodes
             if "flash_attention_qkv_forward" in str(node.target)]
    assert calls and all(node.args[-1] is True for node in calls)
    q, k, v = (t.detach() for t in qkv.split(2, dim=2))
    torch.manual_seed(5)
    assert torch.equal(out, _forward_with_device_seed(q, k, v, True)[0])
    assert torch.isfinite(qkv.grad).all()
