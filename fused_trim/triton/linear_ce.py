"""The LM head fused with trimming on the GPU: ``trimmed_linear_cross_entropy`` for CUDA tensors.

Python orchestration of ``torch.library`` ops (``triton_op``: ``torch.compile(fullgraph=True)``
traces the launches):

1. ``fused_trim::triton_linear_ce_rows``: every row's loss, target weight ``w_y`` and stats (row
   max ``m``, ``log s``) from chunks of rows (:func:`chunk_rows`: balanced, whole 256-row GEMM tiles
   on CUDA): cuBLAS ``addmm``/``mm`` writes each chunk's logits (fp32 accumulation and output) into
   one reused buffer, and the forward row kernel of ``trimmed_cross_entropy``
   (:func:`.ce_forward.ce_forward_kernel`) reads it once. The ``(N, V)`` logits never exist.
2. ``fused_trim::triton_linear_ce_trimmed``: the shared exact-k select on those losses (the
   ``share`` hook of global trimming runs between 1 and 2), the reduction, and a registered autograd
   formula whose backward is
3. ``fused_trim::triton_linear_ce_bwd``: the kept rows are gathered into dense chunks (a fixed
   number of rows in all, bounded on the host: no synchronisation; gathered rows outside K are
   zeroed), their logits recomputed by the same GEMM into the same kind of buffer, the backward row
   kernel (:func:`.ce_backward.ce_backward_kernel`) turns it into ``dlogits`` (relative to the saved
   row max, scaled per row; rounded once to the input dtype for bf16/fp16), and cuBLAS forms
   ``d input`` rows, ``d W += dlogits^T x`` (``addmm`` into the fp32 accumulator) and ``d b``, in
   chunk order (bitwise repeatable), cast to the parameters' dtype at the end.

Why cuBLAS GEMMs and not a tiled Triton kernel: the GEMMs are the whole cost, and cuBLAS runs them
at the hardware's peak; a tiled forward (each program streaming all of ``W`` for its rows) moves
several times the GEMM's bytes through L2 and under-fills the GPU for a few thousand rows. The row
kernels between the GEMMs read and write one chunk, little next to them. The forward statistics
and the backward's recomputed logits then also come from one GEMM engine (at tf32 precision a
``tl.dot`` and cuBLAS round differently, and the recomputed softmax would not sum to 1). The
``d W`` GEMM reduces over rows, which a fused kernel would do with atomics (not deterministic).

With a Python float ``keep_ratio == 1.0``, no ``share``, a scalar reduction and a gradient required,
every valid row is kept and known before the forward: ``fused_trim::triton_linear_ce_keep_all``
computes each chunk's logits once, runs the row kernels of ``trimmed_cross_entropy`` on them (losses,
then the unscaled ``dlogits``) and accumulates the three gradients (3 GEMMs, not 4); its backward
only scales them by ``grad_out / denom``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .._common import (
    TrimOptions,
    acc_dtype,
    double_backward_message,
    first_equal_rows,
    forms_gradient_in_forward,
    host_k,
    kernel_ratio,
    ranking_scores,
    rule_k,
)
from .._groups import group_rows_bound, keep_positions_options, masked_target, select_groups
from .ce_backward import ce_backward_kernel
from .ce_forward import ce_forward_kernel
from .launch import device_guard, device_ratio, float64_bits, head_args, row_config, select_rows

# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


# cuBLAS tiles the rows of a GEMM in blocks of up to 256: chunks of whole blocks on CUDA.
CUDA_CHUNK_MULTIPLE = 256


def chunk_rows(num_rows: int, chunk_size: int, device: torch.device) -> int:
    """Rows per chunk when ``num_rows`` rows are processed at most about ``chunk_size`` at a time.

    Balanced: ``ceil(N / ceil(N / chunk_size))`` rows a chunk, so that the last chunk is not a
    small tail that re-reads all of ``W`` for a few rows; on CUDA rounded up to a multiple of
    ``CUDA_CHUNK_MULTIPLE`` (whole GEMM tiles). Never more than ``num_rows`` (at least 1).
    """
    if num_rows <= 0:
        return 1
    chunks = -(-num_rows // max(chunk_size, 1))
    rows = -(-num_rows // chunks)
    if device.type == "cuda":
        rows = -(-rows // CUDA_CHUNK_MULTIPLE) * CUDA_CHUNK_MULTIPLE
    return min(rows, num_rows)


def _gemm(a: Tensor, b: Tensor, acc: torch.dtype, add: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``add + a @ b`` (``add`` broadcast, or nothing) with an ``acc``-dtype result, into ``out``
    when given (``out`` may be ``add`` itself: accumulation in place, no temporary).

    bf16/fp16 operands go to cuBLAS as stored with fp32 accumulation and output (``out_dtype``);
    on the CPU (the interpreter's tests), which has no such kernel, they are converted first.
    """
    kw = {}
    if a.dtype != acc:
        if a.is_cuda:
            kw["out_dtype"] = acc
        else:
            a, b = a.to(acc), b.to(acc)
    if out is not None:
        kw["out"] = out
    return torch.mm(a, b, **kw) if add is None else torch.addmm(add, a, b, **kw)


