"""The warp-specialized fused backward (_dkdv_warp_specialized.py): it compiles for sm_90 into the
partitions and the schedule it was written for (checked here on the CPU, from the compiler's
output), tiles that ask for it run it only for the calls it takes, the default chooses it only in
the measured settings, and if it cannot compile the portable pass runs the call. Its numerics
need a GPU (test_gpu_gluon.py): the interpreter cannot run Gluon."""

import dataclasses
import inspect
import re

import pytest
import torch
from triton.compiler.errors import CompilationError

from kernels import _backward, _eager_plan, _forward, _hopper
from kernels._launch import Tiles, call_geometry

from .numerics import assert_gradients_match_float64, random_qkv
from .test_gluon_backward import compiled_for_sm90

WARP_SPECIALIZED = Tiles(64, 128, 4, 2, gluon=True, fused=True, warp_specialized=True)


@pytest.mark.parametrize("head_dim, causal", [(128, 0), (128, 1), (64, 0), (64, 1)])
def test_compiles_for_sm90_with_two_consumers_and_a_producer(head_dim, causal):
    compiled = compiled_for_sm90("dkdv_warp_specialized", head_dim, 64, 128, 2, 4, causal)
    # Workers: the second consumer warpgroup and the producer warp, at the registers asked for
    # (the first consumer is the default partition).
    assert compiled["partitions"] == ["240, 24"]
    # One query-block loop per consumer. Without the mask: five products (S, dP, dV, dK, dQ), the
    # first two waited for before the elementwise step, the other three together at the end, and
    # one TMA reduce-add of the consumer's dQ columns. At head dim 64 dQ's 64 columns are the
    # consumers' in turn and taken a block late: on the consumer's blocks the previous block's dQ
    # product (waited for at once) and its reduce, then S and dP; dK and dV are waited for at the
    # end. At head dim 128 the causal mask is applied to every block without a branch, so the
    # loop is the same five products. (A loop's match ends at its first yield: at head dim 64
    # with the causal mask that is the mask's branch, after S, dP and the previous block's dQ.)
    loops = [loop[loop.rfind("scf.for"):] for loop in compiled["loops"]]
    consumer_loops = [loop for loop in loops if "ttng.warp_group_dot " in loop]
    assert len(consumer_loops) == 2
    for loop in consumer_loops:
        # Without dropout each block loads its own log-sum-exp and delta rows: the loop carries
        # only dK and dV (carrying the next block's rows was measured slower).
        assert "tensor<64xf32" not in loop.splitlines()[0]
        if causal and head_dim == 64:
            assert loop.count("ttng.warp_group_dot ") == 3 and "scf.if" in loop
            continue
        assert loop.count("ttng.warp_group_dot ") == 5
        assert re.findall(r"warp_group_dot_wait [^{]*\{pendings = (\d+)", loop) == ["0", "0"]
        assert loop.count("ttng.async_tma_reduce add") == 1 and "atomic_rmw" not in loop
        if head_dim == 64:
            # dQ's is the one product of a 64 x 128 tile (dS, times all 128 keys): the previous
            # block's, issued after this block's S and dP and before its dV and dK.
            products = [line for line in loop.splitlines() if "ttng.warp_group_dot " in line]
            assert [index for index, line in enumerate(products)
                    if "memdesc<64x128x" in line.split(" * ")[0]] == [2]
    # ptxas kept the products asynchronous. Spills: none at head dim 64; at 128 the consumers sit
    # at 240 registers, a few bytes with or without the mask; the measured speed includes them.
    # Without the mask none of them is in the consumers' loops; with it, 0 and 4 spill
    # instructions are (the mask under a branch put 45 and 41 there and measured up to 8 % slower,
    # attention_notes v33). Storing dK and dV by TMA through shared memory (v37) added 8-24
    # bytes, outside the loops.
    assert compiled["serialized"] == []
    limit = {(64, 0): 8, (64, 1): 64, (128, 0): 24, (128, 1): 48}[head_dim, causal]
    assert compiled["stack"] <= limit
    assert max(map(int, compiled["loop_spills"].split(","))) <= (8 if causal else 0)


