"""Grid select, step 6: one program sums the partial sums in a fixed order and writes the results."""

import triton
import triton.language as tl

from ._radix import sign_bit, store_results


@triton.jit
def grid_finish_kernel(
    partial_ptr,
    state_ptr,
    result_ptr,
    k_ptr,
    threshold_ptr,
    denom_ptr,
    num_blocks,
    HARDEST: tl.constexpr,
    REDUCTION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The mean or sum, ``k``, the threshold loss and the backward's divisor."""
    acc_dtype: tl.constexpr = partial_ptr.dtype.element_ty
    IS_FP64: tl.constexpr = acc_dtype == tl.float64
    key_dtype: tl.constexpr = tl.int64 if IS_FP64 else tl.int32
    sum_loss = tl.zeros((), acc_dtype)
    sum_w = tl.zeros((), acc_dtype)
    for start in range(0, num_blocks, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < num_blocks
        sum_loss += tl.sum(tl.load(partial_ptr + idx, mask=mask, other=0.0), 0)
        sum_w += tl.sum(tl.load(partial_ptr + num_blocks + idx, mask=mask, other=0.0), 0)
    kth = tl.load(state_ptr).to(key_dtype) ^ sign_bit(IS_FP64)
    k = tl.load(state_ptr + 3)
    store_results(sum_loss, sum_w, k, kth, result_ptr, denom_ptr, k_ptr, threshold_ptr, HARDEST, REDUCTION)