def _weight_sum(weight: Tensor | None, label_smoothing: float, acc: torch.dtype, like: Tensor) -> Tensor:
    """The class weights' sum (read by the gradient's smoothing term), or a placeholder pointer."""
    return weight.sum(dtype=acc) if weight is not None and label_smoothing > 0.0 else like


class _ChunkLogits:
    """``F.linear`` of one chunk of rows at a time by cuBLAS into one reused ``(rows, V)`` buffer
    in the accumulation dtype (the bias added by the GEMM, in that dtype), and for bf16/fp16 one
    reused ``(rows, V)`` buffer of the chunk's ``dlogits`` in the input dtype.

    The row kernels are handed the whole buffers (a grid of the chunk's rows): no kernel writes
    through a view, which ``torch.compile``'s mutation tracking of ``wrap_triton`` would have to
    follow; the GEMMs read and write prefix views.
    """

    def __init__(
        self, rows: int, linear_weight: Tensor, linear_bias: Tensor | None, in_dtype: torch.dtype, dlogits: bool
    ) -> None:
        self.acc = acc_dtype(in_dtype)
        dev = linear_weight.device
        self.logits = torch.empty(rows, linear_weight.shape[0], dtype=self.acc, device=dev)
        self.dlogits = (
            torch.empty(rows, linear_weight.shape[0], dtype=in_dtype, device=dev)
            if dlogits and in_dtype != self.acc
            else self.logits
        )
        self.w_t = linear_weight.t()
        self.bias = None if linear_bias is None else linear_bias.to(self.acc)

    def __call__(self, x: Tensor) -> Tensor:
        """The chunk's logits (a prefix view of the buffer)."""
        return _gemm(x, self.w_t, self.acc, add=self.bias, out=self.logits[: x.shape[0]])


def _launch_ce_forward(
    logits: Tensor,
    num_rows: int,
    target: Tensor,
    weight: Tensor | None,
    loss: Tensor,
    stats: Tensor,
    w_y: Tensor,
    ignore_index: int,
    label_smoothing: float,
    head: tuple[float | None, float],
) -> None:
    """The row kernel of ``trimmed_cross_entropy`` on the first ``num_rows`` rows of a buffer of
    fp32 logits: each row's loss, ``w_y`` and stats (a row max or logit of ``+inf`` gives a NaN
    loss, as ``F.cross_entropy``). ``head``: ``(logit_softcap, z_loss)``, applied in the kernel
    (the buffer holds the uncapped logits)."""
    head_bits, head_flags = head_args(*head)
    block_v, warps = row_config(logits.shape[1], logits.element_size())
    wrap_triton(ce_forward_kernel)[(num_rows,)](
        logits,
        logits.stride(0),
        target,
        weight if weight is not None else loss,
        loss,
        stats,
        stats.stride(0),
        w_y,
        logits.shape[1],
        ignore_index,
        float64_bits(label_smoothing),
        *head_bits,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0.0,
        BLOCK_C=block_v,
        **head_flags,
        num_warps=warps,
    )


