"""Backward kernel: softmax recomputed from the saved row max and log-sum, for kept rows only."""

import triton
import triton.language as tl

from ._ce import expm1_neg, float_arg, grad_coefs, softcap, target_grad, to_output


@triton.jit
def ce_backward_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    stride_grad,
    target_ptr,
    weight_ptr,
    weight_sum_ptr,
    stats_ptr,
    stats_stride,
    kept_ptr,
    grad_out_ptr,
    denom_ptr,
    num_classes,
    label_smoothing_bits,
    softcap_bits,
    z_loss_bits,
    PER_ROW_GRAD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_CAP: tl.constexpr = False,
    HAS_Z: tl.constexpr = False,
):
    """One program per row writes ``d loss / d logits[row, :]``.

    ``dl/dx_c = (1 - eps) w_y (p_c - [c == y]) + eps / C (sum_w p_c - w_c)``, scaled by the
    upstream gradient (``grad_out / denom`` for a scalar loss, ``grad_out[row]`` for "none"), with
    ``p_c = exp(-((m - x_c) + log s))`` from the forward's ``stats`` and the true class's
    ``p_y - 1`` formed from those relative quantities (see :func:`._ce.target_grad`). Rows outside
    the kept set write exact zeros without reading their logits. Everything is formed in the
    accumulation dtype (fp32; fp64 for fp64) before the one rounding to the gradient's dtype.

    ``HAS_Z``: ``dl/dx_c`` gains ``2 λ lse p_c``; ``HAS_CAP``: ``x`` is capped first (the stats
    are the capped logits') and the whole gradient is multiplied by ``1 - tanh(x_c / c)**2``.
    """
    row = tl.program_id(0).to(tl.int64)
    acc_dtype = stats_ptr.dtype.element_ty
    kept = tl.load(kept_ptr + row) != 0
    if PER_ROW_GRAD:
        g = tl.load(grad_out_ptr + row).to(acc_dtype)
    else:
        g = tl.load(grad_out_ptr).to(acc_dtype) / tl.load(denom_ptr).to(acc_dtype)
    tgt = tl.load(target_ptr + row, mask=kept, other=0).to(tl.int64)
    reads_t = kept & (tgt >= 0) & (tgt < num_classes)  # (outside [0, C): NaN stats, NaN gradient)
    m = tl.load(stats_ptr + row, mask=kept, other=0.0)
    log_s = tl.load(stats_ptr + stats_stride + row, mask=kept, other=0.0)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + tgt, mask=reads_t, other=0.0).to(acc_dtype)
    else:
        w_t = tl.full((), 1.0, acc_dtype)
    eps = float_arg(label_smoothing_bits).to(acc_dtype)
    z_loss = float_arg(z_loss_bits).to(acc_dtype)
    true_coef, p_coef = grad_coefs(
        w_t, eps, weight_sum_ptr, num_classes, m, log_s, z_loss, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z
    )
    cap = float_arg(softcap_bits).to(acc_dtype)

    cols_read = tl.where(kept, num_classes, 0)  # a row outside K reads nothing
    in_row = logits_ptr + row * stride_row
    x_t = tl.load(in_row + tgt, mask=reads_t, other=0.0).to(acc_dtype)
    if HAS_CAP:
        x_t, _ = softcap(x_t, cap)
    pm1_t = expm1_neg(-((m - x_t) + log_s))  # p_y - 1
    out_row = grad_ptr + row * stride_grad
    for start in range(0, num_classes, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < num_classes
        x = tl.load(in_row + cols, mask=cols < cols_read, other=0.0).to(acc_dtype)
        if HAS_CAP:
            x, dcap = softcap(x, cap)
        p = tl.exp(-((m - x) + log_s))
        grad = tl.where(cols == tgt, target_grad(p, pm1_t, true_coef, p_coef), p_coef * p)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=cols < cols_read, other=0.0).to(acc_dtype)
                grad -= eps / num_classes * w
            else:
                grad -= eps / num_classes
        grad = tl.where(kept, g * grad, 0.0)
        if HAS_CAP:
            grad *= dcap
        tl.store(out_row + cols, to_output(grad, grad_ptr.dtype.element_ty), mask=mask)
