"""P from shared memory in the Gluon forwards (``Tiles(..., p_shared=True)``): the option's
validation, and, compiled for sm_90 on the CPU, that the softmax step then runs under the P.V
product (with P in registers ptxas waits for P.V first). Results on the GPU:
test_gpu_p_shared.py."""

import pytest

from kernels._launch import Tiles

from .test_gluon_backward import compiled_for_sm90


def test_p_shared_is_an_option_of_the_gluon_forwards():
    assert Tiles(64, 64, 4, 3, gluon=True, p_shared=True).p_shared
    assert Tiles(128, 64, 4, 3, gluon=True, pingpong=True, p_shared=True).p_shared
    for bad in (dict(gluon=False), dict(gluon=True, fused=True), dict(tma=True)):
        with pytest.raises(ValueError, match="p_shared"):
            Tiles(64, 64, 4, 3, p_shared=True, **bad)


@pytest.mark.parametrize("kernel, head_dim, block_m, block_n, stages, warps, dropout", [
    ("forward", 128, 64, 64, 3, 4, True), ("forward", 128, 64, 64, 3, 4, False),
    ("pingpong", 128, 128, 64, 3, 4, False)])
def test_with_p_shared_the_softmax_step_runs_under_p_v(kernel, head_dim, block_m, block_n,
                                                        stages, warps, dropout):
    # Causal: the unmasked loop and the diagonal blocks' loop (the ping-pong kernel: each per
    # consumer). Every exponential of the step (64 x 64 scores over 128 threads: 32, and the
    # rescale's) lies between the wait for S and the wait for P.V; with P in registers none do.
    mask_layout = "untransposed" if dropout else None
    shared = compiled_for_sm90(f"{kernel}_p_shared", head_dim, block_m, block_n, stages, warps, 1,
                               mask_layout)
    registers = compiled_for_sm90(kernel, head_dim, block_m, block_n, stages, warps, 1,
                                  mask_layout)
    assert shared["exponentials_under_pv"] and min(shared["exponentials_under_pv"]) >= 33
    assert max(registers["exponentials_under_pv"]) <= 2
    assert shared["serialized"] == [] and shared["loop_spills"].strip("0,") == ""