def _launch_ce_backward(
    logits: Tensor,
    dlogits: Tensor,
    num_rows: int,
    target: Tensor,
    weight: Tensor | None,
    weight_sum: Tensor,
    stats: Tensor,
    kept: Tensor,
    grad_out: Tensor,
    denom: Tensor,
    label_smoothing: float,
    head: tuple[float | None, float],
) -> None:
    """The backward row kernel of ``trimmed_cross_entropy`` on the first ``num_rows`` rows of a
    buffer of fp32 logits: ``dlogits`` (in place when it is ``logits``), zero on rows not
    ``kept``; the per-row arguments are the chunk's (gathered). ``head``: ``(logit_softcap,
    z_loss)``: the z term's gradient and the cap's ``1 - tanh**2`` factor, formed in the kernel."""
    head_bits, head_flags = head_args(*head)
    block_v, warps = row_config(logits.shape[1], logits.element_size())
    wrap_triton(ce_backward_kernel)[(num_rows,)](
        logits,
        logits.stride(0),
        dlogits,
        dlogits.stride(0),
        target,
        weight if weight is not None else stats,
        weight_sum,
        stats,
        stats.stride(0),
        kept,
        grad_out,
        denom,
        logits.shape[1],
        float64_bits(label_smoothing),
        *head_bits,
        PER_ROW_GRAD=grad_out.dim() == 1,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0.0,
        BLOCK_C=block_v,
        **head_flags,
        num_warps=warps,
    )


class _GradAccumulator:
    """``d input`` rows, ``d W += dlogits^T x`` and ``d b += column sums`` from one chunk at a time,
    in the accumulation dtype and in chunk order (bitwise repeatable). ``d W`` accumulates in place
    (``addmm`` with ``beta = 1`` into the fp32 buffer, bf16/fp16 operands as stored on CUDA): no
    ``(V, D)`` temporary. A gradient not needed stays an empty tensor and costs no GEMM."""

    def __init__(
        self, input: Tensor, linear_weight: Tensor, has_bias: bool, d_input: Tensor | None, need_weight: bool
    ) -> None:
        self.acc = acc_dtype(input.dtype)
        dev = input.device
        self.need_input, self.need_weight, self.has_bias = d_input is not None, need_weight, has_bias
        self.d_input = d_input if d_input is not None else torch.empty(0, dtype=input.dtype, device=dev)
        self.d_weight = torch.zeros(linear_weight.shape if need_weight else 0, dtype=self.acc, device=dev)
        self.d_bias = torch.zeros(linear_weight.shape[0] if has_bias else 0, dtype=self.acc, device=dev)

    def add(self, rows: Tensor | slice, x: Tensor, dlogits: Tensor, linear_weight: Tensor, member: Tensor) -> None:
        """One chunk: ``x`` its rows' inputs with every row outside ``member`` (not kept, or
        ignored) already zeroed, ``dlogits`` zero on those rows. Their ``d input`` rows are set to
        exact zeros too (``0 @ W`` is NaN where ``W`` is not finite)."""
        if self.need_input:
            d_x = _gemm(dlogits, linear_weight, self.acc)
            d_x = torch.where(member[:, None], d_x, 0.0).to(self.d_input.dtype)
            if isinstance(rows, slice):
                self.d_input[rows] = d_x
            else:
                self.d_input.index_copy_(0, rows, d_x)
        if self.need_weight:
            _gemm(dlogits.t(), x, self.acc, add=self.d_weight, out=self.d_weight)
        if self.has_bias:
            self.d_bias += dlogits.sum(0, dtype=self.acc)


# ------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------


def _chunk_forward(
    gemm: _ChunkLogits,
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    head: tuple[float | None, float],
) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk's logits into ``gemm``'s buffer, then its rows' ``(loss, w_y, stats)`` (chunk-sized)."""
    gemm(x)
    rows, acc, dev = x.shape[0], gemm.acc, x.device
    loss = torch.empty(rows, dtype=acc, device=dev)
    w_y = torch.empty(rows, dtype=acc, device=dev)
    stats = torch.empty(2, rows, dtype=acc, device=dev)
    _launch_ce_forward(gemm.logits, rows, target, weight, loss, stats, w_y, ignore_index, label_smoothing, head)
    return loss, w_y, stats


def _cat(parts: list[Tensor], empty: Tensor, dim: int = 0) -> Tensor:
    return torch.cat(parts, dim) if parts else empty


