"""The cross-entropy op: the Triton kernels glued into two ``torch.library`` ops with a registered
autograd formula, and the backend's entry point.

``fused_trim::triton_trimmed_ce_fwd`` runs the forward and select kernels,
``fused_trim::triton_trimmed_ce_bwd`` the backward kernel. Registered with
``torch.library.triton_op``, so ``torch.compile(fullgraph=True)`` traces into the kernel launches
instead of breaking the graph.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .._common import Reduction, TrimOptions, acc_dtype, double_backward_message, kernel_ratio, out_dtype
from .._groups import reduce_kept, select_groups
from .ce_backward import ce_backward_kernel
from .ce_backward_spatial import ce_backward_spatial_kernel
from .ce_forward import ce_forward_kernel
from .ce_forward_spatial import ce_forward_spatial_kernel
from .launch import (
    device_guard,
    device_ratio,
    device_threshold,
    float64_bits,
    head_args,
    row_config,
    select_rows,
    spatial_config,
)


@triton_op("fused_trim::triton_trimmed_ce_fwd", mutates_args=())
def trimmed_ce_fwd(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    keep_ratio: float,
    keep_ratio_t: Tensor | None,
    easiest: bool,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    score_offset: Tensor | None = None,
    result_dtype: torch.dtype | None = None,
    keep_threshold: Tensor | None = None,
    min_kept: int = 0,
    logit_softcap: float | None = None,
    z_loss: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward on ``input (M, C)`` or ``(N, C, S)``: ``(out, losses, kept, k, threshold, stats, denom)``.

    The spatial layout ``(N, C, S)`` is read in place (samples in ``n * S + s`` order, ``target``
    flat ``(N * S,)``); every per-sample output is flat ``(N * S,)``.

    ``keep_ratio_t``, when given, replaces ``keep_ratio``: a 0-dim float tensor (a ratio) or int64
    tensor (an exact count), read on the device. ``stats`` (``(2, M)``: each sample's max logit and
    ``log sum_c exp(x_c - max)``, so that the backward keeps the relative precision of a small loss)
    and ``denom`` (the divisor of the mean) are saved for the backward. ``score_offset`` (flat
    ``(M,)`` or ``None``): rank ``losses - score_offset`` (see :func:`select_rows`). ``out`` and
    ``threshold`` are in ``result_dtype`` (``None``: the input's).
    ``keep_threshold`` (a 0-dim float64 tensor on the input's device, or ``None``) with
    ``min_kept``: the threshold rule instead of the ratio (see :func:`select_rows`).
    ``logit_softcap`` (``c`` or ``None``) and ``z_loss`` (``λ``): every logit is ``c * tanh(x /
    c)`` first, each loss gains ``λ lse**2``; ``stats`` are then the capped logits'.
    """
    with device_guard(input):
        return _forward(
            input,
            target,
            weight,
            keep_ratio,
            keep_ratio_t,
            easiest,
            ignore_index,
            label_smoothing,
            reduction,
            score_offset,
            input.dtype if result_dtype is None else result_dtype,
            keep_threshold,
            min_kept,
            logit_softcap,
            z_loss,
        )


