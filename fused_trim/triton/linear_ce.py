"""The LM head fused with trimming on the GPU: ``trimmed_linear_cross_entropy`` for CUDA tensors.

Python orchestration of ``torch.library`` ops (``triton_op``: ``torch.compile(fullgraph=True)``
traces the launches):

1. ``fused_trim::triton_linear_ce_rows``: :func:`linear_ce_forward_kernel` gives every row's loss,
   target weight ``w_y`` and stats (row max ``m``, ``log s``). Each program owns ``BLOCK_N`` rows and
   walks ``V`` in tiles of ``BLOCK_V`` classes, each tile a ``tl.dot`` over ``D`` in ``BLOCK_D`` steps,
   folded into an online logsumexp with the shared device functions of :mod:`._ce`: the ``(N, V)``
   logits never exist, and each row's sums run in one fixed order (no atomics: deterministic).
2. ``fused_trim::triton_linear_ce_trimmed``: the shared exact-k select on those losses (the
   ``share`` hook of global trimming runs between 1 and 2), the reduction, and a registered autograd
   formula whose backward is
3. ``fused_trim::triton_linear_ce_bwd``: the kept rows are gathered into dense chunks of
   ``chunk_size`` rows (a fixed number of rows in all, bounded on the host: no synchronisation),
   their logits recomputed by cuBLAS (``torch.mm``, fp32 output) into an fp32 chunk, the backward row
   kernel of ``trimmed_cross_entropy`` (:func:`.ce_backward.ce_backward_kernel`) turns it into
   ``dlogits`` in place (relative to the saved row max, scaled per row; rounded once to the input
   dtype for bf16/fp16), and ``torch.mm`` forms ``d input`` rows, ``d W += dlogits^T x`` and
   ``d b``, accumulated in fp32 in chunk order (bitwise repeatable), cast to the parameters' dtype
   at the end.

Why cuBLAS and not a fused Triton backward: the three GEMMs are the whole cost and cuBLAS runs them
at the hardware's peak; the ``d W`` GEMM reduces over rows, which a fused kernel would have to do
with atomics (losing determinism) or a second pass; the elementwise step between them reads and
writes one chunk, little next to the GEMMs.

With a Python float ``keep_ratio == 1.0``, no ``share``, a scalar reduction and a gradient required,
every valid row is kept and known before the forward: ``fused_trim::triton_linear_ce_keep_all``
computes each chunk's logits once, runs the row kernels of ``trimmed_cross_entropy`` on them (losses,
then the unscaled ``dlogits``) and accumulates the three gradients (3 GEMMs, not 4); its backward
only scales them by ``grad_out / denom``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .._common import TrimOptions, acc_dtype, double_backward_message, forms_gradient_in_forward, host_k
from ._ce import log1p, smoothing_block, smoothing_eps, softmax_block, weighted_loss
from .ce_backward import ce_backward_kernel
from .ce_forward import ce_forward_kernel
from .launch import device_guard, device_ratio, float64_bits, row_config, select_rows

# ------------------------------------------------------------------------------------------------
# Kernel
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
    stats_ptr,
    stats_stride,
    wy_ptr,
    num_rows,
    num_classes,
    in_features,
    ignore_index,
    label_smoothing_bits,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``BLOCK_N`` rows per program, ``V`` in tiles of ``BLOCK_V`` classes: each tile of logits is
    ``[BLOCK_V, BLOCK_D] x [BLOCK_D, BLOCK_N]`` ``tl.dot`` steps over ``D`` (operands as stored, fp32
    accumulation, fp64 for fp64; the bias added in that dtype), classes along axis 0 as the shared
    :func:`._ce.softmax_block` folds them into the running max and ``s - 1``.

    Writes ``loss``, ``w_y`` and, for the backward, the row max at ``stats[row]`` and ``log s`` at
    ``stats[stats_stride + row]`` (all 0 on ignored rows), in the accumulation dtype. A target
    outside ``[0, V)`` that is not ``ignore_index`` gets a NaN loss; NaN logits give a NaN loss.
    ``DOT_IN_FP32`` converts the operands first (bf16 in the interpreter, whose ``tl.dot`` would
    multiply bf16 bit patterns as integers; the products are exact in fp32 either way).
    """
    acc_dtype: tl.constexpr = loss_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < num_rows
    # Padding lanes are masked by the row bound (other=ignore_index would wrap in a narrow dtype).
    tgt = tl.load(target_ptr + rows, mask=row_in, other=0).to(tl.int64)
    valid = row_in & (tgt != ignore_index)
    in_range = (tgt >= 0) & (tgt < num_classes)
    d_offs = tl.arange(0, BLOCK_D)
    x_cols = x_ptr + rows[None, :] * stride_xn  # [1, BLOCK_N]: the operand is x^T

    m = tl.full((BLOCK_N,), float("-inf"), acc_dtype)
    sm1 = tl.full((BLOCK_N,), -1.0, acc_dtype)  # sum_c exp(x_c - m) - 1
    d = tl.zeros((BLOCK_N,), acc_dtype)  # sum_c w_c (m - x_c), for label smoothing
    sum_w = tl.zeros((BLOCK_N,), acc_dtype)
    x_t = tl.zeros((BLOCK_N,), acc_dtype)
    for v0 in range(0, num_classes, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_in = cols < num_classes
        w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_wv
        acc = tl.zeros((BLOCK_V, BLOCK_N), acc_dtype)
        for d0 in range(0, in_features, BLOCK_D):
            ds = d0 + d_offs
            d_in = ds < in_features
            wt = tl.load(w_rows + ds[None, :] * stride_wd, mask=col_in[:, None] & d_in[None, :], other=0.0)
            xt = tl.load(x_cols + ds[:, None] * stride_xd, mask=d_in[:, None] & row_in[None, :], other=0.0)
            if DOT_IN_FP32:
                wt = wt.to(tl.float32)
                xt = xt.to(tl.float32)
            acc = tl.dot(wt, xt, acc, input_precision=INPUT_PRECISION, out_dtype=acc_dtype)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(acc_dtype)[:, None]
        x = tl.where(col_in[:, None], acc, float("-inf"))
        m_new, sm1 = softmax_block(m, sm1, x)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=col_in, other=0.0).to(acc_dtype)
            else:
                w = tl.full((BLOCK_V,), 1.0, acc_dtype)
            d, sum_w = smoothing_block(d, sum_w, m, m_new, x, w[:, None], col_in[:, None])
        x_t += tl.sum(tl.where(cols[:, None] == tgt[None, :], x, 0.0), 0)
        m = m_new
    log_s = log1p(sm1)

    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + tgt, mask=valid & in_range, other=0.0).to(acc_dtype)
    else:
        w_t = tl.full((BLOCK_N,), 1.0, acc_dtype)
    eps = smoothing_eps(label_smoothing_bits).to(acc_dtype)
    loss = weighted_loss(m, log_s, x_t, w_t, sum_w, d, eps, num_classes, HAS_SMOOTHING)
    loss = tl.where(in_range, loss, float("nan"))
    zero = tl.zeros((BLOCK_N,), acc_dtype)
    tl.store(loss_ptr + rows, tl.where(valid, loss, zero), mask=row_in)
    tl.store(wy_ptr + rows, tl.where(valid, w_t, zero), mask=row_in)
    tl.store(stats_ptr + rows, tl.where(valid, m, zero), mask=row_in)
    tl.store(stats_ptr + stats_stride + rows, tl.where(valid, log_s, zero), mask=row_in)


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