@pytest.mark.parametrize("head_dim, stages", [(128, 2), (64, 4)])
def test_with_dropout_each_consumer_generates_only_its_own_counters(head_dim, stages):
    # The keep-mask is drawn in the accumulator layout of the consumer's untransposed 64 x 64
    # score tile (the forward's orientation): no layout conversion in the loop, and Philox's
    # multiplies for two counters per thread and block (7 rounds of two, some folded), not the
    # 4x of a mask recomputed per consuming thread.
    compiled = compiled_for_sm90("dkdv_warp_specialized", head_dim, 64, 128, stages, 4, 0,
                                 "untransposed")
    assert compiled["partitions"] == ["240, 24"]
    loops = [loop[loop.rfind("scf.for"):] for loop in compiled["loops"]]
    consumer_loops = [loop for loop in loops if "ttng.warp_group_dot " in loop]
    assert len(consumer_loops) == 2
    for loop in consumer_loops:
        assert loop.count("ttng.warp_group_dot ") == 5      # at head dim 64, dQ's in turn
        assert "convert_layout" not in loop
        # At head dim 64 the loop carries the next block's log-sum-exp and delta rows, loaded a
        # block ahead; at 128 (registers at their limit) each block loads its own.
        assert loop.splitlines()[0].count("tensor<64xf32") == {64: 2, 128: 0}[head_dim]
    assert compiled["high_multiplies"] <= 2 * 2 * 14
    assert compiled["serialized"] == []
    # At head dim 128 the generator's registers spill some bytes (the consumers sit at 240); at 64
    # a few since dQ is taken a block late (5 % faster all the same, attention_notes v27), and
    # 24 more outside the loops since dK and dV leave by TMA (v37).
    assert compiled["stack"] <= {64: 72, 128: 160}[head_dim]


@pytest.mark.parametrize("kernel, head_dim, causal, stages, limit", [
    ("dkdv_ws_mask_partition", 128, 0, 2, 8), ("dkdv_ws_mask_partition", 128, 1, 2, 32),
    ("dkdv_ws_mask_partition", 64, 1, 4, 4), ("dkdv_ws_persistent_mask_partition", 128, 0, 2, 8),
    ("dkdv_ws_persistent_mask_partition", 128, 1, 2, 48)])
def test_with_a_mask_partition_the_consumers_run_no_philox(kernel, head_dim, causal, stages, limit):
    # Two more warps (the third worker, in the producer's warpgroup at its 24 registers) draw
    # every block's keep-mask into shared memory: the consumers' loops have no Philox multiply
    # and fewer spills than when they draw it themselves (head dim 128, per loop, per key block:
    # 6 and 0 without the mask, 9 and 29 causal, against 23 / 24 and 69 / 60; persistent: 6 / 4
    # and 45 / 16 against 34 / 46 and 82 / 83). The mask warps compute 16 counters each per
    # block of 2 x 64 x 64 entries: one per thread and 16-row chunk.
    compiled = compiled_for_sm90(kernel, head_dim, 64, 128, stages, 4, causal, "untransposed")
    assert compiled["partitions"] == ["240, 24, 24"]
    loops = [loop[loop.rfind("scf.for"):] for loop in compiled["loops"]]
    consumer_loops = [loop for loop in loops if "ttng.warp_group_dot " in loop]
    assert len(consumer_loops) == 2
    for loop in consumer_loops:
        assert "mulhiui" not in loop
        # (With the causal mask a loop's match ends at the mask's branch: S and dP before it,
        # and at head dim 64 the previous block's dQ.)
        assert loop.count("ttng.warp_group_dot ") == {(128, 0): 5, (128, 1): 2,
                                                      (64, 1): 3}[head_dim, causal]
    # Seven rounds of two high multiplies per counter, the first round's one on a zero word
    # folded: 8 chunks of one counter per thread (without a mask partition each consumer loop
    # has 14, two counters).
    assert 8 * 13 <= compiled["high_multiplies"] <= 8 * 14 + 8
    assert compiled["serialized"] == []
    assert max(map(int, compiled["loop_spills"].split(","))) <= limit


