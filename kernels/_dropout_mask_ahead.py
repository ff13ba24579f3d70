"""The dropout keep-mask of the warp-specialized dK/dV pass drawn a query block ahead by each
consumer, under its own matrix products (``_dkdv_warp_specialized.py``, MASK_AHEAD).

Why: each consumer draws its 64 x 64 tile of the keep-mask per query block (two Philox counters
per thread, seven rounds each), and the source draws it while the block's S and dP products run.
Compiled for sm_90, ptxas moves those multiplies past the wait for the products, so at head dim
128 they lengthen every block (attention_notes v35). The PTX order is kept for a value stored to
shared memory: here a consumer draws the next block's tile between issuing the block's dK, dV (and
dQ) products and waiting for them, stores it into a 64 x 64 byte slot of its own, and loads it
after the next block's wait for S and dP. Each thread loads exactly the entries it stored (the
same layout both ways), so no barrier is needed between them.

The mask is ``_philox_gluon.keep_tile``'s: the same bits as the forward's.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ._dkdv_ws_setup import ROWS
from ._philox_gluon import keep_tile



@gluon.jit
def ahead_slots():
    """One 64 x 64 byte slot per consumer, swizzled in 4-byte groups (as the mask partition's,
    whose consumers load them in the same layout without bank conflicts)."""
    layout: gl.constexpr = gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0])
    return gl.allocate_shared_memory(gl.int8, [2, ROWS, ROWS], layout)


@gluon.jit
def draw_ahead(slot, dropout, block, col_start, N_ROUNDS: gl.constexpr, layout: gl.constexpr):
    """Query block ``block``'s keep-mask for keys from ``col_start`` into ``slot``, stored in
    ``layout`` (the score accumulator's, which ``read_ahead`` loads it in)."""
    seed, counter_base, first_pair, counters_per_row, threshold = dropout
    keep = keep_tile(seed, counter_base, first_pair + block * (ROWS // 2), counters_per_row,
                     col_start, threshold, ROWS, ROWS, N_ROUNDS, layout)
    slot.store(keep.to(gl.int8))


@gluon.jit
def read_ahead(slot, layout: gl.constexpr):
    """The keep-mask ``draw_ahead`` stored in ``slot``, in ``layout``."""
    return slot.load(layout) != 0