def _launch_ce_forward(
    logits: Tensor, target: Tensor, weight: Tensor | None, loss: Tensor, stats: Tensor, w_y: Tensor,
    ignore_index: int, label_smoothing: float,
) -> None:
    """The row kernel of ``trimmed_cross_entropy`` on a chunk of fp32 logits (the keep-all path):
    each row's loss, ``w_y`` and stats, written to views of the whole batch's buffers."""
    block_v, warps = row_config(logits.shape[1], logits.element_size())
    wrap_triton(ce_forward_kernel)[(logits.shape[0],)](
        logits, logits.stride(0), target, weight if weight is not None else loss, loss, stats, stats.stride(0), w_y,
        logits.shape[1], ignore_index, float64_bits(label_smoothing),
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0.0, BLOCK_C=block_v, num_warps=warps,
    )  # fmt: skip


def _launch_ce_backward(
    logits: Tensor, dlogits: Tensor, target: Tensor, weight: Tensor | None, weight_sum: Tensor, stats: Tensor,
    kept: Tensor, grad_out: Tensor, denom: Tensor, label_smoothing: float,
) -> None:
    """The backward row kernel of ``trimmed_cross_entropy`` on a chunk of fp32 logits: ``dlogits``
    (in place when it is ``logits``), zero on rows not ``kept``; the per-row arguments are the
    chunk's (gathered)."""
    block_v, warps = row_config(logits.shape[1], logits.element_size())
    wrap_triton(ce_backward_kernel)[(logits.shape[0],)](
        logits, logits.stride(0), dlogits, dlogits.stride(0), target, weight if weight is not None else stats,
        weight_sum, stats, stats.stride(0), kept, grad_out, denom, logits.shape[1], float64_bits(label_smoothing),
        PER_ROW_GRAD=grad_out.dim() == 1, HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0.0,
        BLOCK_C=block_v, num_warps=warps,
    )  # fmt: skip


