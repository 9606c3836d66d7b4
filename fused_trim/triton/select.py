"""Selection kernel: exact-k radix select over the per-row losses, kept mask and reduction."""

import triton
import triton.language as tl

from ._ce import to_output
from ._radix import REDUCTION_NONE, block_keys, compute_k, radix_step, sign_bit, store_results


@triton.jit
def select_kernel(
    loss_ptr,
    wy_ptr,
    target_ptr,
    kept_ptr,
    out_ptr,
    result_ptr,
    k_ptr,
    threshold_ptr,
    denom_ptr,
    num_rows,
    ignore_index,
    keep_ratio_bits,
    ratio_ptr,
    RATIO_FROM_PTR: tl.constexpr,
    KEEP_ALL: tl.constexpr,
    EASIEST: tl.constexpr,
    REDUCTION: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_OFFSET: tl.constexpr = False,
    offset_ptr=None,
):
    """One program over all rows.

    Computes ``n`` and ``k`` (float64; a host ratio arrives as its float64 bits, exact in the
    compiler and the interpreter alike), finds the k-th key ``T`` in 8-bit digit passes (masked
    ``tl.histogram`` + ``tl.cumsum``), keeps ``key > T`` plus the first ``k - #(key > T)`` rows with
    ``key == T`` in index order, and writes: ``kept``, ``out`` (per-row loss on K, 0 elsewhere;
    only for ``REDUCTION_NONE``), ``result`` (the mean or the sum), ``k``, the
    threshold loss and ``denom`` (the divisor of the mean; 1 otherwise) for the backward.
    ``HAS_OFFSET``: the keys rank ``loss - offset`` (a score offset, read with each loss; the
    threshold is then the k-th score); the sums are still of the plain losses.
    Padding lanes are never valid: ``other=ignore_index`` would wrap for a narrow target dtype.
    """
    IS_FP64: tl.constexpr = loss_ptr.dtype.element_ty == tl.float64
    NBITS: tl.constexpr = 64 if IS_FP64 else 32
    key_dtype: tl.constexpr = tl.int64 if IS_FP64 else tl.int32
    acc_dtype: tl.constexpr = loss_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)

    n = tl.zeros((), tl.int64)
    for start in range(0, num_rows, BLOCK):
        idx = start + offs
        in_range = idx < num_rows
        tgt = tl.load(target_ptr + idx, mask=in_range, other=0)
        n += tl.sum((in_range & (tgt != ignore_index)).to(tl.int64), 0)
    k = compute_k(n, keep_ratio_bits, ratio_ptr, RATIO_FROM_PTR)

    max_key: tl.constexpr = 0x7FFFFFFFFFFFFFFF if IS_FP64 else 0x7FFFFFFF
    if KEEP_ALL:
        # k == n: every valid row is kept; the threshold is the smallest key among them.
        krem = k
        kth = tl.full((), max_key, key_dtype)
        for start in range(0, num_rows, BLOCK):
            _, _, valid, _, key = block_keys(
                start, loss_ptr, target_ptr, num_rows, ignore_index, EASIEST, BLOCK, HAS_OFFSET, offset_ptr
            )
            kth = tl.minimum(kth, tl.min(tl.where(valid, key, max_key), 0))
    else:
        sign = sign_bit(IS_FP64)
        prefix = tl.zeros((), key_dtype)  # in unsigned-flipped space: u = key ^ sign
        prefix_mask = tl.zeros((), key_dtype)
        krem = k
        for p in tl.static_range(NBITS // 8):
            shift = NBITS - 8 * (p + 1)
            hist = tl.zeros((256,), tl.int32)
            for start in range(0, num_rows, BLOCK):
                _, _, valid, _, key = block_keys(
                    start, loss_ptr, target_ptr, num_rows, ignore_index, EASIEST, BLOCK, HAS_OFFSET, offset_ptr
                )
                u = key ^ sign
                match = valid & ((u & prefix_mask) == prefix)
                digit = ((u >> shift) & 255).to(tl.int32)
                hist += tl.histogram(digit, 256, mask=match)
            krem, prefix, prefix_mask = radix_step(hist, krem, prefix, prefix_mask, shift, key_dtype)
        kth = prefix ^ sign

    # Final pass: keep key > kth, and the first krem rows with key == kth in index order.
    ties_before = tl.zeros((), tl.int64)
    sum_loss = tl.zeros((), acc_dtype)
    sum_w = tl.zeros((), acc_dtype)
    for start in range(0, num_rows, BLOCK):
        idx, in_range, valid, loss, key = block_keys(
            start, loss_ptr, target_ptr, num_rows, ignore_index, EASIEST, BLOCK, HAS_OFFSET, offset_ptr
        )
        tie = valid & (key == kth)
        tie_i = tie.to(tl.int64)
        tie_rank = ties_before + tl.cumsum(tie_i, 0) - tie_i
        if KEEP_ALL:
            kept = valid
        else:
            kept = (valid & (key > kth)) | (tie & (tie_rank < krem))
        ties_before += tl.sum(tie_i, 0)
        wy = tl.load(wy_ptr + idx, mask=kept, other=0.0)
        kept_loss = tl.where(kept, loss, 0.0)
        sum_loss += tl.sum(kept_loss, 0)
        sum_w += tl.sum(tl.where(kept, wy, 0.0), 0)
        tl.store(kept_ptr + idx, kept, mask=in_range)
        if REDUCTION == REDUCTION_NONE:
            tl.store(out_ptr + idx, to_output(kept_loss, out_ptr.dtype.element_ty), mask=in_range)

    store_results(sum_loss, sum_w, k, kth, result_ptr, denom_ptr, k_ptr, threshold_ptr, EASIEST, REDUCTION)