def test_tiles_name_it_only_as_a_fused_gluon_pass_of_its_shape():
    assert WARP_SPECIALIZED.warp_specialized
    for bad in (dict(gluon=False), dict(fused=False), dict(block_m=32), dict(block_n=64),
                dict(num_warps=8), dict(num_stages=1)):
        fields = dict(block_m=64, block_n=128, num_warps=4, num_stages=2, gluon=True, fused=True,
                      warp_specialized=True)
        with pytest.raises(ValueError, match="warp-specialized"):
            Tiles(**{**fields, **bad})


def test_a_mask_partition_is_an_option_of_the_warp_specialized_pass():
    assert dataclasses.replace(WARP_SPECIALIZED, mask_partition=True).mask_partition
    assert dataclasses.replace(WARP_SPECIALIZED, mask_partition=True, persistent=True).persistent
    with pytest.raises(ValueError, match="mask_partition"):
        dataclasses.replace(WARP_SPECIALIZED, mask_partition=True, warp_specialized=False)


def test_dk_and_dv_leave_by_tma_where_the_tensors_and_shared_memory_allow(device):
    # (Under the interpreter the TMA check takes tensors on any device.)
    from kernels.qkv_packed import split_qkv
    contiguous = torch.empty(2, 1024, 4, 128, dtype=torch.bfloat16, device=device)
    _, packed, _ = split_qkv(torch.empty(2, 1024, 12, 128, dtype=torch.bfloat16, device=device), 4)
    heads_first = torch.empty(2, 4, 1024, 128, dtype=torch.bfloat16, device=device).transpose(1, 2)
    misaligned = torch.empty(2 * 1024 * 4 * 128 + 1, dtype=torch.bfloat16,
                             device=device)[1:].view(2, 1024, 4, 128)
    options = dict(HEAD_DIM=128)
    for persistent in (False, True):
        for grads in (contiguous, packed):      # rows of one matrix
            assert _backward.key_gradients_by_tma(grads, grads, options, persistent)
        # One descriptor per (sequence, head) reads a heads-first view; one per tensor cannot.
        assert _backward.key_gradients_by_tma(heads_first, heads_first, options, persistent) \
            == (not persistent)
        assert not _backward.key_gradients_by_tma(contiguous, misaligned, options, persistent)
    # Beside the mask partition's slots the staging does not fit at head dim 128; at 64 it does.
    assert not _backward.key_gradients_by_tma(contiguous, contiguous,
                                              dict(HEAD_DIM=128, MASK_PARTITION=True), False)
    assert _backward.key_gradients_by_tma(contiguous[..., :64].contiguous(),
                                          contiguous[..., :64].contiguous(),
                                          dict(HEAD_DIM=64, MASK_PARTITION=True), False)


def test_register_grads_is_an_option_of_the_warp_specialized_pass():
    assert dataclasses.replace(WARP_SPECIALIZED, register_grads=True).register_grads
    with pytest.raises(ValueError, match="register_grads"):
        dataclasses.replace(WARP_SPECIALIZED, register_grads=True, warp_specialized=False)