def _chunk_logits(x: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, acc: torch.dtype) -> Tensor:
    """``F.linear`` of a chunk of rows by cuBLAS, in the accumulation dtype."""
    logits = _mm(x, linear_weight.t(), acc)
    if linear_bias is not None:
        logits += linear_bias.to(acc)
    return logits


class _GradAccumulator:
    """``d input`` rows, ``d W += dlogits^T x`` and ``d b += column sums`` from one chunk at a time,
    in the accumulation dtype and in chunk order (bitwise repeatable). A gradient not needed stays
    an empty tensor and costs no GEMM."""

    def __init__(
        self, input: Tensor, linear_weight: Tensor, has_bias: bool, d_input: Tensor | None, need_weight: bool
    ) -> None:
        self.acc = acc_dtype(input.dtype)
        dev = input.device
        self.need_input, self.need_weight, self.has_bias = d_input is not None, need_weight, has_bias
        self.d_input = d_input if d_input is not None else torch.empty(0, dtype=input.dtype, device=dev)
        self.d_weight = torch.zeros(linear_weight.shape if need_weight else 0, dtype=self.acc, device=dev)
        self.d_bias = torch.zeros(linear_weight.shape[0] if has_bias else 0, dtype=self.acc, device=dev)

    def add(self, rows: Tensor | slice, x: Tensor, dlogits: Tensor, linear_weight: Tensor) -> None:
        if self.need_input:
            d_x = _mm(dlogits, linear_weight, self.acc).to(self.d_input.dtype)
            if isinstance(rows, slice):
                self.d_input[rows] = d_x
            else:
                self.d_input.index_copy_(0, rows, d_x)
        if self.need_weight and dlogits.dtype == self.acc:
            self.d_weight.addmm_(dlogits.t(), x)  # in place: no (V, D) temporary
        elif self.need_weight:
            self.d_weight += _mm(dlogits.t(), x, self.acc)
        if self.has_bias:
            self.d_bias += dlogits.sum(0, dtype=self.acc)


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
) -> tuple[Tensor, Tensor, Tensor]:
    """Every row's ``(loss, w_y, stats)`` of ``F.linear(input, linear_weight, linear_bias)`` without
    the logits: ``(N,)``, ``(N,)`` and ``(2, N)`` (row max, ``log s``), in the accumulation dtype."""
    with device_guard(input):
        num_rows, in_features = input.shape
        num_classes = linear_weight.shape[0]
        acc = acc_dtype(input.dtype)
        loss = torch.empty(num_rows, dtype=acc, device=input.device)
        w_y = torch.empty(num_rows, dtype=acc, device=input.device)
        stats = torch.empty(2, num_rows, dtype=acc, device=input.device)
        bn, bv, bd, warps = forward_config(num_rows, num_classes, in_features, input.dtype)
        wrap_triton(linear_ce_forward_kernel)[(triton.cdiv(num_rows, bn),)](
            input, input.stride(0), input.stride(1), linear_weight, linear_weight.stride(0), linear_weight.stride(1),
            linear_bias if linear_bias is not None else loss, target.contiguous(),
            weight.contiguous() if weight is not None else loss, loss, stats, num_rows, w_y, num_rows, num_classes,
            in_features, ignore_index, float64_bits(label_smoothing), HAS_BIAS=linear_bias is not None,
            HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0.0,
            INPUT_PRECISION=input_precision(input.dtype),
            DOT_IN_FP32=input.dtype == torch.bfloat16 and not input.is_cuda,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=warps,
        )  # fmt: skip
        return loss, w_y, stats


