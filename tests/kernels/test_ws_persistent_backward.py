"""The warp-specialized backward in a persistent grid (_dkdv_ws_persistent.py): it compiles for
sm_90 into the same partitions and per-block schedule as the per-key-block pass (checked here on
the CPU, from the compiler's output), the default chooses it only in the measured settings and for
tensors one descriptor reads, its launch has its own grid and argument, and if it cannot compile
the portable pass runs the call with its own grid. Its numerics need a GPU
(test_gpu_warp_specialized.py): the interpreter cannot run Gluon."""

import dataclasses
import re

import pytest
import torch
from triton.compiler.errors import CompilationError

from kernels import _backward, _eager_plan, _forward, _hopper, _launch, _tile_rules
from kernels._launch import Tiles, call_geometry

from .numerics import assert_gradients_match_float64, check_against_reference, random_qkv
from .test_gluon_backward import compiled_for_sm90

WARP_SPECIALIZED = Tiles(64, 128, 4, 2, gluon=True, fused=True, warp_specialized=True)
PERSISTENT = Tiles(64, 128, 4, 2, gluon=True, fused=True, warp_specialized=True, persistent=True)
TWO_KV_BUFFERS = Tiles(64, 128, 4, 4, gluon=True, fused=True, warp_specialized=True, persistent=True,
                       kv_buffers=2)


@pytest.mark.parametrize("head_dim, stages, kernel", [(128, 2, "dkdv_ws_persistent"),
                                                     (64, 4, "dkdv_ws_persistent"),
                                                     (64, 4, "dkdv_ws_persistent_kv2")])
def test_compiles_for_sm90_with_the_per_block_schedule_of_the_warp_specialized_pass(head_dim,
                                                                                    stages, kernel):
    compiled = compiled_for_sm90(kernel, head_dim, 64, 128, stages, 4, 0)
    assert compiled["partitions"] == ["240, 24"]
    # Each consumer's query-block loop (inside its tile loop) as in the per-key-block pass: five
    # products, S and dP waited for first, the rest at the end (at head dim 64 dK and dV; the
    # previous block's dQ on the consumer's turn), one reduce-add of the consumer's dQ tile; the
    # producer's loop loads Q and dO by TMA.
    loops = [loop[loop.rfind("scf.for"):] for loop in compiled["loops"]]
    consumer_loops = [loop for loop in loops if "ttng.warp_group_dot " in loop]
    assert len(consumer_loops) == 2
    for loop in consumer_loops:
        assert loop.count("ttng.warp_group_dot ") == 5
        assert re.findall(r"warp_group_dot_wait [^{]*\{pendings = (\d+)", loop) == ["0", "0"]
        assert loop.count("ttng.async_tma_reduce add") == 1 and "atomic_rmw" not in loop
    producer_loops = [loop for loop in loops if "ttng.warp_group_dot " not in loop]
    assert [loop.count("async_tma_copy_global_to_local") for loop in producer_loops] == [2]
    # ptxas kept the products asynchronous; at head dim 128 the consumers' 240 registers spill a
    # few bytes (the tile loop's state), and at 64 with two K/V buffers (since dQ is taken a block
    # late, which measured 4-8 % faster all the same, attention_notes v27); the measured speed
    # includes them. Storing dK and dV by TMA (v37) added 8-16 bytes, outside the loops.
    assert compiled["serialized"] == []
    assert compiled["stack"] <= {64: 64 if kernel.endswith("kv2") else 8, 128: 72}[head_dim]
    assert compiled["loop_spills"] == "0,0"