def test_a_mask_partition_is_the_default_only_where_measured_faster(monkeypatch):
    # Head dim 128 causal with dropout at 4K-8K, in the per-key-block grid (v35: -3.3 / -2.8 %);
    # never without dropout, without the mask, at head dim 64 or in the persistent grid.
    from kernels import _launch, _tile_rules
    monkeypatch.setattr(_launch, "capability", lambda device: (9, 0))
    cuda, bf16 = torch.device("cuda", 0), torch.bfloat16
    assert _tile_rules.MASK_PARTITION_SEQLEN == {(128, True): (4096, 8192)}

    def mask_partition(head_dim=128, causal=True, dropout=True, seqlen=4096, dtype=bf16, **kwargs):
        return _tile_rules.dkdv_tiles(head_dim, cuda, dtype, causal, dropout, seqlen=seqlen,
                                      **kwargs).mask_partition
    assert mask_partition() and mask_partition(seqlen=8192)
    assert mask_partition(persistent=False) and mask_partition(dtype=torch.float16)
    for other in (dict(seqlen=2048), dict(seqlen=16384), dict(dropout=False), dict(causal=False),
                  dict(head_dim=64), dict(deterministic=True), dict(hopper=False)):
        assert not mask_partition(**other), other
    monkeypatch.setitem(_tile_rules.WARP_SPECIALIZED_PERSISTENT_SEQLEN, (128, True, True), (4096, 4096))
    assert not mask_partition()                            # the persistent grid draws its own


def test_the_calls_it_takes():
    # (causal, window, dropout_p, seqlen_q, seqlen_k, head_dim, group_size, block_m, block_n):
    # the Gluon dK/dV pass's calls, with dropout too.
    call = dict(causal=True, window=(-1, -1), dropout_p=0.0, seqlen_q=4096, seqlen_k=4096,
                head_dim=128, group_size=1, block_m=64, block_n=128)
    assert _hopper.gluon_dkdv_call(**call)
    assert _hopper.gluon_dkdv_call(**{**call, "head_dim": 64})
    assert _hopper.gluon_dkdv_call(**{**call, "dropout_p": 0.1})
    assert not _hopper.gluon_dkdv_call(**{**call, "group_size": 2})
    assert not _hopper.gluon_dkdv_call(**{**call, "seqlen_q": 4032, "seqlen_k": 4032})  # ragged keys
    assert not _hopper.gluon_dkdv_call(**{**call, "causal": False, "seqlen_q": 4000})   # ragged queries
    assert not _hopper.gluon_dkdv_call(**{**call, "seqlen_q": 2048})                    # causal, Nq != Nk


