"""Device functions shared by the selection kernels (not kernels themselves)."""

import triton
import triton.language as tl

from .._common import Reduction
from ._ce import to_output

# The REDUCTION constexpr of the select kernels: fused_trim._common.Reduction's values.
REDUCTION_NONE = tl.constexpr(int(Reduction.NONE))
REDUCTION_MEAN = tl.constexpr(int(Reduction.MEAN))
REDUCTION_SUM = tl.constexpr(int(Reduction.SUM))


@triton.jit
def ordered_key(loss, valid, EASIEST: tl.constexpr, IS_FP64: tl.constexpr):
    """Signed integer key whose order is the ranking order (larger key = kept first).

    Float bits ``b`` map to ``b ^ ((b >> sign) & max)``, monotone in the float value; ``-0.0`` maps
    to ``+0.0``'s key (one value, ties by index, as ``torch.sort`` and the native key rank them); NaN
    gets the largest key (NaN ranks above +inf); ``keep="easiest"`` reverses the order with
    ``-1 - key``. The one key of every Triton select (single program and grid).
    """
    if IS_FP64:
        b = loss.to(tl.int64, bitcast=True)
        b = tl.where(b == -9223372036854775808, 0, b)  # -0.0 -> +0.0
        key = b ^ ((b >> 63) & 0x7FFFFFFFFFFFFFFF)
        key = tl.where(loss != loss, 0x7FFFFFFFFFFFFFFF, key)
    else:
        b = loss.to(tl.int32, bitcast=True)
        b = tl.where(b == -2147483648, 0, b)  # -0.0 -> +0.0
        key = b ^ ((b >> 31) & 0x7FFFFFFF)
        key = tl.where(loss != loss, 0x7FFFFFFF, key)
    if EASIEST:
        key = -1 - key
    return tl.where(valid, key, 0)


@triton.jit
def ranked_value(loss, offset_ptr, idx, valid, HAS_OFFSET: tl.constexpr):
    """What the selection ranks: ``loss``, or with a score offset ``loss - offset[idx]``, the offset
    (any float dtype) converted to the loss's (accumulation) dtype first. Read where the loss is."""
    if HAS_OFFSET:
        offset = tl.load(offset_ptr + idx, mask=valid, other=0.0).to(loss.dtype)
        return loss - offset
    else:
        return loss


@triton.jit
def block_keys(
    start,
    loss_ptr,
    target_ptr,
    num_rows,
    ignore_index,
    EASIEST: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    offset_ptr,
):
    """Rows ``[start, start + BLOCK)`` as every select pass reads them: ``(idx, in_range, valid,
    loss, key)``, the key of ``loss - offset`` with ``HAS_OFFSET`` (a score offset). Padding lanes
    are never valid (``other=ignore_index`` would wrap for a narrow target dtype)."""
    IS_FP64: tl.constexpr = loss_ptr.dtype.element_ty == tl.float64
    idx = start + tl.arange(0, BLOCK)
    in_range = idx < num_rows
    tgt = tl.load(target_ptr + idx, mask=in_range, other=0)
    valid = in_range & (tgt != ignore_index)
    loss = tl.load(loss_ptr + idx, mask=valid, other=0.0)
    score = ranked_value(loss, offset_ptr, idx, valid, HAS_OFFSET)
    return idx, in_range, valid, loss, ordered_key(score, valid, EASIEST, IS_FP64)


@triton.jit
def sign_bit(IS_FP64: tl.constexpr):
    """The key's sign bit: ``key ^ sign_bit`` orders the keys as unsigned bit patterns."""
    if IS_FP64:
        return tl.full((), -9223372036854775808, tl.int64)
    else:
        return tl.full((), -2147483648, tl.int32)


@triton.jit
def compute_k(n, keep_ratio_bits, ratio_ptr, RATIO_FROM_PTR: tl.constexpr):
    """``k = min(n, max(1, floor(r n + 0.5)))`` in float64 (``0`` when ``n == 0``).

    The ratio is a host float passed as its float64 bits (exact in compiler and interpreter), or a
    0-dim tensor: floating (a ratio) or int64 (an exact count, a rank's share of a global k).
    """
    if RATIO_FROM_PTR and ratio_ptr.dtype.element_ty == tl.int64:
        k = tl.minimum(tl.load(ratio_ptr), n)
    else:
        if RATIO_FROM_PTR:
            r = tl.load(ratio_ptr).to(tl.float64)
        else:
            r = keep_ratio_bits.to(tl.int64).to(tl.float64, bitcast=True)
        k = tl.floor(r * n.to(tl.float64) + 0.5)
        k = tl.minimum(tl.maximum(k, 1.0), n.to(tl.float64)).to(tl.int64)
    return k


@triton.jit
def radix_step(hist, krem, prefix, prefix_mask, shift, key_dtype: tl.constexpr):
    """One 8-bit digit of the k-th largest key from the digit histogram of the current prefix.

    Returns the updated ``(krem, prefix, prefix_mask)``: ``krem`` is the rank still to find among
    keys that share the new prefix. Counts are summed in int64 (exact past 2^31 rows).
    """
    hist = hist.to(tl.int64)
    digits = tl.arange(0, 256)
    cum = tl.cumsum(hist, 0)
    total = tl.sum(hist, 0)
    at_or_above = total - cum + hist
    d = tl.max(tl.where(at_or_above >= krem, digits, -1), 0)
    d = tl.maximum(d, 0)  # k == 0 (no valid row): any prefix will do
    above = total - tl.sum(tl.where(digits == d, cum, 0), 0)
    krem = krem - above
    prefix = prefix | (d.to(key_dtype) << shift)
    prefix_mask = prefix_mask | (tl.full((), 255, key_dtype) << shift)
    return krem, prefix, prefix_mask


@triton.jit
def key_to_float(kth, EASIEST: tl.constexpr, IS_FP64: tl.constexpr):
    """The loss (or score) whose key is ``kth`` (the key map is an involution)."""
    if EASIEST:
        kth = -1 - kth
    if IS_FP64:
        bits = kth ^ ((kth >> 63) & 0x7FFFFFFFFFFFFFFF)
        return bits.to(tl.float64, bitcast=True)
    else:
        bits = kth ^ ((kth >> 31) & 0x7FFFFFFF)
        return bits.to(tl.float32, bitcast=True)


@triton.jit
def store_results(
    sum_loss,
    sum_w,
    k,
    kth,
    result_ptr,
    denom_ptr,
    k_ptr,
    threshold_ptr,
    EASIEST: tl.constexpr,
    REDUCTION: tl.constexpr,
):
    """Write the reduced loss (the mean or the sum; "none" writes none), the backward's divisor
    ``denom`` (the kept weight for the mean, else 1), ``k`` and the threshold: the k-th ranked
    loss, or score with an offset (NaN if k == 0)."""
    acc_dtype: tl.constexpr = denom_ptr.dtype.element_ty
    if REDUCTION == REDUCTION_MEAN:
        result = sum_loss / sum_w
        denom = sum_w
    else:
        result = sum_loss
        denom = tl.full((), 1.0, acc_dtype)
    if REDUCTION != REDUCTION_NONE:
        tl.store(result_ptr, to_output(result, result_ptr.dtype.element_ty))
    tl.store(denom_ptr, denom)
    tl.store(k_ptr, k)
    thr = key_to_float(kth, EASIEST, acc_dtype == tl.float64)
    thr = tl.where(k > 0, thr, float("nan"))
    tl.store(threshold_ptr, to_output(thr, threshold_ptr.dtype.element_ty))
