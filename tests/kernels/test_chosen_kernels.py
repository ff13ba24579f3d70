"""kernels._chosen.chosen_kernels names the kernels a call runs, as benchmark records store them:
the portable kernels where no Hopper kernel takes the call, the Hopper kernel the default tiles
choose where one does, and the portable kernel again once that one fell back."""

import torch

from kernels import _backward, _chosen, _forward, _hopper
from kernels._launch import Tiles

PORTABLE = {"forward": "_forward_kernel", "dq": "_dq_kernel", "dkdv": "_dkdv_kernel"}


def test_portable_kernels_where_no_hopper_kernel_takes_the_call(device):
    q = torch.randn(2, 128, 2, 64, device=device)
    assert _chosen.chosen_kernels(q, q, q, torch.randn_like(q)) == PORTABLE
    assert _chosen.chosen_kernels(q, q, q, torch.randn_like(q), causal=True, dropout_p=0.1,
                                  window=(16, 0)) == PORTABLE


def test_the_hopper_kernels_the_default_tiles_choose_until_they_fall_back(device, monkeypatch):
    # (The interpreter has no Gluon: the device check is the GPU tests'.)
    monkeypatch.setattr(_hopper, "gluon_device", lambda tensors, varlen: not varlen)
    monkeypatch.setattr(_forward, "multiprocessors", lambda device: 132)
    monkeypatch.setattr(_backward, "multiprocessors", lambda device: 132)
    monkeypatch.setattr(_forward, "default_tiles",
                        lambda *args: Tiles(128, 64, 4, 3, gluon=True, pingpong=True))
    in_a_persistent_grid = Tiles(64, 128, 4, 2, gluon=True, fused=True, warp_specialized=True,
                                 persistent=True)
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, hopper=True, **kwargs:
                        in_a_persistent_grid if hopper else Tiles(32, 64, 1, 1))
    q = torch.randn(2, 256, 2, 64, device=device)
    chosen = _chosen.chosen_kernels(q, q, q, torch.randn_like(q))
    # The fused pass's δ comes from the portable dQ kernel in its delta-only mode.
    assert chosen == {"forward": "_forward_pingpong_kernel", "dq": "_dq_kernel",
                      "dkdv": "_dkdv_ws_persistent_kernel"}
    heads_first = torch.randn(2, 2, 256, 64, device=device).transpose(1, 2)
    assert _chosen.chosen_kernels(q, q, q, heads_first)["dkdv"] == "_dkdv_warp_specialized_kernel"
    two_buffers = Tiles(64, 128, 4, 4, gluon=True, fused=True, warp_specialized=True,
                        persistent=True, kv_buffers=2)
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, hopper=True, **kwargs:
                        two_buffers if hopper else Tiles(32, 64, 1, 1))
    assert (_chosen.chosen_kernels(q, q, q, torch.randn_like(q))["dkdv"]
            == "_dkdv_ws_persistent_kernel (KV_BUFFERS=2)")
    monkeypatch.setattr(_hopper, "fell_back", lambda launcher, options: True)
    assert _chosen.chosen_kernels(q, q, q, torch.randn_like(q)) == PORTABLE