@triton_op("fused_trim::triton_linear_ce_rows", mutates_args=())
def linear_ce_rows(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    chunk_size: int,
    logit_softcap: float | None = None,
    z_loss: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Every row's ``(loss, w_y, stats)`` of ``F.linear(input, linear_weight, linear_bias)``:
    ``(N,)``, ``(N,)`` and ``(2, N)`` (row max, ``log s``), in the accumulation dtype. With
    ``logit_softcap`` / ``z_loss`` the row kernel caps the logits it reads and adds the z term.

    The logits exist one chunk of rows at a time (:func:`chunk_rows` of ``chunk_size``): a cuBLAS
    GEMM into one reused buffer, then the row kernel of ``trimmed_cross_entropy`` on it. Operands
    are read with their strides (views of larger tensors included); the backward recomputes its
    logits with the same GEMM, so its softmax is that of these statistics.
    """
    with device_guard(input):
        num_rows, dev = input.shape[0], input.device
        acc = acc_dtype(input.dtype)
        target = target.contiguous()
        weight = weight.contiguous() if weight is not None else None
        rows = chunk_rows(num_rows, chunk_size, dev)
        gemm = _ChunkLogits(rows, linear_weight, linear_bias, input.dtype, dlogits=False)
        parts = []
        for start in range(0, num_rows, rows):
            part = slice(start, min(start + rows, num_rows))
            head = (logit_softcap, z_loss)
            parts.append(_chunk_forward(gemm, input[part], target[part], weight, ignore_index, label_smoothing, head))
        empty = torch.empty(0, dtype=acc, device=dev)
        loss, w_y, stats = (list(p) for p in zip(*parts, strict=True)) if parts else ([], [], [])
        return _cat(loss, empty), _cat(w_y, empty), _cat(stats, empty.view(2, 0), dim=1)


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
    result_dtype: torch.dtype | None = None,
    logit_softcap: float | None = None,
    z_loss: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Selection and reduction on the rows op's losses: ``(out, kept, k, threshold, denom)``.
    ``logit_softcap`` and ``z_loss`` are those of the losses, for the backward.

    ``input``, ``linear_weight`` and ``linear_bias`` are read only by the backward, which
    recomputes at most ``max_kept`` rows, ``chunk_size`` at a time. ``score_offset``: rank
    ``losses - score_offset`` (the select reads it in its one pass). ``out`` and ``threshold`` are
    in ``result_dtype`` (``None``: the input's).
    """
    with device_guard(input):
        return select_rows(
            losses,
            w_y,
            target.contiguous(),
            input.dtype if result_dtype is None else result_dtype,
            keep_ratio,
            keep_ratio_t,
            easiest,
            ignore_index,
            reduction,
            score_offset=score_offset,
        )


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
    logit_softcap: float | None = None,
    z_loss: float = 0.0,
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
        rows_per_chunk = chunk_rows(max_kept, chunk_size, input.device)
        gemm = _ChunkLogits(rows_per_chunk, linear_weight, linear_bias, input.dtype, dlogits=True)
        for start in range(0, max_kept, rows_per_chunk):
            rows = order[start : start + rows_per_chunk]
            kept_c = kept.index_select(0, rows)
            # The bound max_kept counts ignored rows: rows gathered past the kept ones are zeroed, so
            # that a NaN/inf hidden state outside K never meets the GEMMs (0 * NaN is NaN in d W).
            x = input.index_select(0, rows).masked_fill_(~kept_c[:, None], 0)
            gemm(x)
            _launch_ce_backward(
                gemm.logits,
                gemm.dlogits,
                x.shape[0],
                target.index_select(0, rows),
                weight,
                weight_sum,
                stats.index_select(1, rows),
                kept_c,
                grad_out.index_select(0, rows) if per_row else grad_out,
                denom,
                label_smoothing,
                (logit_softcap, z_loss),
            )
            grads.add(rows, x, gemm.dlogits[: x.shape[0]], linear_weight, kept_c)
        return grads.d_input, grads.d_weight.to(linear_weight.dtype), grads.d_bias.to(input.dtype)


def _trimmed_setup_context(ctx, inputs, output) -> None:
    _, _, stats, input, linear_weight, linear_bias, target, weight = inputs[:8]
    label_smoothing, _, max_kept, chunk_size = inputs[12:16]
    _, kept, _, _, denom = output
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, stats, kept, denom)
    ctx.label_smoothing, ctx.max_kept, ctx.chunk_size = label_smoothing, max_kept, chunk_size
    ctx.head = inputs[18:20]


