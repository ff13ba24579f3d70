"""Attention studies at GPT-2 small's training shapes (16K-token micro-batches, q, k and v the
head groups of one packed tensor, as its layers call the kernels), for ``tune_attention.py``'s
``--training-study`` and ``--finish-study``: every candidate timed in alternating rounds in one
process, beside cuDNN where it computes the same thing.
"""

import dataclasses
import functools

import torch
from triton.testing import do_bench

from kernels import _backward, _forward
from kernels._launch import Geometry, Tiles
from kernels._tile_rules import dkdv_tiles, dq_tiles, forward_tiles

TRAINING_SHAPES = ((16, 1024), (8, 2048), (4, 4096), (2, 8192))     # GPT-2's 16K-token micro-batches


def training_call(batch, seqlen, heads, head_dim, dropout_p, dtype):
    """A causal call as GPT-2's layers make it: ``(qkv, grad_out, backward arguments, out, lse)``,
    q, k and v the three head groups of the packed ``qkv`` (random, seed 0)."""
    torch.manual_seed(0)
    qkv = torch.randn(batch, seqlen, 3 * heads, head_dim, device="cuda", dtype=dtype)
    grad_out = torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype)
    geometry = Geometry(batch, heads, heads, seqlen, seqlen, head_dim, varlen=False)
    args = dict(geometry=geometry, softmax_scale=head_dim ** -0.5, causal=True, dropout_p=dropout_p,
                seed=1, offset=0)
    out, lse = _forward.forward(*qkv.split([heads] * 3, dim=2), None, **args)
    return qkv, grad_out, args, out, lse