@triton_op("fused_trim::triton_linear_ce_trimmed", mutates_args=())
def linear_ce_trimmed(
    losses: Tensor,
    w_y: Tensor,
    stats: Tensor,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    keep_ratio: float,
    keep_ratio_t: Tensor | None,
    easiest: bool,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    max_kept: int,
    chunk_size: int,
    score_offset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Selection and reduction on the rows op's losses: ``(out, kept, k, threshold, denom)``.

    ``input``, ``linear_weight`` and ``linear_bias`` are read only by the backward, which
    recomputes at most ``max_kept`` rows, ``chunk_size`` at a time. ``score_offset``: rank
    ``losses - score_offset`` (the select reads it in its one pass).
    """
    with device_guard(input):
        return select_rows(
            losses, w_y, target.contiguous(), input.dtype, keep_ratio, keep_ratio_t, easiest, ignore_index, reduction,
            score_offset=score_offset,
        )  # fmt: skip


@triton_op("fused_trim::triton_linear_ce_bwd", mutates_args=())
def linear_ce_bwd(
    grad_out: Tensor,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    kept: Tensor,
    denom: Tensor,
    label_smoothing: float,
    max_kept: int,
    chunk_size: int,
    need_input: bool,
    need_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d input, d linear_weight, d linear_bias)``, each empty when not needed (no bias).

    The first ``max_kept`` rows of ``argsort(~kept, stable=True)`` (every kept row in row order,
    then rows outside the kept set, whose gradient is zero) are processed ``chunk_size`` at a time;
    ``d input`` is exactly zero on every other row.
    """
    with device_guard(input):
        acc = acc_dtype(input.dtype)
        per_row = grad_out.dim() == 1
        grad_out = grad_out.contiguous()
        weight = weight.contiguous() if weight is not None else None
        weight_sum = _weight_sum(weight, label_smoothing, acc, stats)
        order = torch.argsort((~kept).to(torch.int8), stable=True)[:max_kept]
        d_input = torch.zeros(input.shape, dtype=input.dtype, device=input.device) if need_input else None
        grads = _GradAccumulator(input, linear_weight, linear_bias is not None, d_input, need_weight)
        for start in range(0, max_kept, chunk_size):
            rows = order[start : start + chunk_size]
            x = input.index_select(0, rows)
            logits = _chunk_logits(x, linear_weight, linear_bias, acc)
            dlogits = logits if input.dtype == acc else torch.empty_like(logits, dtype=input.dtype)
            _launch_ce_backward(
                logits, dlogits, target.index_select(0, rows), weight, weight_sum, stats.index_select(1, rows),
                kept.index_select(0, rows), grad_out.index_select(0, rows) if per_row else grad_out, denom,
                label_smoothing,
            )  # fmt: skip
            grads.add(rows, x, dlogits, linear_weight)
        return grads.d_input, grads.d_weight.to(linear_weight.dtype), grads.d_bias.to(input.dtype)


def _trimmed_setup_context(ctx, inputs, output) -> None:
    _, _, stats, input, linear_weight, linear_bias, target, weight = inputs[:8]
    label_smoothing, _, max_kept, chunk_size = inputs[12:16]
    _, kept, _, _, denom = output
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, stats, kept, denom)
    ctx.label_smoothing, ctx.max_kept, ctx.chunk_size = label_smoothing, max_kept, chunk_size


