"""Device functions shared by the row kernels (``ce_forward``/``ce_backward``) and the spatial ones
(``ce_forward_spatial``/``ce_backward_spatial``): the loss formula and the gradient's coefficients,
written once for a scalar row or a block of pixels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pixel_block(num_pixels, BLOCK_S: tl.constexpr):
    """This program's pixels in the spatial layout (a flat grid, image ``n`` major):
    ``(n, s, in_image, flat)`` with ``flat = n * S + s``, the sample index, in int64 (``N * S``
    may pass 2^31)."""
    pid = tl.program_id(0)
    blocks_per_image = tl.cdiv(num_pixels, BLOCK_S)
    n = (pid // blocks_per_image).to(tl.int64)
    s = (pid % blocks_per_image) * BLOCK_S + tl.arange(0, BLOCK_S)
    return n, s, s < num_pixels, n * num_pixels + s


@triton.jit
def smoothing_eps(label_smoothing_bits):
    """The label smoothing ``eps``, passed as its float64 bits (the interpreter would round a
    Python float to fp32), as fp64."""
    return label_smoothing_bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def weighted_loss(lse, x_t, w_t, sum_w, sum_wx, eps, num_classes, HAS_SMOOTHING: tl.constexpr):
    """``F.cross_entropy``'s per-sample loss from the logsumexp: ``w_t * (lse - x_t)``, with label
    smoothing mixed with ``eps / C * (lse * sum_w - sum_wx)`` (``sum_w``: the class weights' sum,
    or ``C``; ``sum_wx = sum_c w_c x_c``)."""
    loss = w_t * (lse - x_t)
    if HAS_SMOOTHING:
        loss = (1.0 - eps) * loss + (eps / num_classes) * (lse * sum_w - sum_wx)
    return loss


@triton.jit
def grad_coefs(w_t, eps, weight_sum_ptr, num_classes, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """``(true_coef, p_coef)`` of ``dl/dx_c = p_coef * p_c - [c == y] * true_coef - eps / C * w_c``
    (the last term only with label smoothing), in ``w_t``'s dtype."""
    true_coef = (1.0 - eps) * w_t
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            sum_w = tl.load(weight_sum_ptr).to(w_t.dtype)
        else:
            sum_w = tl.cast(num_classes, w_t.dtype)
        p_coef = true_coef + eps / num_classes * sum_w
    else:
        p_coef = true_coef
    return true_coef, p_coef
