"""scripts/ab_tiles.py: candidate specs, the cells it measures, its argument errors, and one cell's
record on the CPU (the interpreter; a stand-in timer, since speed needs a GPU)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import ab_tiles  # noqa: E402
from kernels import _forward  # noqa: E402
from kernels._launch import Tiles  # noqa: E402


def test_a_candidate_names_its_tiles_and_flags():
    assert ab_tiles.parse_candidate("pp=128,128,4,3:gluon,pingpong,head_major") == (
        "pp", Tiles(128, 128, 4, 3, gluon=True, pingpong=True, head_major=True))
    assert ab_tiles.parse_candidate(
        "pers2=64,128,4,4:gluon,fused,warp_specialized,persistent,kv_buffers=2") == (
        "pers2", Tiles(64, 128, 4, 4, gluon=True, fused=True, warp_specialized=True,
                       persistent=True, kv_buffers=2))
    assert ab_tiles.parse_candidate("plain=64,64,4,3") == ("plain", Tiles(64, 64, 4, 3))


def test_the_printed_line_gives_each_candidate_against_its_pass_default():
    record = dict(forward_candidates={"s4": "..."}, backward_candidates={"pers": "..."},
                  median={"forward": 0.2, "s4": 0.19, "backward": 0.5, "pers": 0.525,
                          "cudnn_forward": 0.18})
    assert ab_tiles.summary(record) == ("forward 0.2000  s4 0.1900 (-5.0 %)  backward 0.5000  "
                                        "pers 0.5250 (+5.0 %)  cudnn_forward 0.1800")


@pytest.mark.parametrize("spec, message", [
    ("128,64,4,3", "expected NAME="),
    ("a=128,64,4", "four integers"),
    ("a=128,x,4,3", "four integers"),
    ("a=128,64,4,3:pingpog", "unknown flag 'pingpog'"),
    ("a=128,64,4,3:kv_buffers", "unknown flag 'kv_buffers'"),
    ("a=128,64,4,3:gluon,tma", "one kernel"),             # Tiles' own check
])
def test_a_bad_candidate_says_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        ab_tiles.parse_candidate(spec)


def test_the_arguments_give_every_cell_asked_for_and_refuse_bad_ones(capsys):
    args = ab_tiles.parse_args(["--head-dims", "64", "128", "--seqlens", "512", "4096",
                                "--causal", "1", "--dropouts", "0.0", "0.1", "--heads", "12",
                                "--forward", "a=128,64,4,3:gluon,pingpong"])
    assert len(args.cells) == 8 and args.cells[0] == (64, 512, True, 0.0, 32, 12)
    assert args.cells[-1] == (128, 4096, True, 0.1, 4, 12)
    assert args.forward == {"a": Tiles(128, 64, 4, 3, gluon=True, pingpong=True)}
    for argv, message in [(["--seqlens", "3000"], "not a multiple"),
                          (["--forward", "a=64,64,4,3", "--backward", "a=64,64,4,3"], "unique"),
                          (["--forward", "cudnn_forward=64,64,4,3"], "unique"),
                          (["--dropouts", "1.0"], "--dropouts"),
                          (["--forward", "a=64,64"], "four integers")]:
        with pytest.raises(SystemExit):
            ab_tiles.parse_args(argv)
        assert message in capsys.readouterr().err


def test_a_cell_times_every_candidate_in_interleaved_rounds_and_checks_its_numbers(device,
                                                                                  monkeypatch):
    # float32 at small tiles: the interpreter on the CPU, the portable kernels on a GPU.
    timed = []

    def timer(fn, **kwargs):
        fn()
        timed.append(fn)
        return float(len(timed))
    real_forward = _forward.forward

    def forward(*args, tiles=None, **kwargs):
        if tiles == Tiles(32, 32, 1, 1):
            raise RuntimeError("does not compile\nsecond line")
        return real_forward(*args, tiles=tiles, **kwargs)
    monkeypatch.setattr(_forward, "forward", forward)
    record = ab_tiles.measure_cell(
        16, 64, True, 0.0, 2, 2, {"small": Tiles(16, 32, 1, 1), "broken": Tiles(32, 32, 1, 1)},
        {"dkdv16": Tiles(16, 32, 1, 1)}, rounds=2, rep=1, cudnn=False, device=device,
        dtype=torch.float32, timer=timer)
    # Defaults and the candidates that ran, each once per round, in the same order every round.
    assert list(record["ms"]) == ["forward", "small", "backward", "dkdv16"]
    assert record["ms"]["forward"] == [1.0, 5.0] and record["median"]["dkdv16"] == 6.0
    # This timer's rounds are far apart, so every name is marked unsteady with its spread.
    assert record["unsteady"]["forward"] == 200.0 and set(record["unsteady"]) == set(record["ms"])
    assert record["failed"] == {"broken": "RuntimeError: does not compile"}
    assert record["fwd_err"]["broken"] is None
    # float32: every tiling agrees with the portable kernels' to rounding.
    assert record["fwd_err"]["small"] < 1e-5 and record["bwd_err"]["dkdv16"] < 1e-4
    assert (record["batch"], record["heads"], record["causal"]) == (2, 2, True)
    # Each candidate names the kernels it ran (float32 runs the portable ones).
    assert set(record["kernels"]) == {"forward", "small", "backward", "dkdv16"}
    assert record["kernels"]["small"]["forward"] == "_forward_kernel"
    assert record["kernels"]["dkdv16"]["dkdv"] == "_dkdv_kernel"


def test_without_a_gpu_it_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        ab_tiles.main(["--seqlens", "1024"])