def _trimmed_backward(ctx, grad_out, *_unused):
    input, linear_weight, linear_bias, target, weight, stats, kept, denom = ctx.saved_tensors
    need_input, need_weight = ctx.needs_input_grad[3:5]
    d_input, d_weight, d_bias = linear_ce_bwd(
        grad_out, input, linear_weight, linear_bias, target, weight, stats, kept, denom, ctx.label_smoothing,
        ctx.max_kept, ctx.chunk_size, need_input, need_weight,
    )  # fmt: skip
    grads = (d_input if need_input else None, d_weight if need_weight else None)
    return (None,) * 3 + (*grads, d_bias if linear_bias is not None else None) + (None,) * 11


DOUBLE_BACKWARD_MESSAGE = double_backward_message("trimmed_linear_cross_entropy")


def _double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


linear_ce_trimmed.register_autograd(_trimmed_backward, setup_context=_trimmed_setup_context)
# The gradient is not differentiable again here: say so clearly when a second backward reaches it.
linear_ce_bwd.register_autograd(_double_backward)


@triton_op("fused_trim::triton_linear_ce_keep_all", mutates_args=())
def linear_ce_keep_all(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    easiest: bool,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    chunk_size: int,
    need_input: bool,
    need_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Every valid row kept (``keep_ratio == 1``, ``reduction`` mean or sum): the losses and the
    unscaled gradient in one pass over chunks of rows, 3 GEMMs a chunk (the row kernels of
    ``trimmed_cross_entropy`` on each chunk's fp32 logits).

    Returns ``(out, losses, kept, k, threshold, denom, d_input, d_weight, d_bias)``, the gradients
    in the accumulation dtype and unscaled (the backward multiplies them by ``grad_out / denom``).
    """
    with device_guard(input):
        num_rows = input.shape[0]
        acc = acc_dtype(input.dtype)
        dev = input.device
        target = target.contiguous()
        weight = weight.contiguous() if weight is not None else None
        valid = target != ignore_index
        one = torch.ones((), dtype=acc, device=dev)
        weight_sum = _weight_sum(weight, label_smoothing, acc, one)
        losses, w_y = [], []
        d_input = torch.empty(input.shape, dtype=acc, device=dev) if need_input else None
        grads = _GradAccumulator(input, linear_weight, linear_bias is not None, d_input, need_weight)
        for start in range(0, num_rows, chunk_size):
            rows = slice(start, min(start + chunk_size, num_rows))
            x = input[rows]
            logits = _chunk_logits(x, linear_weight, linear_bias, acc)
            # Chunk-sized outputs (not views of whole-batch buffers: no kernel writes through a view).
            loss_c = torch.empty(x.shape[0], dtype=acc, device=dev)
            w_y_c = torch.empty(x.shape[0], dtype=acc, device=dev)
            stats_c = torch.empty(2, x.shape[0], dtype=acc, device=dev)
            _launch_ce_forward(logits, target[rows], weight, loss_c, stats_c, w_y_c, ignore_index, label_smoothing)
            dlogits = logits if input.dtype == acc else torch.empty_like(logits, dtype=input.dtype)
            _launch_ce_backward(
                logits, dlogits, target[rows], weight, weight_sum, stats_c, valid[rows], one, one, label_smoothing
            )
            grads.add(rows, x, dlogits, linear_weight)
            losses.append(loss_c)
            w_y.append(w_y_c)
        empty = torch.empty(0, dtype=acc, device=dev)
        losses = torch.cat(losses) if losses else empty
        w_y = torch.cat(w_y) if w_y else empty
        out, kept, k, threshold, denom = select_rows(
            losses, w_y, target, input.dtype, 1.0, None, easiest, ignore_index, reduction
        )
        return out, losses, kept, k, threshold, denom, grads.d_input, grads.d_weight, grads.d_bias


def _keep_all_setup_context(ctx, inputs, output) -> None:
    ctx.has_bias = inputs[2] is not None
    ctx.need = inputs[-2:]
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    *_, denom, d_input, d_weight, d_bias = output
    ctx.save_for_backward(denom, d_input, d_weight, d_bias)


def _keep_all_backward(ctx, grad_out, *_unused):
    if torch.is_grad_enabled():  # create_graph=True: the saved gradients are constants here
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
    denom, d_input, d_weight, d_bias = ctx.saved_tensors
    scale = grad_out.to(denom.dtype) / denom
    in_dtype, w_dtype = ctx.dtypes
    need_input, need_weight = ctx.need
    d_input = (d_input * scale).to(in_dtype) if need_input else None
    d_weight = (d_weight * scale).to(w_dtype) if need_weight else None
    d_bias = (d_bias * scale).to(w_dtype) if ctx.has_bias else None
    return d_input, d_weight, d_bias, *(None,) * 9


linear_ce_keep_all.register_autograd(_keep_all_backward, setup_context=_keep_all_setup_context)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def trimmed_linear_cross_entropy_2d(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    opts: TrimOptions,
    share: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The contract of :func:`fused_trim.reference.trimmed_linear_cross_entropy_2d`; differences:
    the backward recomputes a number of rows bounded on the host, ``min(N, max(1, floor(r N +
    0.5)))`` for a float ratio ``r``, all ``N`` rows for a tensor ratio or with ``share``
    (``chunk_size`` rows at a time); rows beyond ``k`` contribute zero."""
    keep_ratio, ratio_t = device_ratio(opts.keep_ratio, input.device)
    code, easiest, chunk_size = int(opts.reduction), bool(opts.keep), opts.chunk_size
    ce_args = (opts.weight, opts.ignore_index, opts.label_smoothing)
    num_rows = input.shape[0]
    params = (input, linear_weight, linear_bias)
    # (a CPU ratio tensor is a host float by now)
    host_opts = opts if ratio_t is not None else opts._replace(keep_ratio=keep_ratio)
    if forms_gradient_in_forward(host_opts, params, share):
        out, losses, kept, k, threshold, *_ = linear_ce_keep_all(
            input, linear_weight, linear_bias, target, opts.weight, easiest, *ce_args[1:], code, chunk_size,
            input.requires_grad, linear_weight.requires_grad,
        )  # fmt: skip
        return out, losses.detach(), kept, k, threshold.detach()

    detached = [None if p is None else p.detach() for p in params]
    losses, w_y, stats = linear_ce_rows(*detached, target, *ce_args)
    if share is not None:
        ratio_t, keep_ratio = share(losses, target != opts.ignore_index), 1.0
    max_kept = host_k(num_rows, keep_ratio) if ratio_t is None else num_rows
    out, kept, k, threshold, _ = linear_ce_trimmed(
        losses, w_y, stats, input, linear_weight, linear_bias, target, opts.weight, keep_ratio, ratio_t, easiest,
        *ce_args[1:], code, max_kept, chunk_size, opts.score_offset,
    )  # fmt: skip
    return out, losses, kept, k, threshold.detach()
