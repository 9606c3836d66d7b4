"""Forward kernel on the spatial layout ``(N, C, S)``: per-pixel cross-entropy and logsumexp,
read in place with the loads contiguous along the pixels."""

from __future__ import annotations

import triton
import triton.language as tl

from ._ce import pixel_block, smoothing_eps, weighted_loss


@triton.jit
def ce_forward_spatial_kernel(
    logits_ptr,
    stride_n,
    stride_c,
    target_ptr,
    weight_ptr,
    loss_ptr,
    lse_ptr,
    wy_ptr,
    num_classes,
    num_pixels,
    ignore_index,
    label_smoothing_bits,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program per ``(n, block of BLOCK_S pixels)``; a flat grid, ``n`` major.

    The logits of image ``n`` are ``logits[n * stride_n + c * stride_c + s]`` (unit stride along
    ``s``). An online softmax over class blocks of ``BLOCK_C`` runs on ``[BLOCK_C, BLOCK_S]``
    tiles, one running max and sum per pixel. Writes ``loss``, ``lse`` and ``wy`` (the target's
    class weight; 0 when ignored) at the sample index ``n * S + s``, exactly as
    :func:`ce_forward_kernel` does per row, in the accumulation dtype of ``loss_ptr``. Ignored
    pixels do not read their logits.
    """
    acc_dtype = loss_ptr.dtype.element_ty
    n, s, in_image, flat = pixel_block(num_pixels, BLOCK_S)
    tgt = tl.load(target_ptr + flat, mask=in_image, other=ignore_index).to(tl.int64)
    valid = in_image & (tgt != ignore_index)
    safe_t = tl.where(valid, tgt, 0)

    image_ptr = logits_ptr + n * stride_n
    m = tl.full((BLOCK_S,), float("-inf"), acc_dtype)
    sum_exp = tl.zeros((BLOCK_S,), acc_dtype)
    x_t = tl.zeros((BLOCK_S,), acc_dtype)  # the target's logit, picked up as its block passes
    sum_wx = tl.zeros((BLOCK_S,), acc_dtype)  # sum_c w_c x_c, for label smoothing
    sum_w = tl.zeros((), acc_dtype)
    for start in range(0, num_classes, BLOCK_C):
        cls = start + tl.arange(0, BLOCK_C)
        cls_in = cls < num_classes
        tile = cls_in[:, None] & valid[None, :]
        ptrs = image_ptr + cls.to(tl.int64)[:, None] * stride_c + s[None, :]
        x = tl.load(ptrs, mask=tile, other=float("-inf")).to(acc_dtype)
        m_new = tl.maximum(m, tl.max(x, 0), propagate_nan=tl.PropagateNan.ALL)
        # A block (or class prefix) of only -inf leaves m at -inf: shift by 0 instead of -inf - -inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        sum_exp = sum_exp * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[None, :]), 0)
        m = m_new
        x_t += tl.sum(tl.where(cls[:, None] == safe_t[None, :], x, 0.0), 0)
        if HAS_SMOOTHING:
            xs = tl.where(tile, x, 0.0)
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cls, mask=cls_in, other=0.0).to(acc_dtype)
                sum_wx += tl.sum(w[:, None] * xs, 0)
                sum_w += tl.sum(w, 0)
            else:
                sum_wx += tl.sum(xs, 0)
    lse = tl.where(m == float("-inf"), m, m + tl.log(sum_exp))

    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + safe_t, mask=valid, other=0.0).to(acc_dtype)
    else:
        w_t = tl.full((BLOCK_S,), 1.0, acc_dtype)
    if HAS_SMOOTHING and not HAS_WEIGHT:
        sum_w = tl.cast(num_classes, acc_dtype)
    eps = smoothing_eps(label_smoothing_bits).to(acc_dtype)
    loss = weighted_loss(lse, x_t, w_t, sum_w, sum_wx, eps, num_classes, HAS_SMOOTHING)
    zero = tl.zeros((BLOCK_S,), acc_dtype)
    tl.store(loss_ptr + flat, tl.where(valid, loss, zero), mask=in_image)
    tl.store(lse_ptr + flat, tl.where(valid, lse, zero), mask=in_image)
    tl.store(wy_ptr + flat, tl.where(valid, w_t, zero), mask=in_image)