def training_study(head_dim, heads, dropout_p, rounds=3, dtype=torch.bfloat16):
    """Time the causal backward at GPT-2's training shapes (q, k and v sliced from one packed
    tensor, as its layers call it): the default dK/dV tiles against the warp-specialized pass per
    key block and in a persistent grid with one or two K/V buffers, and the portable pass;
    without dropout also cuDNN's backward and both forwards. Rounds alternate the candidates;
    gradients are checked against the portable pass's. Returns one record per shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    warp_specialized = Tiles(64, 128, 4, 4 if head_dim == 64 else 2, gluon=True, fused=True,
                             warp_specialized=True)
    candidates = {"warp-specialized": warp_specialized,
                  "persistent": dataclasses.replace(warp_specialized, persistent=True),
                  "persistent, two K/V buffers": dataclasses.replace(
                      warp_specialized, persistent=True, kv_buffers=2),
                  "portable": Tiles(64, 64, 4, 3, fused=dropout_p > 0)}
    bench = functools.partial(do_bench, warmup=25, rep=200, return_mode="median")
    records = []
    for batch, seqlen in TRAINING_SHAPES:
        qkv, grad_out, args, out, lse = training_call(batch, seqlen, heads, head_dim, dropout_p, dtype)
        q, k, v = qkv.split([heads] * 3, dim=2)
        geometry = args["geometry"]
        dq = dq_tiles(head_dim, q.device, dtype, dropout_p > 0)
        default = dkdv_tiles(head_dim, q.device, dtype, True, dropout_p > 0, seqlen=seqlen)
        timed = {"default": default, **candidates}
        reference = _backward.backward(grad_out, q, k, v, out, lse, None,
                                       tiles=(candidates["portable"], dq), **args)
        record = dict(batch=batch, seqlen=seqlen, heads=heads, head_dim=head_dim, causal=True,
                      dropout_p=dropout_p, default=str(default), backward_ms={}, max_abs_error={})
        calls = {}
        for name, tiles in timed.items():
            call = functools.partial(_backward.backward, grad_out, q, k, v, out, lse, None,
                                     tiles=(tiles, dq), **args)
            record["max_abs_error"][name] = max((a.float() - b.float()).abs().max().item()
                                                for a, b in zip(call(), reference))
            calls[name] = call
        if dropout_p == 0:
            # cuDNN's (batch, heads, seqlen, head_dim) views of the same tensors.
            sdpa_inputs = [t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v)]
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                sdpa_out = torch.nn.functional.scaled_dot_product_attention(*sdpa_inputs, is_causal=True)
            calls["cuDNN"] = lambda: torch.autograd.grad(sdpa_out, sdpa_inputs, grad_out.transpose(1, 2),
                                                         retain_graph=True)
        record["backward_ms"] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                record["backward_ms"][name].append(bench(call))
        if dropout_p == 0:
            # The forward: the default tiles, the ping-pong, TMA and Gluon forwards' candidates
            # (the kernel that ran each: one that does not take the call runs the portable
            # kernel), cuDNN's.
            forwards = {"default": forward_tiles(head_dim, q.device, dtype)} | {
                f"ping-pong {t.block_m}x{t.block_n}": t for t in (
                    Tiles(m, n, 4, 3, gluon=True, pingpong=True)
                    for m, n in ((192, 128), (128, 128), (192, 64), (128, 64)))} | {
                "TMA 128x64": Tiles(128, 64, 4, 3, tma=True),
                "Gluon 128x64": Tiles(128, 64, 8, 3, gluon=True),
                "Gluon 128x128": Tiles(128, 128, 8, 2, gluon=True)}
            record["forward_kernel"], record["forward_max_abs_error"] = {}, {}
            record["forward_ms"] = {name: [] for name in (*forwards, "cuDNN")}
            for name, tiles in forwards.items():
                tiles = None if name == "default" else tiles      # the library's own choice
                chosen = _forward.launch_config(q, k, v, *_forward.new_outputs(q, geometry), geometry,
                                                args["softmax_scale"], True, 0.0, tiles)[0]
                record["forward_kernel"][name] = next(
                    launcher for launcher in ("FORWARD", "FORWARD_TMA", "FORWARD_GLUON", "FORWARD_PINGPONG")
                    if getattr(_forward, launcher) is chosen)
                record["forward_max_abs_error"][name] = (
                    _forward.forward(q, k, v, None, tiles=tiles, **args)[0].float() - out.float()
                ).abs().max().item()
            for _ in range(rounds):
                for name, tiles in forwards.items():
                    tiles = None if name == "default" else tiles
                    record["forward_ms"][name].append(
                        bench(lambda: _forward.forward(q, k, v, None, tiles=tiles, **args)))
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    record["forward_ms"]["cuDNN"].append(bench(
                        lambda: torch.nn.functional.scaled_dot_product_attention(*sdpa_inputs,
                                                                                 is_causal=True)))
            medians = {name: sorted(ms)[len(ms) // 2] for name, ms in record["forward_ms"].items()}
            print(f"d={head_dim} {batch}x{seqlen} {heads} heads forward ms: " + ", ".join(
                f"{name} {ms:.3f}" for name, ms in medians.items()), flush=True)
        medians = {name: sorted(ms)[len(ms) // 2] for name, ms in record["backward_ms"].items()}
        print(f"d={head_dim} {batch}x{seqlen} {heads} heads p={dropout_p} backward ms (median of "
              f"{rounds}): " + ", ".join(f"{name} {ms:.3f}" for name, ms in medians.items()), flush=True)
        records.append(record)
    return records


def finish_study(rounds=3, dtype=torch.bfloat16):
    """Time the fused backward's dQ finishing step (``_backward.finish_dq``) as torch.mul and as
    ``_finish_dq.py``'s kernel, alone and inside the whole default backward, at GPT-2 small's
    training shapes with dQ the q slice of one packed gradient (as the packed qkv op writes it).
    Rounds alternate the two; the outputs are compared bit for bit."""
    heads, head_dim = 12, 64
    bench = functools.partial(do_bench, warmup=25, rep=200, return_mode="median")
    records = []
    for batch, seqlen in TRAINING_SHAPES:
        qkv, grad_out, args, out, lse = training_call(batch, seqlen, heads, head_dim, 0.0, dtype)
        q, k, v = qkv.split([heads] * 3, dim=2)
        grad_qkv = torch.empty_like(qkv)
        grads = grad_qkv.split([heads] * 3, dim=2)
        accumulator = torch.randn(q.shape, device="cuda", dtype=torch.float32)
        results = {}
        for kernel in (False, True):
            _backward.finish_dq(accumulator, 0.125, grads[0], kernel=kernel)
            results[kernel] = grads[0].clone()
        record = dict(batch=batch, seqlen=seqlen, heads=heads, head_dim=head_dim, causal=True,
                      equal=torch.equal(results[False], results[True]),
                      finish_ms={"torch.mul": [], "kernel": []}, backward_ms={"torch.mul": [], "kernel": []})
        for _ in range(rounds):
            for name, kernel in (("torch.mul", False), ("kernel", True)):
                record["finish_ms"][name].append(bench(
                    lambda: _backward.finish_dq(accumulator, 0.125, grads[0], kernel=kernel)))
                default, _backward.FINISH_DQ_KERNEL = _backward.FINISH_DQ_KERNEL, kernel
                try:
                    record["backward_ms"][name].append(bench(
                        lambda: _backward.backward(grad_out, q, k, v, out, lse, None, grads=grads, **args)))
                finally:
                    _backward.FINISH_DQ_KERNEL = default
        medians = {part: {name: sorted(ms)[rounds // 2] for name, ms in record[part].items()}
                   for part in ("finish_ms", "backward_ms")}
        print(f"{batch}x{seqlen}: finish_dq torch.mul {medians['finish_ms']['torch.mul'] * 1000:.1f} µs, "
              f"kernel {medians['finish_ms']['kernel'] * 1000:.1f} µs; whole backward "
              f"{medians['backward_ms']['torch.mul']:.3f} against {medians['backward_ms']['kernel']:.3f} ms; "
              f"equal: {record['equal']}", flush=True)
        records.append(record)
    return records
