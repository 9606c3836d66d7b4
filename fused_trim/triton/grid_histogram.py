"""Grid select, step 1 (per digit): each program adds its rows' digit histogram to a global one."""

import triton
import triton.language as tl

from ._radix import ordered_key, sign_bit


@triton.jit
def grid_histogram_kernel(
    loss_ptr,
    target_ptr,
    state_ptr,
    hist_ptr,
    num_rows,
    ignore_index,
    SHIFT: tl.constexpr,
    HARDEST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Rows ``[pid * BLOCK, (pid + 1) * BLOCK)``: histogram of digit ``(u >> SHIFT) & 255`` over the
    valid rows whose key matches the prefix found so far (``state[0]``, under mask ``state[1]``).
    Integer atomics: the result does not depend on the programs' order."""
    IS_FP64: tl.constexpr = loss_ptr.dtype.element_ty == tl.float64
    key_dtype: tl.constexpr = tl.int64 if IS_FP64 else tl.int32
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tgt = tl.load(target_ptr + idx, mask=idx < num_rows, other=ignore_index)
    valid = tgt != ignore_index
    loss = tl.load(loss_ptr + idx, mask=valid, other=0.0)
    u = ordered_key(loss, valid, HARDEST, IS_FP64) ^ sign_bit(IS_FP64)
    prefix = tl.load(state_ptr).to(key_dtype)
    prefix_mask = tl.load(state_ptr + 1).to(key_dtype)
    match = valid & ((u & prefix_mask) == prefix)
    digit = ((u >> SHIFT) & 255).to(tl.int32)
    hist = tl.histogram(digit, 256, mask=match)
    tl.atomic_add(hist_ptr + tl.arange(0, 256), hist, sem="relaxed")
