"""Forward kernel: per-row cross-entropy, row max and log-sum-exp in one read of the logits."""

from __future__ import annotations

import triton
import triton.language as tl

from ._ce import float_arg, log_sum, smoothing_block, softcap, softmax_block, weighted_loss


@triton.jit
def ce_forward_kernel(
    logits_ptr,
    stride_row,
    target_ptr,
    weight_ptr,
    loss_ptr,
    stats_ptr,
    stats_stride,
    wy_ptr,
    num_classes,
    ignore_index,
    label_smoothing_bits,
    softcap_bits,
    z_loss_bits,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_CAP: tl.constexpr = False,
    HAS_Z: tl.constexpr = False,
):
    """One program per row: online softmax over column blocks of ``BLOCK_C``.

    Writes ``loss[row]``, ``wy[row]`` (the target's class weight; 0 when ignored), and for the
    backward the row max ``m`` at ``stats[row]`` and ``log s`` (``s = sum_c exp(x_c - m)``) at
    ``stats[stats_stride + row]`` (0 when ignored), in the accumulation dtype of ``loss_ptr`` (fp32,
    or fp64 for fp64 logits). The loss is formed relative to the row max (see
    :func:`._ce.weighted_loss`). Ignored rows do not read their logits; a target outside ``[0, C)``
    that is not ignored reads nothing either and gets a NaN loss and stats (a NaN gradient).

    ``HAS_CAP``: every logit is first ``c * tanh(x / c)`` (``c`` from ``softcap_bits``, its float64
    bits), the stats are those of the capped logits; ``HAS_Z``: the loss gains ``λ (m + log s)**2``
    (``λ`` from ``z_loss_bits``).
    """
    row = tl.program_id(0).to(tl.int64)
    acc_dtype = loss_ptr.dtype.element_ty
    row_ptr = logits_ptr + row * stride_row
    tgt = tl.load(target_ptr + row).to(tl.int64)
    valid = tgt != ignore_index
    # A target outside [0, C) that is not ignore_index is never read through: its loss is NaN.
    scored = valid & (tgt >= 0) & (tgt < num_classes)
    n_cols = tl.where(scored, num_classes, 0)
    cap = float_arg(softcap_bits).to(acc_dtype)

    m = tl.full((), float("-inf"), acc_dtype)
    sm1 = tl.full((), -1.0, acc_dtype)  # sum_c exp(x_c - m) - 1
    d = tl.zeros((), acc_dtype)  # sum_c w_c (m - x_c), for label smoothing
    sum_w = tl.zeros((), acc_dtype)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(acc_dtype)
        if HAS_CAP:
            capped, _ = softcap(x, cap)
            x = tl.where(mask, capped, float("-inf"))
        m_new, sm1 = softmax_block(m, sm1, x)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(acc_dtype)
            else:
                w = tl.full((BLOCK_C,), 1.0, acc_dtype)
            d, sum_w = smoothing_block(d, sum_w, m, m_new, x, w, mask)
        m = m_new
    log_s = log_sum(m, sm1)

    safe_t = tl.where(scored, tgt, 0)
    x_t = tl.load(row_ptr + safe_t, mask=scored, other=0.0).to(acc_dtype)
    if HAS_CAP:
        x_t, _ = softcap(x_t, cap)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + safe_t, mask=scored, other=0.0).to(acc_dtype)
    else:
        w_t = tl.full((), 1.0, acc_dtype)
    eps = float_arg(label_smoothing_bits).to(acc_dtype)
    z_loss = float_arg(z_loss_bits).to(acc_dtype)
    loss = weighted_loss(m, log_s, x_t, w_t, sum_w, d, eps, num_classes, z_loss, HAS_SMOOTHING, HAS_Z)
    zero = tl.zeros((), acc_dtype)
    nan = tl.full((), float("nan"), acc_dtype)
    tl.store(loss_ptr + row, tl.where(scored, loss, tl.where(valid, nan, zero)))
    tl.store(stats_ptr + row, tl.where(scored, m, tl.where(valid, nan, zero)))
    tl.store(stats_ptr + stats_stride + row, tl.where(scored, log_s, tl.where(valid, nan, zero)))
    tl.store(wy_ptr + row, tl.where(scored, w_t, zero))