def test_tiles_name_it_only_as_the_warp_specialized_pass():
    assert PERSISTENT.persistent and PERSISTENT.warp_specialized
    with pytest.raises(ValueError, match="persistent"):
        Tiles(64, 128, 4, 2, gluon=True, fused=True, persistent=True)
    assert TWO_KV_BUFFERS.kv_buffers == 2 and PERSISTENT.kv_buffers == 1
    with pytest.raises(ValueError, match="kv_buffers"):
        Tiles(64, 128, 4, 2, gluon=True, fused=True, warp_specialized=True, kv_buffers=2)
    with pytest.raises(ValueError, match="kv_buffers"):
        Tiles(64, 128, 4, 2, gluon=True, fused=True, warp_specialized=True, persistent=True,
              kv_buffers=3)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_persistent_tiles_are_the_default_only_where_measured_faster(head_dim, monkeypatch):
    cuda, bf16 = torch.device("cuda", 0), torch.bfloat16
    monkeypatch.setattr(_launch, "capability", lambda device: (9, 0))
    # Without dropout: 512-8K tokens at head dim 64 (attention_notes v22; 8K: v27; causal: v28,
    # and to 16K: v30; 512: v32), 512-2K at 128 (v22; causal: v28). With dropout (v32): one K/V
    # buffer, 512-4K at head dim 64 and 512-1K at 128 without a mask, 1K-2K at 64 causal (and at
    # 128: 2K in v34, 1K since v38's TMA stores).
    longest = {64: 8192, 128: 2048}[head_dim]
    causal_longest = {64: 16384, 128: 2048}[head_dim]

    def tiles(seqlen, causal=False, dropout=False, **kwargs):
        return _tile_rules.dkdv_tiles(head_dim, cuda, bf16, causal, dropout, seqlen=seqlen, **kwargs)
    stages = {64: 4, 128: 2}[head_dim]
    # Two K/V buffers where they fit shared memory, head dim 64 (attention_notes v23); one with
    # dropout (v32).
    assert _tile_rules.PERSISTENT_KV_BUFFERS == {64: 2}
    kv_buffers = {64: 2, 128: 1}[head_dim]
    persistent = Tiles(64, 128, 4, stages, gluon=True, fused=True, warp_specialized=True,
                       persistent=True, kv_buffers=kv_buffers)
    for seqlen in (512, 1024, longest):
        assert tiles(seqlen) == persistent
        # Tensors one descriptor cannot read: the per-key-block pass where it won, else the
        # previous default (at head dim 64, 1K: the portable pass).
        fallback = tiles(seqlen, persistent=False)
        assert not fallback.persistent and fallback.kv_buffers == 1
        assert fallback.warp_specialized == (seqlen >= _tile_rules.WARP_SPECIALIZED_MIN_SEQLEN[
            head_dim, False, False])
        assert tiles(seqlen, causal=True) == tiles(seqlen)
        assert tiles(causal_longest, causal=True) == tiles(seqlen)
        assert not tiles(seqlen, deterministic=True).fused
        assert not tiles(seqlen, hopper=False).gluon
    with_dropout = dataclasses.replace(persistent, kv_buffers=1)
    dropout_longest = {64: 4096, 128: 1024}[head_dim]
    for seqlen in (512, dropout_longest):
        assert tiles(seqlen, dropout=True) == with_dropout
    assert not tiles(2 * dropout_longest, dropout=True).persistent
    # Causal with dropout: 1K-2K at either head dim (at 128: 2K since v34, 1K since v38).
    for seqlen in (1024, 2048):
        assert tiles(seqlen, causal=True, dropout=True) == with_dropout
    for seqlen in (512, 4096):
        assert not tiles(seqlen, causal=True, dropout=True).persistent
    for seqlen in (256, 2 * longest, 16384):
        assert not tiles(seqlen).persistent
    for seqlen in (256, 2 * causal_longest, 32768):
        assert not tiles(seqlen, causal=True).persistent
    assert tiles(16384).warp_specialized
    monkeypatch.setattr(_launch, "capability", lambda device: (8, 0))
    assert not tiles(2048).gluon


def dkdv_launch(q, k, causal=False, dropout_p=0.0, tiles=None, window=(-1, -1)):
    """The dK/dV ``(launcher, grid, static arguments, options)`` ``launch_configs`` picks."""
    geometry = call_geometry(q, k, None, 0)
    out, lse = _forward.new_outputs(q, geometry)
    return _backward.launch_configs(torch.empty_like(q), q, k, k, out, lse,
                                    *_backward.new_gradients(q, k, k, lse)[1:], geometry, 0.125,
                                    causal, dropout_p, tiles, window)[1]


def test_causal_persistent_grid_covers_whole_heads_per_round():
    # Program p then takes key block p mod key_blocks in one round and, the next round reversed,
    # key_blocks - 1 - (p mod key_blocks): equal work per pair of rounds.
    programs = _backward.persistent_programs
    assert [programs(blocks, 1536, 132, True) for blocks in (8, 16, 32, 64, 128)] == [128] * 5
    assert programs(32, 1536, 132, False) == 132                      # no mask: every SM
    assert programs(256, 4096, 132, True) == 132                      # a head longer than a round
    assert programs(32, 96, 132, True) == 96                          # fewer tiles than SMs
    assert programs(8, 1536, 114, True) == 112                        # another SM count
    for blocks, sms in [(8, 132), (32, 132), (16, 114)]:
        p = programs(blocks, 10 * blocks * sms, sms, True)
        work = [0] * p
        for tile in range(2 * p):       # two rounds, the second reversed
            slot = tile % p if tile < p else p - 1 - tile % p
            work[slot] += blocks - tile % blocks    # key block j's work: blocks - j
        assert len(set(work)) == 1


