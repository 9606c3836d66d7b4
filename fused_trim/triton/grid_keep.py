"""Grid select, step 5: each program writes its rows' kept flags and its partial sums."""

import triton
import triton.language as tl

from ._radix import ordered_key, sign_bit


@triton.jit
def grid_keep_kernel(
    loss_ptr,
    wy_ptr,
    target_ptr,
    state_ptr,
    ties_before_ptr,
    kept_ptr,
    out_ptr,
    partial_ptr,
    num_rows,
    num_blocks,
    ignore_index,
    HARDEST: tl.constexpr,
    REDUCTION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Keeps ``key > T`` and the ties at ``T`` whose global tie rank is below ``krem``; writes
    ``kept``, ``out`` (for "none"), and the block's kept loss and weight sums to
    ``partial[pid]`` and ``partial[num_blocks + pid]`` (summed in a fixed order afterwards:
    the result is deterministic)."""
    IS_FP64: tl.constexpr = loss_ptr.dtype.element_ty == tl.float64
    key_dtype: tl.constexpr = tl.int64 if IS_FP64 else tl.int32
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = idx < num_rows
    tgt = tl.load(target_ptr + idx, mask=in_range, other=ignore_index)
    valid = tgt != ignore_index
    loss = tl.load(loss_ptr + idx, mask=valid, other=0.0)
    key = ordered_key(loss, valid, HARDEST, IS_FP64)
    kth = tl.load(state_ptr).to(key_dtype) ^ sign_bit(IS_FP64)
    krem = tl.load(state_ptr + 2)
    tie = valid & (key == kth)
    tie_i = tie.to(tl.int64)
    tie_rank = tl.load(ties_before_ptr + pid) + tl.cumsum(tie_i, 0) - tie_i
    kept = (valid & (key > kth)) | (tie & (tie_rank < krem))
    wy = tl.load(wy_ptr + idx, mask=kept, other=0.0)
    kept_loss = tl.where(kept, loss, 0.0)
    tl.store(kept_ptr + idx, kept, mask=in_range)
    if REDUCTION == 2:
        tl.store(out_ptr + idx, kept_loss.to(out_ptr.dtype.element_ty), mask=in_range)
    tl.store(partial_ptr + pid, tl.sum(kept_loss, 0))
    tl.store(partial_ptr + num_blocks + pid, tl.sum(tl.where(kept, wy, 0.0), 0))
