"""Backward kernel on the spatial layout ``(N, C, S)``: softmax recomputed from the saved
max and log-sum for kept pixels only, the gradient written in the same layout."""

import triton
import triton.language as tl

from ._ce import expm1_neg, float_arg, grad_coefs, pixel_block, softcap, target_grad, to_output


@triton.jit
def ce_backward_spatial_kernel(
    logits_ptr,
    stride_n,
    stride_c,
    grad_ptr,
    stride_grad_n,
    stride_grad_c,
    target_ptr,
    weight_ptr,
    weight_sum_ptr,
    stats_ptr,
    stats_stride,
    kept_ptr,
    grad_out_ptr,
    denom_ptr,
    num_classes,
    num_pixels,
    label_smoothing_bits,
    softcap_bits,
    z_loss_bits,
    PER_SAMPLE_GRAD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_CAP: tl.constexpr = False,
    HAS_Z: tl.constexpr = False,
):
    """One program per ``(n, block of BLOCK_S pixels)`` writes ``d loss / d logits[n, :, s]``.

    ``dl/dx_c = (1 - eps) w_y (p_c - [c == y]) + eps / C (sum_w p_c - w_c)``, scaled by the
    upstream gradient (``grad_out / denom`` for a scalar loss, ``grad_out[n * S + s]`` for
    "none"), as :func:`ce_backward_kernel` forms it per row (the true class from relative
    quantities). Pixels outside the kept set store exact zeros without reading their logits.
    Everything is formed in the accumulation dtype (fp32; fp64 for fp64) before the one rounding
    to the gradient's dtype. Both layouts have unit stride along ``s``. ``HAS_CAP`` / ``HAS_Z``:
    the soft cap's factor and the z term's gradient, as :func:`ce_backward_kernel` forms them.
    """
    acc_dtype = stats_ptr.dtype.element_ty
    n, s, in_image, flat = pixel_block(num_pixels, BLOCK_S)
    kept = tl.load(kept_ptr + flat, mask=in_image, other=0) != 0
    if PER_SAMPLE_GRAD:
        g = tl.load(grad_out_ptr + flat, mask=kept, other=0.0).to(acc_dtype)
    else:
        scale = tl.load(grad_out_ptr).to(acc_dtype) / tl.load(denom_ptr).to(acc_dtype)
        g = tl.full((BLOCK_S,), 0.0, acc_dtype) + scale
    tgt = tl.load(target_ptr + flat, mask=kept, other=0).to(tl.int64)
    reads_t = kept & (tgt >= 0) & (tgt < num_classes)  # (outside [0, C): NaN stats, NaN gradient)
    m = tl.load(stats_ptr + flat, mask=kept, other=0.0)
    log_s = tl.load(stats_ptr + stats_stride + flat, mask=kept, other=0.0)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + tgt, mask=reads_t, other=0.0).to(acc_dtype)
    else:
        w_t = tl.full((BLOCK_S,), 1.0, acc_dtype)
    eps = float_arg(label_smoothing_bits).to(acc_dtype)
    z_loss = float_arg(z_loss_bits).to(acc_dtype)
    true_coef, p_coef = grad_coefs(
        w_t, eps, weight_sum_ptr, num_classes, m, log_s, z_loss, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z
    )
    cap = float_arg(softcap_bits).to(acc_dtype)

    in_ptr = logits_ptr + n * stride_n
    out_ptr = grad_ptr + n * stride_grad_n
    x_t = tl.load(in_ptr + tgt * stride_c + s, mask=reads_t, other=0.0).to(acc_dtype)
    if HAS_CAP:
        x_t, _ = softcap(x_t, cap)
    pm1_t = expm1_neg(-((m - x_t) + log_s))  # p_y - 1
    for start in range(0, num_classes, BLOCK_C):
        cls = start + tl.arange(0, BLOCK_C)
        cls_in = cls < num_classes
        cls64 = cls.to(tl.int64)[:, None]
        x = tl.load(in_ptr + cls64 * stride_c + s[None, :], mask=cls_in[:, None] & kept[None, :], other=0.0)
        x = x.to(acc_dtype)
        if HAS_CAP:
            x, dcap = softcap(x, cap)
        p = tl.exp(-((m[None, :] - x) + log_s[None, :]))
        grad = tl.where(
            cls[:, None] == tgt[None, :],
            target_grad(p, pm1_t[None, :], true_coef[None, :], p_coef[None, :]),
            p_coef[None, :] * p,
        )
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cls, mask=cls_in, other=0.0).to(acc_dtype)
                grad -= eps / num_classes * w[:, None]
            else:
                grad -= eps / num_classes
        grad = tl.where(kept[None, :], g[None, :] * grad, 0.0)
        if HAS_CAP:
            grad *= dcap
        tl.store(
            out_ptr + cls64 * stride_grad_c + s[None, :],
            to_output(grad, grad_ptr.dtype.element_ty),
            mask=cls_in[:, None] & in_image[None, :],
        )
