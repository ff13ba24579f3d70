"""scripts/kernel_resources.py: the attention kernels compiled for sm_90 on a machine without a GPU,
with the specialization a launch would give them."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.trainer.helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import kernel_resources  # noqa: E402


def fake_kernel(*params):
    return SimpleNamespace(params=[SimpleNamespace(name=name, is_constexpr=constexpr, default=default)
                                   for name, constexpr, default in params], fn=SimpleNamespace(__name__="k"))


def test_specialization_follows_tritons_rules():
    kernel = fake_kernel(("Q", False, None), ("cu", False, None), ("stride", False, None),
                         ("heads", False, None), ("group", False, None), ("base", False, None),
                         ("scale", False, None), ("BLOCK", True, None), ("FLAG", True, False))
    q = torch.empty(2, 3, device="meta", dtype=torch.bfloat16)
    signature, constants, attrs = kernel_resources.specialize(
        kernel, (q, None, 768, 12, 1, 2**40, 0.125), {"BLOCK": 64})
    assert signature == {"Q": "*bf16", "cu": "constexpr", "stride": "i32", "heads": "i32",
                         "group": "constexpr", "base": "i64", "scale": "fp32", "BLOCK": "constexpr",
                         "FLAG": "constexpr"}
    assert constants == {(1,): None, (4,): 1, (7,): 64, (8,): False}      # defaults fill in
    assert attrs == {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]],
                     (5,): [["tt.divisibility", 16]]}                       # 768 and 2**40, not 12
    with pytest.raises(ValueError, match="takes 7 runtime arguments; got 2"):
        kernel_resources.specialize(kernel, (q, None), {})


def test_the_forward_compiles_for_sm90_here_and_reports_its_resources():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # compile, not interpret
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_resources.py"), "--pass",
                             "forward", "--batch", "1", "--seqlen", "256", "--heads", "2", "--causal",
                             "--tiles", "64,64,4,2"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = dict(field.split("=") for field in result.stdout.split())
    assert report["kernel"] == "_forward_kernel" and report["num_warps"] == "4"
    assert 32 <= int(report["registers"]) <= 255 and int(report["stack_bytes"]) >= 0
    assert int(report["shared_bytes"]) > 0 and int(report["sass_instructions"]) > 100
    assert len(report["sass_digest"]) == 12


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        kernel_resources.parse_args(["--pass", "dkdv", "--seed-in-memory"])
    with pytest.raises(SystemExit):
        kernel_resources.parse_args(["--pass", "dkdv", "--tiles", "64,64"])
    with pytest.raises(SystemExit):                 # the warp-specialized pass is a fused Gluon one
        kernel_resources.parse_args(["--pass", "dkdv", "--tiles", "64,128,4,2", "--warp-specialized"])
    with pytest.raises(SystemExit):                 # ... of 64 x 128 tiles over 4 warps
        kernel_resources.parse_args(["--pass", "dkdv", "--tiles", "32,64,4,3", "--gluon", "--fused",
                                     "--warp-specialized"])
    with pytest.raises(SystemExit):                 # ... and at least 2 stages
        kernel_resources.parse_args(["--pass", "dkdv", "--tiles", "64,128,4,1", "--gluon", "--fused",
                                     "--warp-specialized"])
    with pytest.raises(SystemExit):                 # two K/V buffers are the persistent pass's
        kernel_resources.parse_args(["--pass", "dkdv", "--tiles", "64,128,4,2", "--gluon", "--fused",
                                     "--warp-specialized", "--kv-buffers", "2"])
    args = kernel_resources.parse_args(["--pass", "dkdv", "--tiles", "64,128,4,2", "--gluon",
                                        "--fused", "--warp-specialized"])
    assert kernel_resources.pass_arguments(args)[0].fn.__name__ == "_dkdv_warp_specialized_kernel"
    args = kernel_resources.parse_args(["--pass", "dkdv", "--tiles", "64,128,4,4", "--gluon",
                                        "--fused", "--warp-specialized", "--persistent",
                                        "--kv-buffers", "2"])
    kernel, _, options = kernel_resources.pass_arguments(args)
    assert kernel.fn.__name__ == "_dkdv_ws_persistent_kernel" and options["KV_BUFFERS"] == 2
    # dK and dV by TMA as the library stores them, unless asked for from registers; the mask
    # partition's slots leave no room for the staging at head dim 128.
    assert options["TMA_GRADS"]
    with pytest.raises(SystemExit):
        kernel_resources.parse_args(["--pass", "dkdv", "--register-grads"])
    for extra, tma in [(["--register-grads"], False), (["--dropout", "0.1", "--mask-partition",
                                                         "--head-dim", "128"], False),
                       (["--dropout", "0.1", "--mask-partition"], True)]:
        args = kernel_resources.parse_args(["--pass", "dkdv", "--tiles", "64,128,4,2", "--gluon",
                                            "--fused", "--warp-specialized", *extra])
        assert kernel_resources.pass_arguments(args)[2].get("TMA_GRADS", False) == tma


def run_script(*arguments):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # compile, not interpret
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_resources.py"), *arguments,
                           "--batch", "1", "--seqlen", "256", "--heads", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_gluon_kernels_compile_here_too():
    # The fused Gluon dK/dV pass with dropout at head dim 64: the kernel the options name, spill-free.
    result = run_script("--pass", "dkdv", "--head-dim", "64", "--tiles", "32,64,4,3", "--gluon",
                        "--fused", "--causal", "--dropout", "0.1")
    assert result.returncode == 0, result.stderr[-2000:]
    report = dict(field.split("=") for field in result.stdout.split())
    assert report["kernel"] == "_dkdv_gluon_kernel" and report["stack_bytes"] == "0"
    assert report["wgmma_serialized"] == "no"
    # Its MMA loops (spill-free, as the stack says): one count per loop.
    assert report["mma_loop_spills"] != "-" and set(report["mma_loop_spills"].split(",")) == {"0"}


def test_spills_are_counted_per_innermost_loop_that_holds_warpgroup_mmas():
    # Two loops with products (one nested in an outer loop), one loop without, spills before the
    # loops, and a backward branch over an EXIT (control flow between partitions, not a loop).
    sass = """
        /*0000*/                   STL [R1+0x8], R2 ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0020*/                   LDL R3, [R1+0x8] ;
        /*0030*/                   STL.64 [R1+0x10], R4 ;
        /*0040*/               @P0 BRA 0x10 ;
        /*0050*/                   IADD3 R5, R5, 0x1, RZ ;
        /*0060*/               @P1 BRA 0x0 ;
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0080*/               @P2 BRA 0x70 ;
        /*0090*/                   LDL R7, [R1+0x18] ;
        /*00a0*/               @P3 BRA 0x90 ;
        /*00b0*/                   EXIT ;
        /*00c0*/               @P4 BRA 0x70 ;"""
    assert kernel_resources.mma_loop_spills(sass) == [2, 0]
    assert kernel_resources.mma_loop_spills("        /*0000*/                   EXIT ;") == []


def test_exponentials_between_the_two_waits_are_counted_per_loop():
    # A loop whose second wait comes after two exponentials, one whose second wait comes first,
    # and a loop with a single wait (no pair: not counted).
    sass = """
        /*0000*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, gsb0 ;
        /*0010*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0020*/                   MUFU.EX2 R3, R3 ;
        /*0030*/                   MUFU.EX2 R4, R4 ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0050*/                   MUFU.EX2 R5, R5 ;
        /*0060*/               @P0 BRA 0x0 ;
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, gsb0 ;
        /*0080*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0090*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00a0*/                   MUFU.EX2 R3, R3 ;
        /*00b0*/               @P1 BRA 0x70 ;
        /*00c0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, gsb0 ;
        /*00d0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00e0*/                   MUFU.EX2 R3, R3 ;
        /*00f0*/               @P2 BRA 0xc0 ;"""
    assert kernel_resources.exps_under_mma(sass) == [2, 0]


def test_the_sass_digest_names_the_instructions_not_their_addresses():
    code = """
        /*0000*/                   IADD3 R5, R5, 0x1, RZ ;      /* 0x0000000105057810 */
        /*0010*/                   EXIT ;                       /* 0x000000000000794d */"""
    moved = code.replace("/*0000*/", "/*0100*/").replace("0x0000000105057810", "0x00000001ffffffff")
    changed = code.replace("0x1, RZ", "0x2, RZ")
    digest = kernel_resources.sass_digest(code)
    assert len(digest) == 12 and kernel_resources.sass_digest(moved) == digest
    assert kernel_resources.sass_digest(changed) != digest
    assert kernel_resources.sass_digest("Fatbin elf code:\n" + code) == digest


def test_ptxas_serialization_notes_are_read():
    # ptxas's -v output for a kernel whose products it serialized (the fused dK/dV pass with the
    # next block's tiles in flight across the loop's back edge, compiled for sm_90a).
    log = """ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions reading accumulator registers of  a wgmma between start and end of the pipeline stage in the function '_dkdv_gluon_kernel'
ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the function '_dkdv_gluon_kernel'
ptxas info    : Used 206 registers, used 1 barriers"""
    assert kernel_resources.serialization_reasons(log) == [
        "non wgmma instructions reading accumulator registers of a wgmma between start and end of "
        "the pipeline stage", "insufficient register resources"]
    assert kernel_resources.serialization_reasons("ptxas info    : Used 236 registers") == []


def test_a_kernel_that_does_not_compile_is_named_in_one_line():
    # The Gluon dK/dV pass refuses 2 stages (it keeps the next query block in flight).
    result = run_script("--pass", "dkdv", "--head-dim", "64", "--tiles", "32,64,4,2", "--gluon")
    assert result.returncode != 0
    assert "kernel_resources: _dkdv_gluon_kernel does not compile for sm_90" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_kernel_over_the_shared_memory_limit_is_named(monkeypatch, capsys):
    # It compiles, but no sm_90 block can hold it (two K/V buffers at head dim 128: 279 KB).
    report = dict(kernel="_dkdv_ws_persistent_kernel", registers=168, stack_bytes=0,
                  shared_bytes=kernel_resources.SM90_SHARED_LIMIT + 1, sass_instructions=3000)
    monkeypatch.setattr(kernel_resources, "resources", lambda *args: report)
    kernel_resources.main(["--pass", "dkdv", "--head-dim", "128", "--tiles", "64,128,4,2", "--gluon",
                           "--fused", "--warp-specialized", "--persistent", "--kv-buffers", "2"])
    assert "would not launch" in capsys.readouterr().err
    report["shared_bytes"] = kernel_resources.SM90_SHARED_LIMIT
    kernel_resources.main(["--pass", "dkdv", "--head-dim", "64", "--tiles", "64,128,4,4", "--gluon",
                           "--fused", "--warp-specialized", "--persistent", "--kv-buffers", "2"])
    assert "would not launch" not in capsys.readouterr().err