def test_persistent_tiles_run_it_in_its_own_grid_for_the_calls_it_takes(device, monkeypatch):
    # One program per SM (or per tile, if fewer) and the batch size as one more argument; tensors
    # one descriptor cannot read take the per-key-block pass; calls outside the Gluon pass's
    # schedule the portable one. (The interpreter has no Gluon: the device check is the GPU
    # tests'.)
    monkeypatch.setattr(_hopper, "gluon_device", lambda tensors, varlen: not varlen)
    monkeypatch.setattr(_backward, "multiprocessors", lambda device: 132)
    portable = Tiles(32, 64, 1, 1)
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, hopper=True, persistent=True, **kwargs:
                        (PERSISTENT if persistent else WARP_SPECIALIZED) if hopper else portable)
    q = torch.randn(2, 256, 4, 64, device=device)
    launcher, grid, static, options = dkdv_launch(q, q)
    # 2 key blocks x 4 heads x 2 sequences: fewer tiles than SMs, one program each.
    assert launcher is _backward.DKDV_WS_PERSISTENT and grid == (16,) and static[-1] == 2
    assert options["ACCUMULATE_DQ"] and options["STAGES"] == 2 and options["KV_BUFFERS"] == 1
    longer = torch.randn(2, 8192, 4, 64, device=device)
    assert dkdv_launch(longer, longer)[1] == (132,)           # 64 x 4 x 2 tiles over 132 SMs
    # Causal: a multiple of the 64 key blocks per head, so each round covers whole heads.
    assert dkdv_launch(longer, longer, causal=True)[1] == (128,)
    heads_first = torch.randn(2, 4, 256, 64, device=device).transpose(1, 2)
    assert dkdv_launch(heads_first, heads_first)[0] is _backward.DKDV_WARP_SPECIALIZED
    assert dkdv_launch(q, q, window=(32, 0))[0] is _backward.DKDV
    # A caller's persistent tiles for tensors it cannot read: the per-key-block pass.
    launcher, grid, static, _ = dkdv_launch(heads_first, heads_first, tiles=(PERSISTENT, portable))
    assert launcher is _backward.DKDV_WARP_SPECIALIZED and grid == (2, 4, 2)
    # Two K/V buffers: an option of the persistent launch alone.
    launcher, _, _, options = dkdv_launch(q, q, tiles=(TWO_KV_BUFFERS, portable))
    assert launcher is _backward.DKDV_WS_PERSISTENT and options["KV_BUFFERS"] == 2
    launcher, _, _, options = dkdv_launch(heads_first, heads_first, tiles=(TWO_KV_BUFFERS, portable))
    assert launcher is _backward.DKDV_WARP_SPECIALIZED and "KV_BUFFERS" not in options


@pytest.mark.parametrize("causal, tiles", [(False, PERSISTENT), (True, PERSISTENT),
                                           (False, TWO_KV_BUFFERS)])
def test_a_persistent_pass_that_cannot_compile_leaves_the_call_to_the_portable_one(
        device, causal, tiles, monkeypatch):
    # Its grid and arguments are not the portable pass's: the fallback launches the portable
    # fused pass (the delta-only dQ pass already ran) with the per-key-block grid, and the launch
    # plan keeps that grid and those arguments.
    # float32 on the CPU; bf16 on a GPU, where the portable pass at these tiles needs more shared
    # memory in float32 than a block has.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = random_qkv((2, 256, 2, 64), (2, 256, 2, 64), dtype, device)
    monkeypatch.setattr(_hopper, "gluon_device", lambda tensors, varlen: not varlen)
    monkeypatch.setattr(_backward, "multiprocessors", lambda device: 3)
    monkeypatch.setattr(_hopper, "FALLBACKS", set())
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: tiles)
    monkeypatch.setattr(_backward, "dq_tiles", lambda *args: Tiles(16, 32, 1, 1))

    def refuse(grid, args, options):
        raise CompilationError("", None, "out of registers")
    monkeypatch.setattr(_backward.DKDV_WS_PERSISTENT, "launch", refuse)
    launcher, grid, static, _ = dkdv_launch(q, k, causal)
    # Three SMs; causal, a multiple of the two key blocks per head.
    assert launcher is _backward.DKDV_WS_PERSISTENT and grid == ((2,) if causal else (3,))
    assert static[-1] == 2
    geometry = call_geometry(q, k, None, 0)
    out, lse = _forward.forward(q, k, v, None, geometry, 0.125, causal, 0.0, 0, 0)
    grad_out = torch.randn_like(q)
    delta, dq, dk, dv = _backward.new_gradients(q, k, v, lse)
    with pytest.warns(RuntimeWarning, match="portable kernel"):
        _, (_, launched_grid, launched_static), _ = _backward.launch_into(
            delta, dq, dk, dv, grad_out, q, k, v, out, lse, None, geometry, 0.125, causal, 0.0, 0,
            0)
    assert launched_grid == (2, 2, 2) and launched_static == static[:-1]
    assert len(_hopper.FALLBACKS) == 1
    if device == "cpu":         # the whole call, fallen back
        assert_gradients_match_float64(q, k, v, causal)
    else:
        check_against_reference(q, k, v, causal=causal)