def _forward(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    keep_ratio: float,
    keep_ratio_t: Tensor | None,
    easiest: bool,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    score_offset: Tensor | None,
    result_dtype: torch.dtype,
    keep_threshold: Tensor | None,
    min_kept: int,
    logit_softcap: float | None,
    z_loss: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The body of :func:`trimmed_ce_fwd`, on the input's device."""
    head_bits, head_flags = head_args(logit_softcap, z_loss)
    spatial = input.dim() == 3
    if input.stride(-1) != 1:
        input = input.contiguous()
    num_classes = input.shape[1] if spatial else input.shape[-1]
    num_rows = input.shape[0] * input.shape[2] if spatial else input.shape[0]
    target = target.contiguous()
    acc = acc_dtype(input.dtype)
    dev = input.device
    loss = torch.empty(num_rows, dtype=acc, device=dev)
    stats = torch.empty(2, num_rows, dtype=acc, device=dev)
    w_y = torch.empty(num_rows, dtype=acc, device=dev)
    has_weight = weight is not None
    if has_weight:
        weight = weight.contiguous()
    if spatial:
        num_pixels = input.shape[2]
        block_c, block_s, warps = spatial_config(num_classes, num_pixels, input.element_size())
        wrap_triton(ce_forward_spatial_kernel)[(input.shape[0] * triton.cdiv(num_pixels, block_s),)](
            input,
            input.stride(0),
            input.stride(1),
            target,
            weight if has_weight else loss,
            loss,
            stats,
            num_rows,
            w_y,
            num_classes,
            num_pixels,
            ignore_index,
            float64_bits(label_smoothing),
            *head_bits,
            HAS_WEIGHT=has_weight,
            HAS_SMOOTHING=label_smoothing > 0.0,
            BLOCK_C=block_c,
            BLOCK_S=block_s,
            **head_flags,
            num_warps=warps,
        )
    else:
        block_c, warps = row_config(num_classes, input.element_size(), logit_softcap is not None)
        wrap_triton(ce_forward_kernel)[(num_rows,)](
            input,
            input.stride(0),
            target,
            weight if has_weight else loss,
            loss,
            stats,
            num_rows,
            w_y,
            num_classes,
            ignore_index,
            float64_bits(label_smoothing),
            *head_bits,
            HAS_WEIGHT=has_weight,
            HAS_SMOOTHING=label_smoothing > 0.0,
            BLOCK_C=block_c,
            **head_flags,
            num_warps=warps,
        )

    out, kept, k, threshold, denom = select_rows(
        loss,
        w_y,
        target,
        result_dtype,
        keep_ratio,
        keep_ratio_t,
        easiest,
        ignore_index,
        reduction,
        score_offset=score_offset,
        keep_threshold=keep_threshold,
        min_kept=min_kept,
    )
    return out, loss, kept, k, threshold, stats, denom


@triton_op("fused_trim::triton_trimmed_ce_bwd", mutates_args=())
def trimmed_ce_bwd(
    grad_out: Tensor,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    kept: Tensor,
    denom: Tensor,
    label_smoothing: float,
    logit_softcap: float | None = None,
    z_loss: float = 0.0,
) -> Tensor:
    """Gradient of ``out`` with respect to ``input`` (``(M, C)`` or ``(N, C, S)``, the gradient
    in the same shape); exact zeros on samples outside the kept set."""
    with device_guard(input):
        return _backward_grad(
            grad_out, input, target, weight, stats, kept, denom, label_smoothing, logit_softcap, z_loss
        )


def _backward_grad(
    grad_out: Tensor,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    kept: Tensor,
    denom: Tensor,
    label_smoothing: float,
    logit_softcap: float | None,
    z_loss: float,
) -> Tensor:
    """The body of :func:`trimmed_ce_bwd`, on the input's device."""
    head_bits, head_flags = head_args(logit_softcap, z_loss)
    if input.stride(-1) != 1:
        input = input.contiguous()
    grad = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    has_weight = weight is not None
    has_smoothing = label_smoothing > 0.0
    weight_sum = weight.sum(dtype=stats.dtype) if has_weight and has_smoothing else stats
    num_samples = stats.shape[1]
    if input.dim() == 3:
        num_images, num_classes, num_pixels = input.shape
        block_c, block_s, warps = spatial_config(num_classes, num_pixels, input.element_size())
        wrap_triton(ce_backward_spatial_kernel)[(num_images * triton.cdiv(num_pixels, block_s),)](
            input,
            input.stride(0),
            input.stride(1),
            grad,
            grad.stride(0),
            grad.stride(1),
            target.contiguous(),
            weight.contiguous() if has_weight else stats,
            weight_sum,
            stats,
            num_samples,
            kept,
            grad_out.contiguous(),
            denom,
            num_classes,
            num_pixels,
            float64_bits(label_smoothing),
            *head_bits,
            PER_SAMPLE_GRAD=grad_out.dim() == 1,
            HAS_WEIGHT=has_weight,
            HAS_SMOOTHING=has_smoothing,
            BLOCK_C=block_c,
            BLOCK_S=block_s,
            **head_flags,
            num_warps=warps,
        )
        return grad
    num_rows, num_classes = input.shape
    block_c, warps = row_config(num_classes, input.element_size(), logit_softcap is not None)
    wrap_triton(ce_backward_kernel)[(num_rows,)](
        input,
        input.stride(0),
        grad,
        grad.stride(0),
        target.contiguous(),
        weight.contiguous() if has_weight else stats,
        weight_sum,
        stats,
        num_samples,
        kept,
        grad_out.contiguous(),
        denom,
        num_classes,
        float64_bits(label_smoothing),
        *head_bits,
        PER_ROW_GRAD=grad_out.dim() == 1,
        HAS_WEIGHT=has_weight,
        HAS_SMOOTHING=has_smoothing,
        BLOCK_C=block_c,
        **head_flags,
        num_warps=warps,
    )
    return grad


def _setup_context(ctx, inputs, output) -> None:
    input, target, weight, _, _, _, _, label_smoothing = inputs[:8]
    _, _, kept, _, _, stats, denom = output
    ctx.save_for_backward(input, target, weight, stats, kept, denom)
    ctx.label_smoothing = label_smoothing
    ctx.head = inputs[13:15]


def _backward(ctx, grad_out, *_unused):
    input, target, weight, stats, kept, denom = ctx.saved_tensors
    grad = trimmed_ce_bwd(grad_out, input, target, weight, stats, kept, denom, ctx.label_smoothing, *ctx.head)
    return (grad,) + (None,) * 14


def _double_backward(ctx, *grads):
    raise RuntimeError(double_backward_message("trimmed_cross_entropy"))


trimmed_ce_fwd.register_autograd(_backward, setup_context=_setup_context)
# The gradient is not differentiable again here: say so clearly when a second backward reaches it.
trimmed_ce_bwd.register_autograd(_double_backward)


class _KeptRowsLoss(torch.autograd.Function):
    """A loss formed outside the op over a given kept set, with the op's backward
    (:func:`trimmed_ce_bwd`: rows outside ``kept`` get exact zeros without a read of their logits;
    a scalar upstream gradient is divided by ``denom``)."""

    @staticmethod
    def forward(ctx, input, out, target, weight, stats, kept, denom, label_smoothing, logit_softcap, z_loss):  # noqa: D102
        ctx.save_for_backward(input, target, weight, stats, kept, denom)
        ctx.label_smoothing = label_smoothing
        ctx.head = (logit_softcap, z_loss)
        ctx.mark_non_differentiable(target, stats, kept, denom)
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        input, target, weight, stats, kept, denom = ctx.saved_tensors
        grad = trimmed_ce_bwd(grad_out, input, target, weight, stats, kept, denom, ctx.label_smoothing, *ctx.head)
        return (grad,) + (None,) * 9


def _grouped_cross_entropy_2d(
    input: Tensor, target: Tensor, opts: TrimOptions
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Group trimming (``opts.group_ids``): every row's loss from the forward kernel (keep all, no
    reduction, one read of the logits), the groups' selection
    (:func:`fused_trim._groups.select_groups`), the reduction over the kept rows, and the backward
    kernel over them."""
    with torch.no_grad():
        _, losses, _, _, _, stats, _ = trimmed_ce_fwd(
            input.detach(),
            target,
            opts.weight,
            1.0,
            None,
            bool(opts.keep),
            opts.ignore_index,
            opts.label_smoothing,
            int(Reduction.NONE),
            None,
            opts.result_dtype,
            None,
            0,
            opts.logit_softcap,
            float(opts.z_loss),
        )
    kept, k, threshold = select_groups(losses, target != opts.ignore_index, opts)
    dtype = out_dtype(opts, input.dtype)
    out, _, denom = reduce_kept(losses, kept, target, opts, dtype)
    head = (opts.logit_softcap, float(opts.z_loss))
    out = _KeptRowsLoss.apply(input, out, target, opts.weight, stats, kept, denom, opts.label_smoothing, *head)
    return out, losses, kept, k, threshold.to(dtype), stats[0] + stats[1]


def trimmed_cross_entropy_2d(
    input: Tensor, target: Tensor, opts: TrimOptions
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The contract of :func:`fused_trim.reference.trimmed_cross_entropy_2d`; differences: the
    spatial layout ``(N, C, S)`` is read in place, and ``keep_ratio`` may be a 0-dim tensor on
    another device only when it is floating (a ratio, read on the host)."""
    if opts.group_ids is not None:
        return _grouped_cross_entropy_2d(input, target, opts)
    keep_ratio, ratio_t = device_ratio(kernel_ratio(opts), input.device)
    out, losses, kept, k, threshold, stats, _ = trimmed_ce_fwd(
        input,
        target,
        opts.weight,
        float(keep_ratio),
        ratio_t,
        bool(opts.keep),
        opts.ignore_index,
        opts.label_smoothing,
        int(opts.reduction),
        opts.score_offset,
        opts.result_dtype,
        device_threshold(opts.keep_threshold, input.device),
        int(opts.min_kept),
        opts.logit_softcap,
        float(opts.z_loss),
    )
    return out, losses.detach(), kept, k, threshold.detach(), (stats[0] + stats[1]).detach()
