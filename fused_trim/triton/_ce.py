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
def float_arg(bits):
    """A host float (the label smoothing ``eps``, the soft cap ``c``, the z-loss ``λ``) passed as
    its float64 bits (the interpreter would round a Python float to fp32), as fp64."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def softmax_block(m, sm1, x):
    """Fold a block of logits ``x`` (classes along axis 0; masked lanes ``-inf``) into the running
    max ``m`` and ``sm1 = sum_c exp(x_c - m) - 1``: the max's own term, exactly 1, is left out, so
    that ``log s = log1p(sm1)`` keeps its relative precision when the other terms are tiny (start
    from ``m = -inf``, ``sm1 = -1``). Returns ``(m, sm1)``."""
    m_new = tl.maximum(m, tl.max(x, 0), propagate_nan=tl.PropagateNan.ALL)
    # A block (or prefix) of only -inf leaves m at -inf: shift by 0 instead of -inf - -inf.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp(x - tl.expand_dims(shift, 0))
    # A new max in this block: rescale the old sum (with its 1) and leave out one of the block's
    # terms at the max (each exactly 1).
    at_max = x == tl.expand_dims(m_new, 0)
    rest = tl.sum(tl.where(at_max, 0.0, e), 0) + (tl.sum(at_max.to(tl.int32), 0) - 1)
    grown = (sm1 + 1.0) * tl.exp(m - shift) + rest
    return m_new, tl.where(m_new > m, grown, sm1 + tl.sum(e, 0))


@triton.jit
def smoothing_block(d, sum_w, m, m_new, x, w, mask):
    """Fold a block into ``d = sum_c w_c (m - x_c)`` and ``sum_w = sum_c w_c`` (label smoothing),
    kept relative to the running max (``m`` before this block, ``m_new`` after; 0 while it is
    ``-inf``): every term is ``>= 0`` for ``w >= 0``, so ``d`` keeps its relative precision."""
    ref = tl.where(m == float("-inf"), 0.0, m)
    ref_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    w = tl.where(mask, w, 0.0)
    d += sum_w * (ref_new - ref) + tl.sum(w * tl.where(mask, tl.expand_dims(ref_new, 0) - x, 0.0), 0)
    return d, sum_w + tl.sum(w, 0)


@triton.jit
def log_sum(m, sm1):
    """``log s`` from :func:`softmax_block`'s running max ``m`` and ``sm1 = s - 1``: NaN when ``m``
    is not finite (a NaN or +inf logit, or a row of only -inf), where torch's log-probabilities
    are NaN, so that the loss and every gradient entry of that row are NaN too."""
    return tl.where(tl.abs(m) < float("inf"), log1p(sm1), float("nan"))


@triton.jit
def log1p(x):
    """``log(1 + x)`` to a few ulp for ``x >= -1`` (``log(u) * x / (u - 1)`` with ``u = 1 + x``;
    ``tl.log`` compiles to libdevice's accurate ``logf``)."""
    u = 1.0 + x
    exact = (u == 1.0) | (x == float("inf"))
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def expm1_neg(y):
    """``exp(y) - 1`` to a few ulp for ``y <= 0``: a Taylor polynomial for ``y > -1/2`` (degree 9
    for fp32, 17 for fp64), ``exp(y) - 1`` below, where it is at least ``0.39`` in magnitude."""
    DEGREE: tl.constexpr = 17 if y.dtype == tl.float64 else 9
    small = y > -0.5
    ys = tl.where(small, y, 0.0)
    r = tl.full(y.shape, 1.0, y.dtype)
    for j in tl.static_range(DEGREE - 1):
        r = 1.0 + ys * r / (DEGREE - j)
    return tl.where(small, ys * r, tl.exp(y) - 1.0)


@triton.jit
def softcap(x, cap):
    """The soft-capped logits ``c * tanh(x / c)`` and their derivative ``1 - tanh(x / c)**2``, in
    ``x``'s dtype (``cap``: ``c`` in that dtype).

    With ``u = x / c`` and ``e = exp(-2|u|)``: ``1 - tanh**2 = 4 e / (1 + e)**2``, which keeps its
    relative precision where ``tanh`` rounds to 1 and underflows to exactly 0 at ``|x| >> c`` (or
    ``±inf``), never NaN; a NaN logit stays NaN in both. ``tanh|u|`` is ``(1 - e) / (1 + e)`` from
    ``|u| = 0.6`` up (no cancellation there) and an odd polynomial below (fp32: our fit,
    ``scripts/fit_tanh.py``, within 0.8 ulp); fp64 takes ``-expm1(-2|u|) / (2 + expm1(-2|u|))`` throughout.
    """
    if x.dtype == tl.float64:
        u = x / cap
    else:
        u = x * (1.0 / cap)  # one division per row, not per logit
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    r = 1.0 / (1.0 + e)
    if x.dtype == tl.float64:
        em = expm1_neg(-2.0 * a)
        t = -em / (2.0 + em)
    else:
        a_small = tl.minimum(a, 0.6)  # (an infinite |u| would make the unused polynomial inf - inf)
        s = a_small * a_small
        q = -5.89561764848e-3 * s + 2.07963681879e-2  # scripts/fit_tanh.py
        q = q * s - 5.37839508699e-2
        q = q * s + 1.33319256214e-1
        q = q * s - 3.33332980627e-1
        t = tl.where(a < 0.6, (q * s) * a_small + a_small, (1.0 - e) * r)
    capped = cap * tl.where(u < 0.0, -t, t)
    return capped, (4.0 * e) * (r * r)


@triton.jit
def weighted_loss(
    m,
    log_s,
    x_t,
    w_t,
    sum_w,
    d,
    eps,
    num_classes,
    z_loss,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
):
    """``F.cross_entropy``'s per-sample loss from the row max ``m`` and ``log s`` (``s = sum_c
    exp(x_c - m)``), never from an absolute logsumexp: ``w_t * ((m - x_t) + log s)``, with label
    smoothing mixed with ``eps / C * (d + sum_w * log s)`` (``d = sum_c w_c (m - x_c)``, ``sum_w``:
    the class weights' sum, or ``C``); with ``HAS_Z`` plus ``z_loss * lse**2`` (``lse = m + log
    s``, not weighted)."""
    loss = w_t * ((m - x_t) + log_s)
    if HAS_SMOOTHING:
        loss = (1.0 - eps) * loss + (eps / num_classes) * (d + sum_w * log_s)
    if HAS_Z:
        lse = m + log_s
        loss += z_loss * (lse * lse)
    return loss


@triton.jit
def target_grad(p_t, pm1_t, true_coef, p_coef):
    """The true class's ``p_coef * p_t - true_coef``, formed as ``true_coef * (p_t - 1) +
    (p_coef - true_coef) * p_t`` with ``pm1_t = p_t - 1 = expm1_neg(-((m - x_t) + log s))``:
    accurate in fp32 also when ``p_t`` is close to 1."""
    return true_coef * pm1_t + (p_coef - true_coef) * p_t


@triton.jit
def grad_coefs(
    w_t,
    eps,
    weight_sum_ptr,
    num_classes,
    m,
    log_s,
    z_loss,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
):
    """``(true_coef, p_coef)`` of ``dl/dx_c = p_coef * p_c - [c == y] * true_coef - eps / C * w_c``
    (the last term only with label smoothing), in ``w_t``'s dtype; with ``HAS_Z`` the z term's
    ``2 z_loss lse`` (``lse = m + log s``) is part of ``p_coef``."""
    true_coef = (1.0 - eps) * w_t
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            sum_w = tl.load(weight_sum_ptr).to(w_t.dtype)
        else:
            sum_w = tl.cast(num_classes, w_t.dtype)
        p_coef = true_coef + eps / num_classes * sum_w
    else:
        p_coef = true_coef
    if HAS_Z:
        p_coef += 2.0 * z_loss * (m + log_s)
    return true_coef, p_coef


@triton.jit
def to_output(x, dtype: tl.constexpr):
    """``x`` (fp32, or fp64 for fp64 outputs) in the output ``dtype``, rounded to nearest even.

    Compiled, every downcast rounds to nearest even; Triton's interpreter truncates fp32 to bf16,
    so bf16 is rounded here on the bits first (exact, then, in either), and the mode is explicit.
    """
    if dtype == tl.bfloat16:
        b = x.to(tl.float32).to(tl.int32, bitcast=True)
        b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
        r = tl.where(x != x, x.to(tl.float32), b.to(tl.float32, bitcast=True))
        return r.to(tl.bfloat16, fp_downcast_rounding="rtne")
    elif dtype == tl.float16:
        return x.to(tl.float32).to(tl.float16, fp_downcast_rounding="rtne")
    else:
        return x.to(dtype)
