"""Helpers for comparing the kernel with the float64 reference (DESIGN.md, Tests)."""

import torch

from kernels import attention_reference, flash_attention
from kernels._philox import effective_dropout_p

# Added to twice PyTorch's own error in the same dtype: room for the kernel's different summation
# order when PyTorch happens to be very accurate on a small case.
FLOOR = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    assert torch.isfinite(value).all(), "non-finite values"
    return ((value - reference).norm() / reference.norm()).item()


def random_qkv(shape_q, shape_kv, dtype, device, requires_grad=True, generator=None):
    tensors = [torch.randn(shape, dtype=torch.float32, device=device, generator=generator)
               for shape in (shape_q, shape_kv, shape_kv)]
    return [t.to(dtype).requires_grad_(requires_grad) for t in tensors]


def outputs_and_grads(fn, q, k, v, grad_out=None):
    out = fn(q, k, v)
    if grad_out is None:
        grad_out = torch.randn_like(out, dtype=torch.float32).to(out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
    return out, grads, grad_out


def check_against_reference(q, k, v, flash_outputs=None, **kwargs):
    """Kernel forward and gradients vs float64; error at most 2x PyTorch's own in the same dtype.
    ``flash_outputs``: ``(out, (dq, dk, dv), grad_out)`` computed by the caller, checked instead of
    a ``flash_attention`` call with ``kwargs``."""
    mask_kwargs = {key: kwargs.pop(key) for key in ("dropout_mask",) if key in kwargs}
    dropout_p = kwargs.get("dropout_p", 0.0)
    kernel = lambda q, k, v: flash_attention(q, k, v, **kwargs)
    reference_kwargs = {key: value for key, value in kwargs.items() if key != "max_seqlen"}
    reference_kwargs.update(mask_kwargs)
    if dropout_p == 0:
        reference_kwargs.pop("dropout_p", None)
    else:   # the kernels realize p rounded to a multiple of 1/256 and rescale by that
        reference_kwargs["dropout_p"] = effective_dropout_p(dropout_p)
    exact = lambda q, k, v: attention_reference(q, k, v, compute_dtype=torch.float64,
                                                **reference_kwargs)
    in_dtype = lambda q, k, v: attention_reference(q, k, v, **reference_kwargs)

    out, grads, grad_out = flash_outputs or outputs_and_grads(kernel, q, k, v)
    out_exact, grads_exact, _ = outputs_and_grads(exact, q, k, v, grad_out.double())
    out_torch, grads_torch, _ = outputs_and_grads(in_dtype, q, k, v, grad_out)
    assert out.shape == q.shape and out.dtype == q.dtype
    floor = FLOOR[q.dtype]
    for name, mine, theirs, truth in zip(("out", "dq", "dk", "dv"), (out, *grads),
                                         (out_torch, *grads_torch), (out_exact, *grads_exact)):
        if truth.norm() < 1e-9:
            # Exactly zero in exact arithmetic (dq with a single key: the softmax is constant); the
            # kernel's dS = P * (dP - delta) leaves rounding noise of the inputs' magnitude x eps.
            assert mine.abs().max().item() < 100 * torch.finfo(q.dtype).eps, name
            continue
        error, torch_error = rel_err(mine, truth), rel_err(theirs, truth)
        assert error <= 2 * torch_error + floor, (
            f"{name}: kernel error {error:.3e} > 2 x PyTorch's {torch_error:.3e} + {floor:.0e}")


def check_dropout_against_reference(q, k, v, causal: bool, dropout_p: float, seed: int = 5):
    """``check_against_reference`` with dropout: the keep-mask the kernels draw from ``seed``
    (materialized by return_debug_mask) is the reference's mask, and the checked call draws the
    same one from the same seed."""
    torch.manual_seed(seed)
    _, keep = flash_attention(q, k, v, causal=causal, dropout_p=dropout_p, return_debug_mask=True)
    torch.manual_seed(seed)
    check_against_reference(q, k, v, causal=causal, dropout_p=dropout_p, dropout_mask=keep)


def assert_gradients_match_float64(q, k, v, causal: bool, atol: float = 1e-5):
    """flash_attention's gradients (float32 inputs, the interpreter's tests) within ``atol`` of
    the float64 reference's, for the same output gradient."""
    _, grads, grad_out = outputs_and_grads(lambda q, k, v: flash_attention(q, k, v, causal=causal),
                                           q, k, v)
    _, exact, _ = outputs_and_grads(
        lambda q, k, v: attention_reference(q, k, v, causal=causal, compute_dtype=torch.float64),
        q, k, v, grad_out.double())
    for mine, truth in zip(grads, exact):
        assert (mine.double() - truth).abs().max().item() < atol


def backward_launch_configs(q, k, v, causal: bool, dropout_p: float):
    """The (dQ, dK/dV) launch configurations the library would use for a backward of this call
    (``_backward.launch_configs``: launcher, grid, static arguments, options)."""
    from kernels import _backward, _forward
    from kernels._launch import call_geometry
    geometry = call_geometry(q, k, None, 0)
    out, lse = _forward.new_outputs(q, geometry)
    return _backward.launch_configs(torch.empty_like(q), q, k, v, out, lse,
                                    *_backward.new_gradients(q, k, v, lse)[1:], geometry,
                                    q.shape[-1] ** -0.5, causal, dropout_p)
