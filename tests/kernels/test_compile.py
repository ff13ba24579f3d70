"""torch.compile sees flash_attention as one custom op with autograd: no graph breaks."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kernels import flash_attention

from .numerics import random_qkv


def _layer(q, k, v):
    return (flash_attention(q * 2.0, k, v, causal=True) + 1.0).sum()


def test_compiles_without_graph_breaks(device):
    torch._dynamo.reset()
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(_layer, fullgraph=True, backend=backend)
    q, k, v = random_qkv((1, 24, 2, 32), (1, 24, 2, 32), torch.float32, device)
    eager_grads = torch.autograd.grad(_layer(q, k, v), (q, k, v))
    compiled_grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for eager, compiled_grad in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(compiled_grad, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_custom_op_registration_is_consistent(device, dropout_p):
    q, k, v = random_qkv((1, 16, 2, 16), (1, 16, 1, 16), torch.float32, device)
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.flashtrain.flash_attention_forward.default,
                          (q, k, v, None, 0, 0.25, True, dropout_p), test_utils=checks)
    qkv = torch.randn(1, 16, 6, 16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.flashtrain.flash_attention_qkv_forward.default,
                          (qkv, 2, None, 0, 0.25, True, dropout_p), test_utils=checks)


def test_dropout_free_ops_keep_every_tensor_on_the_gpu():
    """CUDA-graph compile modes skip any graph with a CPU tensor in it. Without dropout the ops'
    outputs are all on the inputs' device; with it, the dropout draw is a CPU tensor (read back by
    the backward without a device sync). Traced with fake CUDA tensors: no GPU needed."""
    with FakeTensorMode():
        qkv = torch.empty(1, 16, 6, 16, device="cuda")
        q, k, v = qkv.split(2, dim=2)
        for dropout_p, rng_device in ((0.0, "cuda"), (0.1, "cpu")):
            for outputs in (torch.ops.flashtrain.flash_attention_forward(q, k, v, None, 0, 0.25, True, dropout_p),
                            torch.ops.flashtrain.flash_attention_qkv_forward(qkv, 2, None, 0, 0.25, True,
                                                                             dropout_p)):
                out, lse, rng_state = outputs
                assert out.device.type == lse.device.type == "cuda"
                assert rng_state.device.type == rng_device, dropout_p


def test_eager_path_and_custom_op_agree_bit_for_bit(device):
    """Eager calls bypass the custom op (less host overhead); both must run the same kernels with
    the same dropout draw, so outputs and gradients are identical."""
    q, k, v = random_qkv((2, 40, 2, 32), (2, 40, 2, 32), torch.float32, device)
    grad_out = torch.randn_like(q)
    torch.manual_seed(3)
    eager = flash_attention(q, k, v, causal=True, dropout_p=0.3)
    eager_grads = torch.autograd.grad(eager, (q, k, v), grad_out)
    torch.manual_seed(3)
    op_out = torch.ops.flashtrain.flash_attention_forward(q, k, v, None, 0, 32 ** -0.5, True, 0.3)[0]
    op_grads = torch.autograd.grad(op_out, (q, k, v), grad_out)
    assert torch.equal(eager, op_out)
    for eager_grad, op_grad in zip(eager_grads, op_grads):
        assert torch.equal(eager_grad, op_grad)
