"""Exact FlashAttention in Triton: tiled, online softmax, fused forward, recomputing backward.

Features
  * Layout (batch, seqlen, heads, head_dim) for q, k, v; strided views (e.g. slices of a fused QKV
    projection) are read in place as long as the last dimension is contiguous.
  * Multi-/grouped-query attention: k and v may have fewer heads than q (heads_q % heads_k == 0).
  * Causal masking aligned bottom-right when Nq != Nk (query i sees keys j <= i + Nk - Nq), which
    makes KV-cache decoding exact. A query that sees no key outputs 0.
  * Sliding-window (local) attention, ``window=(left, right)``: query i sees keys
    i + Nk - Nq - left .. i + Nk - Nq + right, composed with causal, variable length, GQA and
    dropout. Key tiles outside the window are skipped: the cost grows as N·W, not N².
  * Variable length: packed (total_tokens, heads, head_dim) with int32 ``cu_seqlens``; no token
    attends across a sequence boundary.
  * Dropout whose mask is never stored: the forward draws (seed, offset) from PyTorch's generator
    for the device, and the backward regenerates the same Philox mask (see ``_philox.py``).
  * Memory: the forward saves O and the row log-sum-exp, O(N); the backward (FlashAttention-2
    algorithm) recomputes score tiles, never an N x N tensor. Gradients are deterministic except
    where the default backward is the fused single pass (head dim 64 with dropout on a GPU), whose
    dQ is summed by atomic adds; ``torch.use_deterministic_algorithms(True)`` turns that off.
  * A fused projection's output can be passed whole (``qkv_packed.flash_attention_qkvpacked``): the
    compiled backward then writes one gradient instead of three for autograd to concatenate.
  * A ``torch.library`` custom op with autograd, so ``torch.compile`` traces it without graph breaks;
    eager calls take a lighter ``autograd.Function`` over the same kernels (less host overhead). Both
    go through a launch plan per call signature that keeps what the shapes fix (``_eager_plan.py``),
    and kernels are called directly, past Triton's launch path (``_direct_launch.py``).

Limits
  * fp16, bf16 (fast path) and fp32 (exact dots, for tests); head_dim 1..256 (padded internally to a
    power of two >= 16, so 80 costs as much as 128); any sequence length >= 1.
  * CUDA runs the compiled kernels. CPU runs them only under the Triton interpreter
    (TRITON_INTERPRET=1 set before import), which is slow and meant for tests.
  * Dropout seeds are read from the generator on the host, which a CUDA graph would replay as
    one mask; inside ``device_dropout_seeds()`` compiled calls draw them on the device instead
    (capture-safe, ``_philox.device_seed``).

Tested on: NVIDIA H100 80GB HBM3 (PyTorch 2.11, Triton 3.6); CPU via the Triton 3.6 interpreter.
Tile sizes per head dimension and kernel are chosen in ``_tile_rules.py``.
"""

import contextlib
import math

import torch

from . import _forward
from ._checks import check_inputs, check_window
from ._debug_mask import keep_mask
from ._eager_plan import plan_for
from ._launch import call_geometry
from ._philox import device_seed, drop_threshold, next_seed_offset

# Whether compiled calls draw their dropout seed on the device (``device_dropout_seeds``). Read in
# ``flash_attention`` while torch.compile traces it, so each compiled graph holds the value it was
# traced with (and dynamo recompiles if it changes); the ops themselves take it as an argument.
_seeds_on_device = False


@contextlib.contextmanager
def device_dropout_seeds(enabled: bool = True):
    """Within this context, models compiled (and run) here draw attention-dropout seeds on the
    device: what compile modes with CUDA graphs need, since a seed read on the host at capture
    would be replayed as the same mask at every step. Eager calls are unaffected."""
    global _seeds_on_device
    previous, _seeds_on_device = _seeds_on_device, enabled
    try:
        yield
    finally:
        _seeds_on_device = previous


def seeds_on_device() -> bool:
    """Whether ``device_dropout_seeds`` is in effect (read while tracing; see there)."""
    return _seeds_on_device


