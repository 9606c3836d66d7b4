"""The LM head fused with trimming on the GPU: ``trimmed_linear_cross_entropy`` for CUDA tensors.

Three ``torch.library`` ops (``triton_op``, so ``torch.compile(fullgraph=True)`` traces the launches):

1. ``fused_trim::triton_linear_ce_rows``: :func:`linear_ce_forward_kernel` gives every row's loss,
   target weight ``w_y``, row max ``m`` and ``log s`` (``s = sum_c exp(x_c - m)``). Each program owns
   ``BLOCK_N`` rows and walks ``V`` in ``BLOCK_V`` tiles, each tile a ``tl.dot`` over ``D`` in
   ``BLOCK_D`` steps with an online logsumexp across the tiles: the ``(N, V)`` logits never exist.
   No atomics: each row's sums run in one fixed order (deterministic).
2. ``fused_trim::triton_linear_ce_trimmed``: the shared exact-k select on those losses (the
   optional ``share`` hook of global trimming runs between 1 and 2), the reduction, and a registered
   autograd formula whose backward is
3. ``fused_trim::triton_linear_ce_bwd``: the kept rows are gathered into dense chunks of
   ``chunk_size`` rows (a fixed number of rows in all, bounded on the host: no synchronisation),
   their logits recomputed by cuBLAS (``torch.mm``) into an fp32 chunk, :func:`linear_ce_dlogits_kernel`
   forms ``dlogits`` from the saved ``m`` and ``log s`` (relative to the row max, scaled per row), and
   ``torch.mm`` forms ``d input`` rows, ``d W += dlogits^T input`` and ``d b``, accumulated in fp32 in
   chunk order (bitwise repeatable), cast to the parameters' dtype at the end.

The backward uses cuBLAS rather than a fused Triton backward: the three GEMMs are the whole cost, the
``d W`` one reduces over rows (a fused kernel would need atomics, losing determinism, or a second
pass), and the elementwise ``dlogits`` step between them reads and writes one chunk, which costs
little next to the GEMMs.

With a Python float ``keep_ratio == 1.0``, no ``share``, a scalar reduction and a gradient required,
every valid row is kept and known in advance: ``fused_trim::triton_linear_ce_keep_all`` computes the
losses and the unscaled gradient chunk by chunk in the forward (3 GEMMs, not 4) and the backward
only scales them by ``grad_out / denom``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._ce import grad_coefs, smoothing_eps
from .function import (
    GRID_BLOCK,
    REDUCTION_CODE,
    SINGLE_PROGRAM_MAX_ROWS,
    accumulation_dtype,
    float64_bits,
    row_config,
    select_block,
)
from .grid_select import grid_select
from .select import select_kernel

# ------------------------------------------------------------------------------------------------
# Device functions
# ------------------------------------------------------------------------------------------------


@triton.jit
def _online_tile(x, w, cols, tgt, m, s, smooth, w_seen, x_t, HAS_SMOOTHING: tl.constexpr):
    """Fold a ``[R, BLOCK_V]`` tile of logits (``-inf`` on padding columns) into the per-row running
    max ``m``, ``s = sum exp(x - m)``, ``smooth = sum_c w_c (m - x_c)`` (rescaled when ``m`` grows;
    ``w``: the tile's class weights, 0 on padding) and the target logit ``x_t``; ``w_seen`` is the
    weight of the columns seen so far. NaN logits propagate to ``s`` (and so to the loss)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all -inf prefix: no -inf - -inf
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), 1)
    x_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), 1)
    if HAS_SMOOTHING:
        grow = tl.where(m == float("-inf"), 0.0, m_new - m)
        smooth = smooth + w_seen * grow
        smooth += tl.sum(tl.where(w[None, :] != 0.0, w[None, :] * (m_new[:, None] - x), 0.0), 1)
        w_seen += tl.sum(w, 0)
    return m_new, s, smooth, w_seen, x_t


