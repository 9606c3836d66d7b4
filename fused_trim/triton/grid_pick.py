"""Grid select, step 2 (per digit): one program picks the digit of the k-th key."""

import triton
import triton.language as tl

from ._radix import compute_k, radix_step


@triton.jit
def grid_pick_kernel(
    state_ptr,
    hist_ptr,
    keep_ratio_bits,
    ratio_ptr,
    SHIFT: tl.constexpr,
    FIRST: tl.constexpr,
    IS_FP64: tl.constexpr,
    RATIO_FROM_PTR: tl.constexpr,
):
    """``state`` (int64): ``[prefix, prefix_mask, krem, k, n]``. The first digit's histogram covers
    every valid row, so its total is ``n``, from which ``k`` follows. Clears the histogram for the
    next digit."""
    key_dtype: tl.constexpr = tl.int64 if IS_FP64 else tl.int32
    bins = tl.arange(0, 256)
    hist = tl.load(hist_ptr + bins)
    if FIRST:
        n = tl.sum(hist.to(tl.int64), 0)
        k = compute_k(n, keep_ratio_bits, ratio_ptr, RATIO_FROM_PTR)
        tl.store(state_ptr + 3, k)
        tl.store(state_ptr + 4, n)
        krem = k
        prefix = tl.zeros((), key_dtype)
        prefix_mask = tl.zeros((), key_dtype)
    else:
        krem = tl.load(state_ptr + 2)
        prefix = tl.load(state_ptr).to(key_dtype)
        prefix_mask = tl.load(state_ptr + 1).to(key_dtype)
    krem, prefix, prefix_mask = radix_step(hist, krem, prefix, prefix_mask, SHIFT, key_dtype)
    tl.store(state_ptr, prefix.to(tl.int64))
    tl.store(state_ptr + 1, prefix_mask.to(tl.int64))
    tl.store(state_ptr + 2, krem)
    tl.store(hist_ptr + bins, tl.zeros((256,), tl.int32))