@pytest.mark.parametrize("head_dim", [64, 128])
def test_warp_specialized_tiles_are_the_default_only_where_measured_faster(head_dim, monkeypatch):
    from kernels import _launch, _tile_rules
    cuda, bf16 = torch.device("cuda", 0), torch.bfloat16
    # The shortest lengths where it won (attention_notes v20, v21, v22; head dim 64 causal with
    # dropout: v27; 128 causal: v28), by (causal, dropout). Four stages fit at head dim 64, two at
    # 128.
    shortest = {64: {(False, False): 2048, (True, False): 4096, (False, True): 1024, (True, True): 2048},
                128: {(False, False): 1024, (True, False): 2048, (False, True): 1024, (True, True): 2048}}
    assert {key: value for key, value in _tile_rules.WARP_SPECIALIZED_MIN_SEQLEN.items()
            if key[0] == head_dim} == {(head_dim, *key): value for key, value in shortest[head_dim].items()}
    expected_tiles = Tiles(64, 128, 4, {64: 4, 128: 2}[head_dim], gluon=True, fused=True,
                           warp_specialized=True)
    # What each call ran before, below those lengths: (causal, dropout) -> tiles.
    previous = {64: {(False, False): Tiles(32, 128, 4, 3), (True, False): Tiles(64, 64, 4, 3),
                     (False, True): Tiles(64, 64, 4, 3, fused=True),
                     (True, True): Tiles(64, 64, 4, 3, fused=True)},
                128: {(False, False): Tiles(32, 64, 4, 3, gluon=True),
                      (True, False): Tiles(32, 64, 4, 3, gluon=True),
                      (False, True): Tiles(32, 64, 4, 4, gluon=True),
                      (True, True): Tiles(32, 64, 4, 4, gluon=True)}}[head_dim]

    def tiles(causal=False, dropout=False, seqlen=None, **kwargs):
        # The per-key-block grid's rule (the persistent one's: test_ws_persistent_backward.py).
        seqlen = shortest[head_dim][causal, dropout] if seqlen is None else seqlen
        return _tile_rules.dkdv_tiles(kwargs.pop("head_dim", head_dim), kwargs.pop("device", cuda),
                                  kwargs.pop("dtype", bf16), causal, dropout, seqlen=seqlen,
                                  persistent=False, **kwargs)
    for capability, expected in [((9, 0), True), ((8, 0), False), ((10, 0), False)]:
        monkeypatch.setattr(_launch, "capability", lambda device: capability)
        assert tiles().warp_specialized == expected
    monkeypatch.setattr(_launch, "capability", lambda device: (9, 0))
    for causal, dropout in shortest[head_dim]:
        call = dict(causal=causal, dropout=dropout)
        # dK and dV by TMA, except at head dim 64 causal with dropout, where that lost (v37).
        want = dataclasses.replace(expected_tiles,
                                   register_grads=(head_dim, causal, dropout) == (64, True, True))
        assert tiles(**call) == want
        assert tiles(**call, dtype=torch.float16) == want
        assert tiles(**call, seqlen=16384) == want
        # Below the shortest length where it won, the previous default.
        assert tiles(**call, seqlen=shortest[head_dim][causal, dropout] // 2) == previous[causal, dropout]
        assert not tiles(**call, deterministic=True).fused                 # dQ by unordered adds
        assert not tiles(**call, hopper=False).gluon                       # calls it does not take
        assert not tiles(**call, dtype=torch.float32).warp_specialized
        assert not tiles(**call, device=torch.device("cpu")).warp_specialized
        for other in (32, 96, 256):                                        # never measured there
            assert not tiles(**call, head_dim=other, seqlen=16384).warp_specialized


def chosen(q, k, causal=False, dropout_p=0.0, window=(-1, -1), tiles=None):
    """The dK/dV launcher and options ``launch_configs`` picks for this call."""
    geometry = call_geometry(q, k, None, 0)
    out, lse = _forward.new_outputs(q, geometry)
    configs = _backward.launch_configs(torch.empty_like(q), q, k, k, out, lse,
                                       *_backward.new_gradients(q, k, k, lse)[1:], geometry, 0.125,
                                       causal, dropout_p, tiles, window)
    return configs[1][0], configs[1][3]


def test_warp_specialized_tiles_run_it_only_for_the_calls_it_takes(device, monkeypatch):
    # The default's tiles where it takes the call; elsewhere the portable pass with its own tiles.
    # (The interpreter has no Gluon: the device check is the GPU tests'.)
    monkeypatch.setattr(_hopper, "gluon_device", lambda tensors, varlen: not varlen)
    portable = Tiles(32, 64, 1, 1)
    monkeypatch.setattr(_backward, "dkdv_tiles",
                        lambda *args, hopper=True, **kwargs: WARP_SPECIALIZED if hopper else portable)
    q = torch.randn(2, 256, 4, 64, device=device)
    launcher, options = chosen(q, q)
    assert launcher is _backward.DKDV_WARP_SPECIALIZED
    assert options["ACCUMULATE_DQ"] and options["STAGES"] == 2
    assert options["TMA_GRADS"]                                 # dK and dV leave by TMA
    in_registers = dataclasses.replace(WARP_SPECIALIZED, register_grads=True)
    assert "TMA_GRADS" not in chosen(q, q, tiles=(in_registers, portable))[1]
    assert chosen(q, q, causal=True)[0] is _backward.DKDV_WARP_SPECIALIZED
    assert chosen(q, q, causal=True, dropout_p=0.1)[0] is _backward.DKDV_WARP_SPECIALIZED
    for call in (dict(q=q, k=q, window=(32, 0)),
                 dict(q=q, k=q[:, :, :2]),                   # GQA
                 dict(q=q, k=q[:, :192]),                    # ragged key block
                 dict(q=q[:, :128], k=q, causal=True)):      # causal, Nq != Nk
        launcher, options = chosen(**call)
        assert launcher is _backward.DKDV and (options["BLOCK_M"], options["BLOCK_N"]) == (32, 64)
        assert "TMA_GRADS" not in options
    # Tiles a caller passes: a call it does not take runs the portable pass with those tiles.
    launcher, options = chosen(q, q, window=(32, 0), tiles=(WARP_SPECIALIZED, portable))
    assert launcher is _backward.DKDV and "STAGES" not in options


def test_causal_grids_take_four_pairs_at_a_time_below_16k_keys_and_one_from_there(device,
                                                                                  monkeypatch):
    # attention_notes v28 (four, below 16K) and v30 (one, at 16K; head dim 128).
    monkeypatch.setattr(_hopper, "gluon_device", lambda tensors, varlen: not varlen)
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: WARP_SPECIALIZED)
    for seqlen, group in [(256, 4), (8192, 4), (16384, 1), (32768, 1)]:
        q = torch.empty(1, seqlen, 1, 64, device=device)
        launcher, options = chosen(q, q, causal=True)
        assert launcher is _backward.DKDV_WARP_SPECIALIZED and options["ORDER_GROUP"] == group
        assert "ORDER_GROUP" not in chosen(q, q)[1]       # no mask: one key block per program


