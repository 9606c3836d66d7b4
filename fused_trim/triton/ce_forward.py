"""Forward kernel: per-row cross-entropy and logsumexp in one read of the logits."""

from __future__ import annotations

import triton
import triton.language as tl

from ._ce import smoothing_eps, weighted_loss


@triton.jit
def ce_forward_kernel(
    logits_ptr,
    stride_row,
    target_ptr,
    weight_ptr,
    loss_ptr,
    lse_ptr,
    wy_ptr,
    num_classes,
    ignore_index,
    label_smoothing_bits,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program per row: online softmax over column blocks of ``BLOCK_C``.

    Writes ``loss[row]``, ``lse[row]`` and ``wy[row]`` (the target's class weight; 0 when ignored)
    in the accumulation dtype of ``loss_ptr`` (fp32, or fp64 for fp64 logits). Ignored rows do not
    read their logits.
    """
    row = tl.program_id(0).to(tl.int64)
    acc_dtype = loss_ptr.dtype.element_ty
    row_ptr = logits_ptr + row * stride_row
    tgt = tl.load(target_ptr + row).to(tl.int64)
    valid = tgt != ignore_index
    n_cols = tl.where(valid, num_classes, 0)

    m = tl.full((), float("-inf"), acc_dtype)
    s = tl.zeros((), acc_dtype)
    sum_wx = tl.zeros((), acc_dtype)  # sum_c w_c x_c, for label smoothing
    sum_w = tl.zeros((), acc_dtype)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(acc_dtype)
        m_new = tl.maximum(m, tl.max(x, 0), propagate_nan=tl.PropagateNan.ALL)
        # A block (or row prefix) of only -inf leaves m at -inf: shift by 0 instead of -inf - -inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
        m = m_new
        if HAS_SMOOTHING:
            xs = tl.where(mask, x, 0.0)
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(acc_dtype)
                sum_wx += tl.sum(w * xs, 0)
                sum_w += tl.sum(w, 0)
            else:
                sum_wx += tl.sum(xs, 0)
    lse = tl.where(m == float("-inf"), m, m + tl.log(s))

    safe_t = tl.where(valid, tgt, 0)
    x_t = tl.load(row_ptr + safe_t, mask=valid, other=0.0).to(acc_dtype)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + safe_t, mask=valid, other=0.0).to(acc_dtype)
    else:
        w_t = tl.full((), 1.0, acc_dtype)
    if HAS_SMOOTHING and not HAS_WEIGHT:
        sum_w = tl.cast(num_classes, acc_dtype)
    eps = smoothing_eps(label_smoothing_bits).to(acc_dtype)
    loss = weighted_loss(lse, x_t, w_t, sum_w, sum_wx, eps, num_classes, HAS_SMOOTHING)
    zero = tl.zeros((), acc_dtype)
    tl.store(loss_ptr + row, tl.where(valid, loss, zero))
    tl.store(lse_ptr + row, tl.where(valid, lse, zero))
    tl.store(wy_ptr + row, tl.where(valid, w_t, zero))
