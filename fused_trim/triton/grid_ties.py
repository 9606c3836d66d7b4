"""Grid select, step 3: each program counts its rows tied at the k-th key."""

import triton
import triton.language as tl

from ._radix import ordered_key, sign_bit


@triton.jit
def grid_ties_kernel(
    loss_ptr,
    target_ptr,
    state_ptr,
    ties_ptr,
    num_rows,
    ignore_index,
    HARDEST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``ties[pid]`` = number of valid rows of block ``pid`` whose key equals the k-th key."""
    IS_FP64: tl.constexpr = loss_ptr.dtype.element_ty == tl.float64
    key_dtype: tl.constexpr = tl.int64 if IS_FP64 else tl.int32
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tgt = tl.load(target_ptr + idx, mask=idx < num_rows, other=ignore_index)
    valid = tgt != ignore_index
    loss = tl.load(loss_ptr + idx, mask=valid, other=0.0)
    kth = tl.load(state_ptr).to(key_dtype) ^ sign_bit(IS_FP64)
    tie = valid & (ordered_key(loss, valid, HARDEST, IS_FP64) == kth)
    tl.store(ties_ptr + pid, tl.sum(tie.to(tl.int64), 0))