@triton.jit
def _row_loss(m, s, smooth, w_seen, x_t, w_t, eps, num_classes, HAS_SMOOTHING: tl.constexpr):
    """``(loss, log s)``: ``w_t ((m - x_t) + log s)``, mixed with label smoothing's
    ``eps / V (sum_c w_c (m - x_c) + W log s)``; every term relative to the row max."""
    log_s = tl.log(s)
    loss = w_t * ((m - x_t) + log_s)
    if HAS_SMOOTHING:
        loss = (1.0 - eps) * loss + (eps / num_classes) * (smooth + w_seen * log_s)
    return loss, log_s


@triton.jit
def _tile_weights(weight_ptr, cols, col_in, acc_dtype: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """The class weights of a tile's columns (1 without ``weight``), 0 on padding columns."""
    if HAS_WEIGHT:
        return tl.load(weight_ptr + cols, mask=col_in, other=0.0).to(acc_dtype)
    return tl.where(col_in, 1.0, 0.0).to(acc_dtype)


@triton.jit
def _target_weight(weight_ptr, tgt, active, acc_dtype: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    if HAS_WEIGHT:
        return tl.load(weight_ptr + tgt, mask=active, other=0.0).to(acc_dtype)
    return tl.where(active, 1.0, 0.0).to(acc_dtype)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def linear_ce_forward_kernel(
    x_ptr,
    stride_xn,
    stride_xd,
    w_ptr,
    stride_wv,
    stride_wd,
    bias_ptr,
    target_ptr,
    weight_ptr,
    loss_ptr,
    wy_ptr,
    m_ptr,
    log_s_ptr,
    num_rows,
    num_classes,
    in_features,
    ignore_index,
    label_smoothing_bits,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``BLOCK_N`` rows per program: logits tile by tile (``[BLOCK_N, BLOCK_D] x [BLOCK_D, BLOCK_V]``
    ``tl.dot`` steps, accumulated in fp32, fp64 for fp64; the bias added in that dtype) folded into an
    online logsumexp. Writes ``loss``, ``w_y``, ``m`` and ``log s`` in the accumulation dtype (0 on
    ignored rows). A target outside ``[0, V)`` that is not ``ignore_index`` gets a NaN loss.
    """
    acc_dtype: tl.constexpr = loss_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < num_rows
    # Padding lanes are masked by the row bound (other=ignore_index would wrap in a narrow dtype).
    tgt = tl.load(target_ptr + rows, mask=row_in, other=0).to(tl.int64)
    valid = row_in & (tgt != ignore_index)
    in_range = (tgt >= 0) & (tgt < num_classes)
    d_offs = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + rows[:, None] * stride_xn

    m = tl.full((BLOCK_N,), float("-inf"), acc_dtype)
    s = tl.zeros((BLOCK_N,), acc_dtype)
    smooth = tl.zeros((BLOCK_N,), acc_dtype)
    x_t = tl.zeros((BLOCK_N,), acc_dtype)
    w_seen = tl.zeros((), acc_dtype)
    for v0 in range(0, num_classes, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_in = cols < num_classes
        w_cols = w_ptr + cols[None, :].to(tl.int64) * stride_wv
        acc = tl.zeros((BLOCK_N, BLOCK_V), acc_dtype)
        for d0 in range(0, in_features, BLOCK_D):
            ds = d0 + d_offs
            d_in = ds < in_features
            xt = tl.load(x_rows + ds[None, :] * stride_xd, mask=row_in[:, None] & d_in[None, :], other=0.0)
            wt = tl.load(w_cols + ds[:, None] * stride_wd, mask=d_in[:, None] & col_in[None, :], other=0.0)
            acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION, out_dtype=acc_dtype)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(acc_dtype)[None, :]
        x = tl.where(col_in[None, :], acc, float("-inf"))
        w = _tile_weights(weight_ptr, cols, col_in, acc_dtype, HAS_WEIGHT and HAS_SMOOTHING)
        m, s, smooth, w_seen, x_t = _online_tile(x, w, cols, tgt, m, s, smooth, w_seen, x_t, HAS_SMOOTHING)

    w_t = _target_weight(weight_ptr, tgt, valid & in_range, acc_dtype, HAS_WEIGHT)
    eps = smoothing_eps(label_smoothing_bits).to(acc_dtype)
    loss, log_s = _row_loss(m, s, smooth, w_seen, x_t, w_t, eps, num_classes, HAS_SMOOTHING)
    loss = tl.where(in_range, loss, float("nan"))
    zero = tl.zeros((BLOCK_N,), acc_dtype)
    tl.store(loss_ptr + rows, tl.where(valid, loss, zero), mask=row_in)
    tl.store(wy_ptr + rows, tl.where(valid, w_t, zero), mask=row_in)
    tl.store(m_ptr + rows, tl.where(valid, m, zero), mask=row_in)
    tl.store(log_s_ptr + rows, tl.where(valid, log_s, zero), mask=row_in)


@triton.jit
def linear_ce_dlogits_kernel(
    logits_ptr,
    stride_logits,
    dlogits_ptr,
    stride_dlogits,
    rows_ptr,
    target_ptr,
    weight_ptr,
    weight_sum_ptr,
    m_ptr,
    log_s_ptr,
    kept_ptr,
    grad_out_ptr,
    denom_ptr,
    loss_ptr,
    wy_ptr,
    num_classes,
    ignore_index,
    label_smoothing_bits,
    FROM_CHUNK: tl.constexpr,
    PER_ROW_GRAD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row ``i`` of a chunk of logits (global row ``rows[i]``) writes
    ``dlogits[i, :]`` (in place when ``dlogits`` is ``logits``):
    ``g ((1 - eps) w_y (p_c - [c == y]) + eps / V (W p_c - w_c))``, ``p_c = exp((x_c - m) - log s)``.

    ``FROM_CHUNK`` (the keep-all path): ``m`` and ``log s`` come from a first pass over the chunk
    row, which also writes the row's ``loss`` and ``w_y``; ``g`` is 1 on valid rows. Otherwise
    ``m``/``log s`` are the forward's and ``g`` is ``grad_out / denom`` (``grad_out[row]`` with
    ``PER_ROW_GRAD``) on kept rows. Rows with ``g = 0`` (ignored, outside the kept set, padding)
    write exact zeros without reading their logits. Formed in fp32 (fp64 for fp64) before the one
    rounding to ``dlogits``' dtype.
    """
    acc_dtype: tl.constexpr = logits_ptr.dtype.element_ty
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + i).to(tl.int64)
    in_row = logits_ptr + i * stride_logits
    out_row = dlogits_ptr + i * stride_dlogits
    tgt = tl.load(target_ptr + row).to(tl.int64)
    in_range = (tgt >= 0) & (tgt < num_classes)
    eps = smoothing_eps(label_smoothing_bits).to(acc_dtype)
    if FROM_CHUNK:
        active = tgt != ignore_index
        w_t = _target_weight(weight_ptr, tgt, active & in_range, acc_dtype, HAS_WEIGHT)
        tgt1 = tl.full((1,), 0, tl.int64) + tgt
        m = tl.full((1,), float("-inf"), acc_dtype)
        s = tl.zeros((1,), acc_dtype)
        smooth = tl.zeros((1,), acc_dtype)
        x_t = tl.zeros((1,), acc_dtype)
        w_seen = tl.zeros((), acc_dtype)
        for v0 in range(0, tl.where(active, num_classes, 0), BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_in = cols < num_classes
            x = tl.load(in_row + cols[None, :], mask=col_in[None, :], other=float("-inf"))
            w = _tile_weights(weight_ptr, cols, col_in, acc_dtype, HAS_WEIGHT and HAS_SMOOTHING)
            m, s, smooth, w_seen, x_t = _online_tile(x, w, cols, tgt1, m, s, smooth, w_seen, x_t, HAS_SMOOTHING)
        loss, log_s = _row_loss(m, s, smooth, w_seen, x_t, w_t, eps, num_classes, HAS_SMOOTHING)
        loss = tl.sum(tl.where(in_range, loss, float("nan")), 0)
        m = tl.sum(m, 0)
        log_s = tl.sum(log_s, 0)
        tl.store(loss_ptr + row, tl.where(active, loss, 0.0))
        tl.store(wy_ptr + row, w_t)
        g = tl.where(active, 1.0, 0.0).to(acc_dtype)
    else:
        active = tl.load(kept_ptr + row) != 0
        w_t = _target_weight(weight_ptr, tgt, active & in_range, acc_dtype, HAS_WEIGHT)
        m = tl.load(m_ptr + row, mask=active, other=0.0)
        log_s = tl.load(log_s_ptr + row, mask=active, other=0.0)
        if PER_ROW_GRAD:
            g = tl.load(grad_out_ptr + row).to(acc_dtype)
        else:
            g = tl.load(grad_out_ptr).to(acc_dtype) / tl.load(denom_ptr).to(acc_dtype)
    true_coef, p_coef = grad_coefs(w_t, eps, weight_sum_ptr, num_classes, HAS_WEIGHT, HAS_SMOOTHING)

    cols_read = tl.where(active, num_classes, 0)  # an inactive row reads nothing
    for v0 in range(0, num_classes, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(in_row + cols, mask=cols < cols_read, other=0.0)
        p = tl.exp((x - m) - log_s)
        grad = p_coef * p - tl.where(cols == tgt, true_coef, 0.0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=cols < cols_read, other=0.0).to(acc_dtype)
                grad -= eps / num_classes * w
            else:
                grad -= eps / num_classes
        grad = tl.where(active, g * grad, 0.0)
        tl.store(out_row + cols, grad.to(dlogits_ptr.dtype.element_ty), mask=cols < num_classes)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def forward_config(num_rows: int, num_classes: int, in_features: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_V, BLOCK_D, num_warps)`` of :func:`linear_ce_forward_kernel`.

    bf16/fp16: 64x128 tiles over 64-wide steps of ``D`` (8 warps, 32 fp32 accumulators a thread);
    fp32 and fp64 (FMA or tf32 dots): smaller tiles. Each block is at least 16 (``tl.dot``'s
    minimum) and no larger than its dimension's next power of two.
    """
    if dtype == torch.float64:
        bn, bv, bd, warps = 32, 32, 32, 4
    elif dtype == torch.float32:
        bn, bv, bd, warps = 64, 64, 32, 4
    else:
        bn, bv, bd, warps = 64, 128, 64, 8

    def fit(block: int, size: int) -> int:
        return max(16, min(block, triton.next_power_of_2(max(size, 1))))

    return fit(bn, num_rows), fit(bv, num_classes), fit(bd, in_features), warps


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s precision: fp32 operands follow ``torch.get_float32_matmul_precision()``, as
    ``F.linear`` does ("highest": IEEE fp32; otherwise tf32)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _mm(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """``a @ b`` with an ``acc``-dtype result: bf16/fp16 operands go to cuBLAS as they are, with fp32
    accumulation and output; on the CPU (the interpreter's tests) they are converted first."""
    if a.dtype == acc:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=acc)
    return torch.mm(a.to(acc), b.to(acc))


def _weight_sum(weight: Tensor | None, label_smoothing: float, acc: torch.dtype, like: Tensor) -> Tensor:
    """The class weights' sum (read by the gradient's smoothing term), or a placeholder pointer."""
    return weight.sum(dtype=acc) if weight is not None and label_smoothing > 0.0 else like


def _select(
    losses: Tensor, w_y: Tensor, target: Tensor, dtype: torch.dtype, keep_ratio: float, ratio_t: Tensor | None,
    hardest: bool, ignore_index: int, reduction: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The shared exact-k select on precomputed losses: ``(out, kept, k, threshold, denom)``."""
    num_rows, dev = losses.shape[0], losses.device
    kept = torch.empty(num_rows, dtype=torch.bool, device=dev)
    out = torch.empty(num_rows if reduction == 2 else (), dtype=dtype, device=dev)
    k = torch.empty((), dtype=torch.int64, device=dev)
    threshold = torch.empty((), dtype=dtype, device=dev)
    denom = torch.empty((), dtype=losses.dtype, device=dev)
    ratio_on_device = ratio_t is not None
    ratio_bits = float64_bits(keep_ratio)
    ratio_ptr = ratio_t if ratio_on_device else losses
    if num_rows <= SINGLE_PROGRAM_MAX_ROWS:
        wrap_triton(select_kernel)[(1,)](
            losses, w_y, target, kept, out, out, k, threshold, denom, num_rows, ignore_index, ratio_bits,
            ratio_ptr, RATIO_FROM_PTR=ratio_on_device, KEEP_ALL=not ratio_on_device and keep_ratio == 1.0,
            HARDEST=hardest, REDUCTION=reduction, BLOCK=select_block(num_rows), num_warps=4,
        )  # fmt: skip
    else:
        grid_select(
            losses, w_y, target, kept, out, k, threshold, denom, ignore_index, ratio_bits, ratio_ptr,
            ratio_on_device, hardest, reduction, GRID_BLOCK,
        )  # fmt: skip
    return out, kept, k, threshold, denom


def _launch_dlogits(
    logits: Tensor, dlogits: Tensor, rows: Tensor, target: Tensor, weight: Tensor | None, weight_sum: Tensor,
    m: Tensor, log_s: Tensor, kept: Tensor, grad_out: Tensor, denom: Tensor, loss: Tensor, w_y: Tensor,
    ignore_index: int, label_smoothing: float, from_chunk: bool,
) -> None:
    block_v, warps = row_config(logits.shape[1], logits.element_size())
    wrap_triton(linear_ce_dlogits_kernel)[(rows.shape[0],)](
        logits, logits.stride(0), dlogits, dlogits.stride(0), rows, target, weight if weight is not None else m,
        weight_sum, m, log_s, kept, grad_out, denom, loss, w_y, logits.shape[1], ignore_index,
        float64_bits(label_smoothing), FROM_CHUNK=from_chunk, PER_ROW_GRAD=grad_out.dim() == 1,
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0.0, BLOCK_V=block_v, num_warps=warps,
    )  # fmt: skip


def _chunk_logits(x: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, acc: torch.dtype) -> Tensor:
    logits = _mm(x, linear_weight.t(), acc)
    if linear_bias is not None:
        logits += linear_bias.to(acc)
    return logits


# ------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------


@triton_op("fused_trim::triton_linear_ce_rows", mutates_args=())
def linear_ce_rows(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every row's ``(loss, w_y, m, log_s)`` of ``F.linear(input, linear_weight, linear_bias)``
    (accumulation dtype, ``(N,)``), without the logits."""
    num_rows, in_features = input.shape
    num_classes = linear_weight.shape[0]
    acc = accumulation_dtype(input.dtype)
    loss, w_y, m, log_s = (torch.empty(num_rows, dtype=acc, device=input.device) for _ in range(4))
    bn, bv, bd, warps = forward_config(num_rows, num_classes, in_features, input.dtype)
    wrap_triton(linear_ce_forward_kernel)[(triton.cdiv(num_rows, bn),)](
        input, input.stride(0), input.stride(1), linear_weight, linear_weight.stride(0), linear_weight.stride(1),
        linear_bias if linear_bias is not None else loss, target.contiguous(),
        weight.contiguous() if weight is not None else loss, loss, w_y, m, log_s, num_rows, num_classes,
        in_features, ignore_index, float64_bits(label_smoothing), HAS_BIAS=linear_bias is not None,
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0.0,
        INPUT_PRECISION=input_precision(input.dtype), BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=warps,
    )  # fmt: skip
    return loss, w_y, m, log_s


@triton_op("fused_trim::triton_linear_ce_trimmed", mutates_args=())
def linear_ce_trimmed(
    losses: Tensor,
    w_y: Tensor,
    m: Tensor,
    log_s: Tensor,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    keep_ratio: float,
    keep_ratio_t: Tensor | None,
    hardest: bool,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    max_kept: int,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Selection and reduction on the rows op's losses: ``(out, kept, k, threshold, denom)``.

    ``input``, ``linear_weight`` and ``linear_bias`` are read only by the backward, which
    recomputes at most ``max_kept`` rows, ``chunk_size`` at a time.
    """
    return _select(
        losses, w_y, target.contiguous(), input.dtype, keep_ratio, keep_ratio_t, hardest, ignore_index, reduction
    )


@triton_op("fused_trim::triton_linear_ce_bwd", mutates_args=())
def linear_ce_bwd(
    grad_out: Tensor,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    m: Tensor,
    log_s: Tensor,
    kept: Tensor,
    denom: Tensor,
    label_smoothing: float,
    max_kept: int,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d input, d linear_weight, d linear_bias)`` (the last empty without a bias).

    The first ``max_kept`` rows of ``argsort(~kept, stable=True)`` (every kept row, in row order,
    then padding rows that get a zero scale) are processed ``chunk_size`` at a time; ``d input`` is
    exactly zero on every other row.
    """
    num_rows, in_features = input.shape
    acc = accumulation_dtype(input.dtype)
    dev = input.device
    target = target.contiguous()
    grad_out = grad_out.contiguous()
    weight = weight.contiguous() if weight is not None else None
    weight_sum = _weight_sum(weight, label_smoothing, acc, m)
    order = torch.argsort((~kept).to(torch.int8), stable=True)[:max_kept]
    d_input = torch.zeros_like(input, memory_format=torch.contiguous_format)
    d_weight = torch.zeros(linear_weight.shape, dtype=acc, device=dev)
    d_bias = torch.zeros(linear_weight.shape[0] if linear_bias is not None else 0, dtype=acc, device=dev)
    for start in range(0, max_kept, chunk_size):
        rows = order[start : start + chunk_size]
        x = input.index_select(0, rows)
        logits = _chunk_logits(x, linear_weight, linear_bias, acc)
        dlogits = logits if input.dtype == acc else torch.empty_like(logits, dtype=input.dtype)
        _launch_dlogits(
            logits, dlogits, rows, target, weight, weight_sum, m, log_s, kept, grad_out, denom, m, m, 0,
            label_smoothing, from_chunk=False,
        )  # fmt: skip
        d_input.index_copy_(0, rows, _mm(dlogits, linear_weight, acc).to(input.dtype))
        d_weight += _mm(dlogits.t(), x, acc)
        if linear_bias is not None:
            d_bias += dlogits.sum(0, dtype=acc)
    return d_input, d_weight.to(linear_weight.dtype), d_bias.to(input.dtype)


def _trimmed_setup_context(ctx, inputs, output) -> None:
    _, _, m, log_s, input, linear_weight, linear_bias, target, weight = inputs[:9]
    label_smoothing, _, max_kept, chunk_size = inputs[13:]
    _, kept, _, _, denom = output
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, m, log_s, kept, denom)
    ctx.label_smoothing, ctx.max_kept, ctx.chunk_size = label_smoothing, max_kept, chunk_size


def _trimmed_backward(ctx, grad_out, *_unused):
    input, linear_weight, linear_bias, target, weight, m, log_s, kept, denom = ctx.saved_tensors
    d_input, d_weight, d_bias = linear_ce_bwd(
        grad_out, input, linear_weight, linear_bias, target, weight, m, log_s, kept, denom, ctx.label_smoothing,
        ctx.max_kept, ctx.chunk_size,
    )  # fmt: skip
    d_bias = d_bias if linear_bias is not None else None
    return (None,) * 4 + (d_input, d_weight, d_bias) + (None,) * 10


linear_ce_trimmed.register_autograd(_trimmed_backward, setup_context=_trimmed_setup_context)


@triton_op("fused_trim::triton_linear_ce_keep_all", mutates_args=())
def linear_ce_keep_all(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    hardest: bool,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Every valid row kept (``keep_ratio == 1``, ``reduction`` mean or sum): the losses and the
    unscaled gradient in one pass of chunks, 3 GEMMs a chunk.

    Returns ``(out, losses, kept, k, threshold, denom, d_input, d_weight, d_bias)``, the gradients
    in the accumulation dtype and unscaled (the backward multiplies by ``grad_out / denom``).
    """
    num_rows, in_features = input.shape
    acc = accumulation_dtype(input.dtype)
    dev = input.device
    target = target.contiguous()
    weight = weight.contiguous() if weight is not None else None
    losses = torch.empty(num_rows, dtype=acc, device=dev)
    w_y = torch.empty(num_rows, dtype=acc, device=dev)
    weight_sum = _weight_sum(weight, label_smoothing, acc, losses)
    d_input = torch.empty((num_rows, in_features), dtype=acc, device=dev)
    d_weight = torch.zeros(linear_weight.shape, dtype=acc, device=dev)
    d_bias = torch.zeros(linear_weight.shape[0] if linear_bias is not None else 0, dtype=acc, device=dev)
    for start in range(0, num_rows, chunk_size):
        stop = min(start + chunk_size, num_rows)
        rows = torch.arange(start, stop, device=dev)
        x = input[start:stop]
        logits = _chunk_logits(x, linear_weight, linear_bias, acc)
        dlogits = logits if input.dtype == acc else torch.empty_like(logits, dtype=input.dtype)
        _launch_dlogits(
            logits, dlogits, rows, target, weight, weight_sum, losses, losses, losses, losses, losses, losses, w_y,
            ignore_index, label_smoothing, from_chunk=True,
        )  # fmt: skip
        d_input[start:stop] = _mm(dlogits, linear_weight, acc)
        d_weight += _mm(dlogits.t(), x, acc)
        if linear_bias is not None:
            d_bias += dlogits.sum(0, dtype=acc)
    out, kept, k, threshold, denom = _select(
        losses, w_y, target, input.dtype, 1.0, None, hardest, ignore_index, reduction
    )
    return out, losses, kept, k, threshold, denom, d_input, d_weight, d_bias


def _keep_all_setup_context(ctx, inputs, output) -> None:
    ctx.has_bias = inputs[2] is not None
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    *_, denom, d_input, d_weight, d_bias = output
    ctx.save_for_backward(denom, d_input, d_weight, d_bias)


def _keep_all_backward(ctx, grad_out, *_unused):
    denom, d_input, d_weight, d_bias = ctx.saved_tensors
    scale = grad_out.to(denom.dtype) / denom
    in_dtype, w_dtype = ctx.dtypes
    d_bias = (d_bias * scale).to(w_dtype) if ctx.has_bias else None
    return (d_input * scale).to(in_dtype), (d_weight * scale).to(w_dtype), d_bias, *(None,) * 7


linear_ce_keep_all.register_autograd(_keep_all_backward, setup_context=_keep_all_setup_context)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def trimmed_linear_cross_entropy_2d(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    keep_ratio: float | Tensor,
    keep: str,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    chunk_size: int,
    share=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The LM-head contract on ``input (N, D)``, ``linear_weight (V, D)``, ``target (N,)``.

    Returns ``(out, losses, kept, k, threshold)`` as :func:`fused_trim.reference.trimmed_linear_cross_entropy_2d`.
    ``keep_ratio`` may be a 0-dim int64 tensor (an exact count); ``share`` maps ``(losses, valid)`` to
    such a count (global trimming). The backward recomputes ``min(N, max(1, floor(r N + 0.5)))`` rows
    for a float ratio ``r`` (a bound on ``k`` known on the host), all ``N`` rows for a tensor ratio or
    with ``share``, ``chunk_size`` rows at a time.
    """
    from . import device_ratio

    keep_ratio, ratio_t = device_ratio(keep_ratio, input.device)
    code = REDUCTION_CODE[reduction]
    num_rows = input.shape[0]
    needs_grad = torch.is_grad_enabled() and any(
        p is not None and p.requires_grad for p in (input, linear_weight, linear_bias)
    )
    if needs_grad and share is None and ratio_t is None and keep_ratio == 1.0 and reduction != "none":
        out, losses, kept, k, threshold, *_ = linear_ce_keep_all(
            input, linear_weight, linear_bias, target, weight, keep == "hardest", ignore_index, label_smoothing, code,
            chunk_size,
        )
        return out, losses.detach(), kept, k, threshold.detach()

    detached = [None if p is None else p.detach() for p in (input, linear_weight, linear_bias)]
    losses, w_y, m, log_s = linear_ce_rows(*detached, target, weight, ignore_index, label_smoothing)
    if share is not None:
        ratio_t, keep_ratio = share(losses, target != ignore_index), 1.0
    if ratio_t is None:
        max_kept = min(num_rows, max(1, math.floor(keep_ratio * num_rows + 0.5)))
    else:
        max_kept = num_rows
    out, kept, k, threshold, _ = linear_ce_trimmed(
        losses, w_y, m, log_s, input, linear_weight, linear_bias, target, weight, keep_ratio, ratio_t,
        keep == "hardest", ignore_index, label_smoothing, code, max_kept, chunk_size,
    )  # fmt: skip
    return out, losses, kept, k, threshold.detach()