def new_rng_state(device: torch.device, dropout_p: float, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """The dropout draw a forward hands its backward. With dropout: [seed, offset], a CPU int64
    tensor (read back without a device sync). Without: an empty tensor on the inputs' device, so a
    dropout-free compiled graph has no CPU tensor in it and CUDA-graph compile modes can capture it
    (inductor skips graphs with CPU tensors)."""
    if dropout_p > 0:
        return torch.tensor([seed, offset], dtype=torch.int64)
    return torch.empty(0, dtype=torch.int64, device=device)


def fake_rng_state(device: torch.device, dropout_p: float, seed_on_device: bool = False) -> torch.Tensor:
    """The rng_state a forward returns, for the ops' fake (tracing) implementations: as
    ``new_rng_state`` makes it, or a ``device_seed``'s (1,) on the device."""
    if dropout_p > 0 and seed_on_device:
        return torch.empty(1, dtype=torch.int64, device=device)
    return (torch.empty(2, dtype=torch.int64, device="cpu") if dropout_p > 0
            else torch.empty(0, dtype=torch.int64, device=device))


def seed_and_offset(rng_state: torch.Tensor, dropout_p: float) -> tuple:
    """(seed, offset) of a forward's rng_state: host integers, or a device seed tensor and 0."""
    if dropout_p == 0:
        return 0, 0
    if rng_state.numel() == 1:
        return rng_state, 0
    return tuple(rng_state.tolist())


def _forward_impl(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, dropout_p, window_left,
                  window_right, seed_on_device=False):
    """Returns (out, lse, rng_state); rng_state as ``new_rng_state`` makes it, or with
    ``seed_on_device`` (and dropout) the ``device_seed`` the kernels read."""
    in_memory = seed_on_device and dropout_p > 0
    plan = plan_for(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, dropout_p, window_left,
                    window_right, seed_in_memory=in_memory)
    if in_memory:
        rng_state = device_seed(q.device)
        out, lse = plan.forward(q, k, v, cu_seqlens, rng_state, 0)
        return out, lse, rng_state
    seed, offset = next_seed_offset(q.device, plan.philox_counters) if dropout_p > 0 else (0, 0)
    out, lse = plan.forward(q, k, v, cu_seqlens, seed, offset)
    return out, lse, new_rng_state(q.device, dropout_p, seed, offset)


def _backward_impl(grad_out, q, k, v, out, lse, rng_state, cu_seqlens, max_seqlen, softmax_scale,
                   causal, dropout_p, window_left, window_right, grads=None):
    """Returns (dq, dk, dv): new contiguous tensors, or written into ``grads`` (views may be strided)."""
    seed, offset = seed_and_offset(rng_state, dropout_p)
    plan = plan_for(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, dropout_p, window_left,
                    window_right, seed_in_memory=isinstance(seed, torch.Tensor))
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    return plan.backward(grad_out, q, k, v, out, lse, cu_seqlens, seed, offset, grads=grads)


# Two entry points to the same kernels, both through launch plans (_eager_plan.py). torch.compile
# needs an operator it can trace: the custom ops below. In eager mode their dispatch (schema checks,
# aliasing checks, the autograd wrapper) costs several hundred microseconds of host time per
# forward+backward on an H100 host, more than the kernels themselves at short sequences, so eager
# calls go through a plain autograd.Function. A compiled graph calls the ops without the autograd
# wrapper; the plan spares it the rest: without it, GPT-2 small's compiled step at 1024 x 16 waited
# ~10 ms per step on the host (train_notes.md, 2026-12-02).
@torch.library.custom_op("flashtrain::flash_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None,
                max_seqlen: int, softmax_scale: float, causal: bool, dropout_p: float,
                window_left: int = -1, window_right: int = -1, seed_on_device: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, lse, rng_state), as ``_forward_impl``."""
    return _forward_impl(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, dropout_p,
                         window_left, window_right, seed_on_device)


@_forward_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, dropout_p, window_left=-1,
      window_right=-1, seed_on_device=False):
    geometry = call_geometry(q, k, cu_seqlens, max_seqlen)
    lse = q.new_empty(_forward.lse_shape(geometry, q.shape[0]), dtype=torch.float32)
    return q.new_empty(q.shape), lse, fake_rng_state(q.device, dropout_p, seed_on_device)


@torch.library.custom_op("flashtrain::flash_attention_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, rng_state: torch.Tensor,
                 cu_seqlens: torch.Tensor | None, max_seqlen: int, softmax_scale: float,
                 causal: bool, dropout_p: float, window_left: int = -1, window_right: int = -1
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(grad_out, q, k, v, out, lse, rng_state, cu_seqlens, max_seqlen,
                          softmax_scale, causal, dropout_p, window_left, window_right)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, rng_state, cu_seqlens, max_seqlen, softmax_scale, causal,
      dropout_p, window_left=-1, window_right=-1):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_for_backward(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, dropout_p, window_left, window_right, _ = inputs
    out, lse, rng_state = output
    ctx.save_for_backward(q, k, v, out, lse, rng_state, cu_seqlens)
    ctx.max_seqlen, ctx.softmax_scale, ctx.causal, ctx.dropout_p = (max_seqlen, softmax_scale,
                                                                     causal, dropout_p)
    ctx.window = (window_left, window_right)
    ctx.mark_non_differentiable(lse, rng_state)


def _saved_backward_args(ctx, grad_out):
    q, k, v, out, lse, rng_state, cu_seqlens = ctx.saved_tensors
    return (grad_out, q, k, v, out, lse, rng_state, cu_seqlens, ctx.max_seqlen, ctx.softmax_scale,
            ctx.causal, ctx.dropout_p, *ctx.window)


def _op_backward(ctx, grad_out, _grad_lse, _grad_rng_state):
    dq, dk, dv = _backward_op(*_saved_backward_args(ctx, grad_out))
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("flashtrain::flash_attention_forward", _op_backward,
                                setup_context=_save_for_backward)


class _EagerFlashAttention(torch.autograd.Function):
    """The eager-mode path: the same kernels as the custom ops, through a launch plan
    (``_eager_plan.py``) and without op dispatch. One output: lse stays in ctx, and the dropout
    seed and offset, drawn by the caller, are plain integers. (The classic ``forward(ctx, ...)``
    form: with a separate ``setup_context``, ``apply`` binds its arguments through
    ``inspect.signature`` on every call.)"""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, plan, seed, offset):
        out, lse = plan.forward(q, k, v, cu_seqlens, seed, offset)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.plan, ctx.seed, ctx.offset = plan, seed, offset
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        dq, dk, dv = ctx.plan.backward(grad_out, q, k, v, out, lse, cu_seqlens, ctx.seed, ctx.offset)
        return dq, dk, dv, None, None, None, None


def flash_attention(q, k, v, *, causal=False, dropout_p=0.0, softmax_scale=None, cu_seqlens=None,
                    max_seqlen=None, window=None, return_debug_mask=False):
    """Exact scaled-dot-product attention, ``softmax(q kᵀ · scale) v``, with optional dropout.

    Args:
        q: (batch, seqlen_q, heads_q, head_dim), or (total_tokens, heads_q, head_dim) with cu_seqlens.
        k, v: (batch, seqlen_k, heads_k, head_dim); heads_q must be a multiple of heads_k.
        causal: mask keys after the query; aligned bottom-right when seqlen_q != seqlen_k.
        dropout_p: probability of dropping an attention weight (pass 0.0 in evaluation); realized
            rounded to a multiple of 1/256, kept weights scaled by 1/(1 - that), as in FlashAttention.
        softmax_scale: defaults to 1/sqrt(head_dim).
        cu_seqlens: int32 (batch+1,) cumulative sequence offsets into the packed token axis.
        max_seqlen: the longest sequence in cu_seqlens (required with it).
        window: sliding-window attention, ``(left, right)``: query i sees only keys
            j in [i - left, i + right] on the bottom-right aligned diagonal (j - (Nk - Nq) for
            Nq != Nk), each side an int >= 0 or None (unbounded). With causal, right must be 0 or
            None. ``(W - 1, 0)`` with causal: each token sees itself and the W - 1 before it.
        return_debug_mask: testing aid; also return the boolean keep-mask this call used,
            (batch, heads_q, seqlen_q, seqlen_k) (max_seqlen for packed input). ``out`` is unchanged.

    Returns:
        out in q's shape and dtype (contiguous), or ``(out, keep_mask)``.
    """
    check_inputs(q, k, v, dropout_p, softmax_scale, cu_seqlens, max_seqlen)
    window_left, window_right = check_window(window, causal)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    # The kernels take any strides but need unit stride along head_dim for vector loads.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    args = (q, k, v, cu_seqlens, max_seqlen if cu_seqlens is not None else 0, float(softmax_scale),
            bool(causal), float(dropout_p), window_left, window_right)
    if torch.compiler.is_compiling():
        out, _lse, rng_state = _forward_op(*args, seeds_on_device())
        if return_debug_mask:
            seed, offset = seed_and_offset(rng_state, dropout_p)
            if isinstance(seed, torch.Tensor):      # a device seed: the mask is made on the host
                seed = int(seed.item())
    else:
        plan = plan_for(*args)
        seed, offset = (next_seed_offset(q.device, plan.philox_counters) if dropout_p > 0
                        else (0, 0))
        out = _EagerFlashAttention.apply(q, k, v, cu_seqlens, plan, seed, offset)
    if not return_debug_mask:
        return out
    geometry = call_geometry(q, k, cu_seqlens, max_seqlen)
    if dropout_p == 0:
        shape = (geometry.batch, geometry.heads_q, geometry.seqlen_q, geometry.seqlen_k)
        return out, torch.ones(shape, dtype=torch.bool, device=q.device)
    return out, keep_mask(geometry, seed, offset, drop_threshold(dropout_p), q.device)