def _trimmed_backward(ctx, grad_out, *_unused):
    input, linear_weight, linear_bias, target, weight, stats, kept, denom = ctx.saved_tensors
    need_input, need_weight = ctx.needs_input_grad[3:5]
    d_input, d_weight, d_bias = linear_ce_bwd(
        grad_out,
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        stats,
        kept,
        denom,
        ctx.label_smoothing,
        ctx.max_kept,
        ctx.chunk_size,
        need_input,
        need_weight,
        *ctx.head,
    )
    grads = (d_input if need_input else None, d_weight if need_weight else None)
    return (None,) * 3 + (*grads, d_bias if linear_bias is not None else None) + (None,) * 14


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
    result_dtype: torch.dtype | None = None,
    logit_softcap: float | None = None,
    z_loss: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Every valid row kept (``keep_ratio == 1``, ``reduction`` mean or sum): the losses and the
    unscaled gradient in one pass over chunks of rows, 3 GEMMs a chunk (the row kernels of
    ``trimmed_cross_entropy`` on each chunk's fp32 logits).

    Returns ``(out, losses, kept, k, threshold, denom, d_input, d_weight, d_bias, lse)`` (``out``
    and ``threshold`` in ``result_dtype``, ``None``: the input's), the gradients in the accumulation
    dtype and unscaled (the backward multiplies them by ``grad_out / denom``), ``lse`` the rows'
    logsumexp (0 on ignored rows). ``logit_softcap`` / ``z_loss``: in the losses and the gradient.
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
        d_input = torch.empty(input.shape, dtype=acc, device=dev) if need_input else None
        grads = _GradAccumulator(input, linear_weight, linear_bias is not None, d_input, need_weight)
        rows_per_chunk = chunk_rows(num_rows, chunk_size, dev)
        gemm = _ChunkLogits(rows_per_chunk, linear_weight, linear_bias, input.dtype, dlogits=True)
        losses, w_y, lse = [], [], []
        head = (logit_softcap, z_loss)
        for start in range(0, num_rows, rows_per_chunk):
            rows = slice(start, min(start + rows_per_chunk, num_rows))
            valid_c = valid[rows]
            # Ignored rows contribute nothing: zeroed before the GEMMs (0 * NaN would reach d W).
            x = torch.where(valid_c[:, None], input[rows], 0)
            loss_c, w_y_c, stats_c = _chunk_forward(gemm, x, target[rows], weight, ignore_index, label_smoothing, head)
            _launch_ce_backward(
                gemm.logits,
                gemm.dlogits,
                x.shape[0],
                target[rows],
                weight,
                weight_sum,
                stats_c,
                valid_c,
                one,
                one,
                label_smoothing,
                head,
            )
            grads.add(rows, x, gemm.dlogits[: x.shape[0]], linear_weight, valid_c)
            losses.append(loss_c)
            w_y.append(w_y_c)
            lse.append(stats_c[0] + stats_c[1])
        empty = torch.empty(0, dtype=acc, device=dev)
        losses = _cat(losses, empty)
        w_y = _cat(w_y, empty)
        lse = _cat(lse, empty)
        out, kept, k, threshold, denom = select_rows(
            losses,
            w_y,
            target,
            input.dtype if result_dtype is None else result_dtype,
            1.0,
            None,
            easiest,
            ignore_index,
            reduction,
        )
        return out, losses, kept, k, threshold, denom, grads.d_input, grads.d_weight, grads.d_bias, lse


def _keep_all_setup_context(ctx, inputs, output) -> None:
    ctx.has_bias = inputs[2] is not None
    ctx.need = inputs[10:12]
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    _, _, _, k, _, denom, d_input, d_weight, d_bias, _ = output
    ctx.save_for_backward(k, denom, d_input, d_weight, d_bias)


def _scaled(grad: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``grad * scale`` in ``dtype``, scaled and rounded in one pass (no accumulation-dtype
    temporary); the saved ``grad`` is left as it is (a second backward with ``retain_graph``)."""
    return torch.mul(grad, scale, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))


def _keep_all_backward(ctx, grad_out, *_unused):
    """Scales the forward's gradients by ``grad_out / denom``. Peak memory of the backward: the
    saved accumulation-dtype gradients (``d W`` and ``d input`` in fp32 for bf16/fp16, which the
    forward already held) plus the returned ones in the parameters' dtypes."""
    if torch.is_grad_enabled():  # create_graph=True: the saved gradients are constants here
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
    k, denom, d_input, d_weight, d_bias = ctx.saved_tensors
    # No row kept (every target ignored, a NaN mean): zero gradients as F.cross_entropy's, not 0 * (g / 0).
    scale = torch.where(k > 0, grad_out.to(denom.dtype) / denom, 0.0)
    in_dtype, w_dtype = ctx.dtypes
    need_input, need_weight = ctx.need
    d_input = _scaled(d_input, scale, in_dtype) if need_input else None
    d_weight = _scaled(d_weight, scale, w_dtype) if need_weight else None
    d_bias = _scaled(d_bias, scale, w_dtype) if ctx.has_bias else None
    return d_input, d_weight, d_bias, *(None,) * 12


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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The contract of :func:`fused_trim.reference.trimmed_linear_cross_entropy_2d`; differences:
    the backward recomputes a number of rows bounded on the host, ``min(N, max(1, floor(r N +
    0.5)))`` for a float ratio ``r``, ``min(N, c)`` for a Python int ``keep_count`` ``c``, all ``N``
    rows for a tensor ratio or count, a threshold or with ``share`` (``chunk_size`` rows at a time);
    rows beyond ``k`` contribute zero."""
    keep_ratio, ratio_t = device_ratio(kernel_ratio(opts), input.device)
    code, easiest, chunk_size = int(opts.reduction), bool(opts.keep), opts.chunk_size
    ce_args = (opts.weight, opts.ignore_index, opts.label_smoothing)
    head = (opts.logit_softcap, float(opts.z_loss))
    num_rows = input.shape[0]
    params = (input, linear_weight, linear_bias)
    # (a CPU ratio tensor is a host float by now)
    host_opts = opts if ratio_t is not None else opts._replace(keep_ratio=keep_ratio)
    if forms_gradient_in_forward(host_opts, params, share):
        out, losses, kept, k, threshold, *_, lse = linear_ce_keep_all(
            input,
            linear_weight,
            linear_bias,
            target,
            opts.weight,
            easiest,
            *ce_args[1:],
            code,
            chunk_size,
            input.requires_grad,
            linear_weight.requires_grad,
            opts.result_dtype,
            *head,
        )
        return out, losses.detach(), kept, k, threshold.detach(), lse

    detached = [None if p is None else p.detach() for p in params]
    losses, w_y, stats = linear_ce_rows(*detached, target, *ce_args, chunk_size, *head)
    # Bitwise equal rows (duplicated tokens) tie, wherever cuBLAS placed them in a chunk's tile.
    first = first_equal_rows(detached[0], target)
    losses, w_y, stats = losses[first], w_y[first], stats[:, first]
    groups = None
    if opts.group_ids is not None:
        # The groups' selection, then every valid row of the kept groups (the target masked to them).
        groups = select_groups(losses, target != opts.ignore_index, opts, share)
        max_kept = num_rows if share is not None else group_rows_bound(opts, num_rows)  # (a rank's share: any)
        target = masked_target(target, groups[0], opts.ignore_index)
        opts = keep_positions_options(opts)
        keep_ratio, ratio_t = 1.0, None
    elif share is not None:
        ratio_t, keep_ratio = share(losses, target != opts.ignore_index), 1.0
    elif opts.keep_threshold is not None:  # k from the losses, passed on as an exact count
        ratio_t = rule_k(ranking_scores(losses, opts.score_offset), target != opts.ignore_index, opts)
    if groups is not None:
        pass
    elif ratio_t is None:
        max_kept = host_k(num_rows, keep_ratio)
    elif share is None and opts.keep_count is not None and not isinstance(opts.keep_count, Tensor):
        max_kept = min(num_rows, opts.keep_count)  # a host count bounds k too
    else:
        max_kept = num_rows
    out, kept, k, threshold, _ = linear_ce_trimmed(
        losses,
        w_y,
        stats,
        input,
        linear_weight,
        linear_bias,
        target,
        opts.weight,
        keep_ratio,
        ratio_t,
        easiest,
        *ce_args[1:],
        code,
        max_kept,
        chunk_size,
        opts.score_offset,
        opts.result_dtype,
        *head,
    )
    if groups is not None:
        k, threshold = groups[1], groups[2].to(threshold.dtype)
    return out, losses, kept, k, threshold.detach(), stats[0] + stats[1]
