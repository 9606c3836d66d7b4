"""Forward kernel on the spatial layout ``(N, C, S)``: per-pixel cross-entropy, max and log-sum-exp,
read in place with the loads contiguous along the pixels."""

from __future__ import annotations

import triton
import triton.language as tl

from ._ce import float_arg, log_sum, pixel_block, smoothing_block, softcap, softmax_block, weighted_loss


@triton.jit
def ce_forward_spatial_kernel(
    logits_ptr,
    stride_n,
    stride_c,
    target_ptr,
    weight_ptr,
    loss_ptr,
    stats_ptr,
    stats_stride,
    wy_ptr,
    num_classes,
    num_pixels,
    ignore_index,
    label_smoothing_bits,
    softcap_bits,
    z_loss_bits,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_CAP: tl.constexpr = False,
    HAS_Z: tl.constexpr = False,
):
    """One program per ``(n, block of BLOCK_S pixels)``; a flat grid, ``n`` major.

    The logits of image ``n`` are ``logits[n * stride_n + c * stride_c + s]`` (unit stride along
    ``s``). An online softmax over class blocks of ``BLOCK_C`` runs on ``[BLOCK_C, BLOCK_S]``
    tiles, one running max and sum per pixel. Writes ``loss``, ``wy`` (the target's class weight;
    0 when ignored) and the backward's ``stats`` (max, log-sum) at the sample index ``n * S + s``,
    exactly as :func:`ce_forward_kernel` does per row, in the accumulation dtype of ``loss_ptr``.
    Ignored pixels do not read their logits, nor do targets outside ``[0, C)`` (NaN loss and stats).
    ``HAS_CAP`` / ``HAS_Z``: the soft cap and the z term, as :func:`ce_forward_kernel` forms them.
    """
    acc_dtype = loss_ptr.dtype.element_ty
    n, s, in_image, flat = pixel_block(num_pixels, BLOCK_S)
    tgt = tl.load(target_ptr + flat, mask=in_image, other=ignore_index).to(tl.int64)
    valid = in_image & (tgt != ignore_index)
    # A target outside [0, C) that is not ignore_index is never read through: its loss is NaN.
    scored = valid & (tgt >= 0) & (tgt < num_classes)
    safe_t = tl.where(scored, tgt, 0)

    image_ptr = logits_ptr + n * stride_n
    cap = float_arg(softcap_bits).to(acc_dtype)
    m = tl.full((BLOCK_S,), float("-inf"), acc_dtype)
    sm1 = tl.full((BLOCK_S,), -1.0, acc_dtype)  # sum_c exp(x_c - m) - 1
    x_t = tl.zeros((BLOCK_S,), acc_dtype)  # the target's logit, picked up as its block passes
    d = tl.zeros((BLOCK_S,), acc_dtype)  # sum_c w_c (m - x_c), for label smoothing
    sum_w = tl.zeros((BLOCK_S,), acc_dtype)
    for start in range(0, num_classes, BLOCK_C):
        cls = start + tl.arange(0, BLOCK_C)
        cls_in = cls < num_classes
        tile = cls_in[:, None] & scored[None, :]
        ptrs = image_ptr + cls.to(tl.int64)[:, None] * stride_c + s[None, :]
        x = tl.load(ptrs, mask=tile, other=float("-inf")).to(acc_dtype)
        if HAS_CAP:
            capped, _ = softcap(x, cap)
            x = tl.where(tile, capped, float("-inf"))
        m_new, sm1 = softmax_block(m, sm1, x)
        x_t += tl.sum(tl.where(cls[:, None] == safe_t[None, :], x, 0.0), 0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cls, mask=cls_in, other=0.0).to(acc_dtype)
            else:
                w = tl.full((BLOCK_C,), 1.0, acc_dtype)
            d, sum_w = smoothing_block(d, sum_w, m, m_new, x, w[:, None], tile)
        m = m_new
    log_s = log_sum(m, sm1)

    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + safe_t, mask=scored, other=0.0).to(acc_dtype)
    else:
        w_t = tl.full((BLOCK_S,), 1.0, acc_dtype)
    eps = float_arg(label_smoothing_bits).to(acc_dtype)
    z_loss = float_arg(z_loss_bits).to(acc_dtype)
    loss = weighted_loss(m, log_s, x_t, w_t, sum_w, d, eps, num_classes, z_loss, HAS_SMOOTHING, HAS_Z)
    zero = tl.zeros((BLOCK_S,), acc_dtype)
    unscored = tl.where(valid, float("nan"), zero)  # NaN for a target outside [0, C), else 0
    tl.store(loss_ptr + flat, tl.where(scored, loss, unscored), mask=in_image)
    tl.store(stats_ptr + flat, tl.where(scored, m, unscored), mask=in_image)
    tl.store(stats_ptr + stats_stride + flat, tl.where(scored, log_s, unscored), mask=in_image)
    tl.store(wy_ptr + flat, tl.where(scored, w_t, zero), mask=in_image)