def test_deterministic_algorithms_leave_it_out(device, monkeypatch):
    # Its dQ is summed by reduce-adds in whatever order blocks finish: the two passes instead.
    monkeypatch.setattr(_hopper, "gluon_device", lambda tensors, varlen: not varlen)
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, deterministic=False, **kwargs:
                        Tiles(32, 64, 1, 1) if deterministic else WARP_SPECIALIZED)
    q = torch.randn(1, 256, 2, 64, device=device)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    launcher, options = chosen(q, q)
    assert launcher is _backward.DKDV and not options.get("ACCUMULATE_DQ", False)


@pytest.mark.parametrize("causal", [False, True])
def test_a_warp_specialized_pass_that_cannot_compile_leaves_the_call_to_the_portable_one(
        device, causal, monkeypatch):
    q, k, v = random_qkv((1, 256, 2, 64), (1, 256, 2, 64), torch.float32, device)
    monkeypatch.setattr(_hopper, "gluon_device", lambda tensors, varlen: not varlen)
    monkeypatch.setattr(_hopper, "FALLBACKS", set())
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: WARP_SPECIALIZED)
    monkeypatch.setattr(_backward, "dq_tiles", lambda *args: Tiles(16, 32, 1, 1))

    def refuse(grid, args, options):
        raise CompilationError("", None, "out of registers")
    monkeypatch.setattr(_backward.DKDV_WARP_SPECIALIZED, "launch", refuse)
    portable_options = []
    launch = _backward.DKDV.launch
    monkeypatch.setattr(_backward.DKDV, "launch", lambda grid, args, options: (
        portable_options.append(options), launch(grid, args, options))[1])
    with pytest.warns(RuntimeWarning, match="portable kernel"):
        assert_gradients_match_float64(q, k, v, causal)
    assert len(_hopper.FALLBACKS) == 1
    # Only options the portable kernel takes (on a GPU Triton refuses others; the causal pass's
    # ORDER_GROUP once reached it), or launch options.
    taken = set(inspect.signature(getattr(_backward.DKDV.kernel, "fn",
                                          _backward.DKDV.kernel)).parameters)
    assert portable_options and all(set(options) <= taken | {"num_warps", "num_stages"}
                                    for options in portable_options)
