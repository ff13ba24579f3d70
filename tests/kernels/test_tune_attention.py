"""The tuning sweep refuses a candidate whose result differs from the tuned tiles' (a fast but
miscompiled kernel must not be chosen), and times one that agrees."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import tune_attention  # noqa: E402


@pytest.fixture
def timing(monkeypatch):
    # The sweep's GPU calls, stood in for on the CPU.
    monkeypatch.setattr(tune_attention.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(tune_attention, "do_bench", lambda fn, **kwargs: 1.5)


def test_a_candidate_that_agrees_is_timed(timing):
    reference = (torch.randn(64, 32),)
    rounded = (reference[0].bfloat16().float(),)     # bf16 rounding: ~4e-3 relative
    assert tune_attention.measure(lambda: rounded, reference) == 1.5


def test_a_wrong_candidate_is_refused(timing):
    reference = (torch.randn(64, 32), torch.randn(8))
    wrong = (reference[0], reference[1] * 1.5)       # one of its tensors is off
    assert tune_attention.measure(lambda: wrong, reference).startswith("wrong result")
    nan = (reference[0], torch.full((8,), float("nan")))
    assert tune_attention.measure(lambda: nan, reference).startswith("wrong result")


def test_without_a_reference_the_result_is_not_checked(timing):
    assert tune_attention.measure(lambda: (torch.zeros(3),)) == 1.5


def test_a_candidate_that_fails_is_a_result(timing):
    def fail():
        raise RuntimeError("out of shared memory\nmore")
    assert tune_attention.measure(fail, None) == "RuntimeError: out of shared memory"


def test_hopper_candidates_keep_the_portable_twin_of_a_special_default():
    from kernels._launch import Tiles
    fused, gluon = Tiles(64, 64, 4, 3, fused=True), Tiles(32, 64, 4, 3, gluon=True)
    candidates = [Tiles(32, 128, 4, 3), Tiles(64, 64, 4, 3, gluon=True), fused]
    assert tune_attention.hopper_candidates(candidates, fused) == [
        fused, Tiles(64, 64, 4, 3), Tiles(64, 64, 4, 3, gluon=True)]
    assert tune_attention.hopper_candidates(candidates, gluon)[:2] == [gluon, Tiles(32, 64, 4, 3)]
    plain = Tiles(64, 64, 4, 3)
    assert tune_attention.hopper_candidates(candidates, plain) == [plain, Tiles(64, 64, 4, 3, gluon=True), fused]
    # A special default that replaced other portable tiles (the fused Gluon pass at head dim 64 for
    # long calls, over 32x128 two passes) is timed against those as well.
    gluon_fused, before = Tiles(64, 64, 4, 3, gluon=True, fused=True), Tiles(32, 128, 4, 3)
    assert tune_attention.hopper_candidates(candidates, gluon_fused, portable=before)[:3] == [
        gluon_fused, plain, before]
    assert tune_attention.hopper_candidates(candidates, gluon, portable=Tiles(32, 64, 4, 3))[:2] == [
        gluon, Tiles(32, 64, 4, 3)]


def test_hopper_candidates_can_be_limited_to_some_kinds():
    # --kinds gluon-fused: the default and its portable twin, then the Gluon fused tiles only.
    from kernels._launch import Tiles
    default = Tiles(32, 64, 4, 4, gluon=True)
    candidates = [Tiles(64, 64, 4, 3, fused=True), Tiles(32, 64, 4, 3, gluon=True),
                  Tiles(32, 64, 4, 3, gluon=True, fused=True), Tiles(128, 64, 4, 2, tma=True)]
    assert tune_attention.hopper_candidates(candidates, default, ("gluon-fused",)) == [
        default, Tiles(32, 64, 4, 4), Tiles(32, 64, 4, 3, gluon=True, fused=True)]
    assert [tune_attention.kind(t) for t in candidates] == ["fused", "gluon", "gluon-fused", "tma"]


def test_ping_pong_candidates_are_their_own_kind():
    # Ping-pong tiles are Gluon tiles too; --kinds gluon must not time them, and a ping-pong
    # default is timed against its portable twin.
    from kernels._launch import Tiles
    pingpong = Tiles(192, 64, 4, 3, gluon=True, pingpong=True, head_major=True)
    gluon = Tiles(128, 64, 8, 3, gluon=True)
    assert [tune_attention.kind(t) for t in (pingpong, gluon)] == ["pingpong", "gluon"]
    assert tune_attention.hopper_candidates([pingpong, gluon], Tiles(128, 64, 4, 3), ("gluon",)) == [
        Tiles(128, 64, 4, 3), gluon]
    assert tune_attention.hopper_candidates([gluon], pingpong, ("pingpong",)) == [
        pingpong, Tiles(192, 64, 4, 3)]
    assert sum(tune_attention.kind(t) == "pingpong" for t in tune_attention.FORWARD) == 12


def test_warp_specialized_candidates_are_their_own_kind():
    # They are fused Gluon tiles too; --kinds gluon-fused must not time them, and a
    # warp-specialized default is timed against its portable twin and the portable tiles.
    from kernels._launch import Tiles
    specialized = Tiles(64, 128, 4, 2, gluon=True, fused=True, warp_specialized=True)
    fused = Tiles(64, 64, 4, 3, gluon=True, fused=True)
    assert [tune_attention.kind(t) for t in (specialized, fused)] == ["warp-specialized", "gluon-fused"]
    assert tune_attention.hopper_candidates([specialized, fused], Tiles(32, 64, 4, 3),
                                            ("gluon-fused",)) == [Tiles(32, 64, 4, 3), fused]
    assert tune_attention.hopper_candidates([fused], specialized, ("warp-specialized",),
                                            Tiles(32, 64, 4, 3)) == [
        specialized, Tiles(64, 128, 4, 2), Tiles(32, 64, 4, 3)]
    # Stages 2-4, per key block and persistent with one or two K/V buffers.
    assert sum(tune_attention.kind(t) == "warp-specialized" for t in tune_attention.DKDV) == 9
    # A persistent default (short calls without a mask) is timed against the same twins.
    persistent = Tiles(64, 128, 4, 2, gluon=True, fused=True, warp_specialized=True, persistent=True)
    assert tune_attention.kind(persistent) == "warp-specialized"
    assert tune_attention.hopper_candidates([specialized], persistent, ("warp-specialized",),
                                            Tiles(32, 64, 4, 3)) == [
        persistent, Tiles(64, 128, 4, 2), Tiles(32, 64, 4, 3), specialized]
    two_buffers = Tiles(64, 128, 4, 4, gluon=True, fused=True, warp_specialized=True,
                        persistent=True, kv_buffers=2)
    assert tune_attention.hopper_candidates([], two_buffers, ("warp-specialized",))[1] == \
        Tiles(64, 128, 4, 4)
