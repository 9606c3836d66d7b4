"""The Triton kernels glued into two ``torch.library`` ops with a registered autograd formula.

``fused_trim::triton_trimmed_ce_fwd`` runs the forward and select kernels,
``fused_trim::triton_trimmed_ce_bwd`` the backward kernel. Registered with
``torch.library.triton_op``, so ``torch.compile(fullgraph=True)`` traces into the kernel launches
instead of breaking the graph.
"""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .ce_backward import ce_backward_kernel
from .ce_backward_spatial import ce_backward_spatial_kernel
from .ce_forward import ce_forward_kernel
from .ce_forward_spatial import ce_forward_spatial_kernel
from .grid_select import grid_select
from .select import select_kernel

REDUCTION_CODE = {"mean": 0, "sum": 1, "none": 2}
DOUBLE_BACKWARD_MESSAGE = "double backward of trimmed_cross_entropy is not supported; use backend='reference'"

# Up to this many rows one program selects (one launch; ~0.2 s interpreted at 65536 rows).
# Beyond it (segmentation maps, large token batches) the select spreads over a grid of programs
# of GRID_BLOCK rows each: per 8-bit digit a histogram launch and a one-program pick, then tie
# counts, their prefix sums, the kept flags with partial sums, and a fixed-order final sum.
SINGLE_PROGRAM_MAX_ROWS = 65536
GRID_BLOCK = 2048


def float64_bits(value: float) -> int:
    """A host float as its float64 bit pattern: Triton passes float scalars as fp32, bits stay exact."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 logits, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_config(num_classes: int, element_size: int) -> tuple[int, int]:
    """``(BLOCK_C, num_warps)`` of the row kernels: the column block and its warps."""
    max_block = 16384 // max(element_size, 2)  # 32 KiB of logits in flight per program
    block = min(triton.next_power_of_2(num_classes), max_block)
    num_warps = 1 if block <= 256 else 4 if block <= 2048 else 8
    return block, num_warps


def spatial_config(num_classes: int, num_pixels: int, element_size: int) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_S, num_warps)`` of the spatial kernels: ``[BLOCK_C, BLOCK_S]`` tiles.

    ``BLOCK_S`` pixels are contiguous in memory (one coalesced row of the tile per class): 128
    (256 when at most 8 classes leave room), fewer only for a smaller image. Warps are chosen for
    about 64 bytes of accumulated tile per thread (16 fp32, 8 fp64 values: 32x128 fp32 tiles at 4
    warps took up to 182 registers in an sm_90 compile, 16x128 ones 89), and at least one per 64
    pixels for the per-pixel state (running max and sum, target, ...).
    """
    block_c = min(triton.next_power_of_2(num_classes), 16)
    block_s = min(max(triton.next_power_of_2(num_pixels), 16), 256 if block_c <= 8 else 128)
    acc_bytes = 8 if element_size >= 8 else 4
    num_warps = min(8, max(1, block_c * block_s * acc_bytes // 2048, block_s // 64))
    return block_c, block_s, num_warps


def device_guard(tensor: Tensor) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(tensor.device)`` for a CUDA tensor (Triton launches on the current
    device and its stream, not the tensors'); a no-op elsewhere (the CPU interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def select_block(num_rows: int) -> int:
    """Rows per iteration of the single selection program."""
    return min(max(triton.next_power_of_2(num_rows), 128), 2048)


def select_rows(
    loss: Tensor,
    w_y: Tensor,
    target: Tensor,
    out_dtype: torch.dtype,
    keep_ratio: float,
    keep_ratio_t: Tensor | None,
    hardest: bool,
    ignore_index: int,
    reduction: int,
    score_offset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The exact-k select on per-row losses (one program, or the grid select past
    ``SINGLE_PROGRAM_MAX_ROWS``): ``(out, kept, k, threshold, denom)``, ``out`` and ``threshold``
    in ``out_dtype``. Shared by the cross-entropy and LM-head forwards.

    ``score_offset`` (``(num_rows,)``, any float dtype, on the losses' device, or ``None``): rank
    ``loss - score_offset`` (formed in the losses' dtype) instead; ``threshold`` is then the k-th
    score; ``out`` and ``denom`` are still of the plain losses."""
    num_rows, dev = loss.shape[0], loss.device
    has_offset = score_offset is not None
    if has_offset:
        score_offset = score_offset.contiguous()
    ratio_on_device = keep_ratio_t is not None
    kept = torch.empty(num_rows, dtype=torch.bool, device=dev)
    out = torch.empty(num_rows if reduction == 2 else (), dtype=out_dtype, device=dev)
    # The kernel's two outputs get distinct buffers (the per-row losses and the scalar result): one
    # buffer passed twice would leave torch.compile's mutation analysis to guess which is written.
    unused = torch.empty(1, dtype=out_dtype, device=dev)
    per_row, result = (out, unused) if reduction == 2 else (unused, out)
    k = torch.empty((), dtype=torch.int64, device=dev)
    threshold = torch.empty((), dtype=out_dtype, device=dev)
    denom = torch.empty((), dtype=loss.dtype, device=dev)
    ratio_bits = float64_bits(keep_ratio)
    ratio_ptr = keep_ratio_t if ratio_on_device else loss
    if num_rows <= SINGLE_PROGRAM_MAX_ROWS:
        wrap_triton(select_kernel)[(1,)](
            loss, w_y, target, kept, per_row, result, k, threshold, denom, num_rows, ignore_index, ratio_bits,
            ratio_ptr, RATIO_FROM_PTR=ratio_on_device, KEEP_ALL=not ratio_on_device and keep_ratio == 1.0,
            HARDEST=hardest, REDUCTION=reduction, BLOCK=select_block(num_rows), HAS_OFFSET=has_offset,
            offset_ptr=score_offset, num_warps=4,
        )  # fmt: skip
    else:
        grid_select(
            loss, w_y, target, kept, out, k, threshold, denom, ignore_index, ratio_bits, ratio_ptr,
            ratio_on_device, hardest, reduction, GRID_BLOCK, offset=score_offset,
        )  # fmt: skip
    return out, kept, k, threshold, denom


@triton_op("fused_trim::triton_trimmed_ce_fwd", mutates_args=())
def trimmed_ce_fwd(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    keep_ratio: float,
    keep_ratio_t: Tensor | None,
    hardest: bool,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    score_offset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward on ``input (M, C)`` or ``(N, C, S)``: ``(out, losses, kept, k, threshold, stats, denom)``.

    The spatial layout ``(N, C, S)`` is read in place (samples in ``n * S + s`` order, ``target``
    flat ``(N * S,)``); every per-sample output is flat ``(N * S,)``.

    ``keep_ratio_t``, when given, replaces ``keep_ratio``: a 0-dim float tensor (a ratio) or int64
    tensor (an exact count), read on the device. ``stats`` (``(2, M)``: each sample's max logit and
    ``log sum_c exp(x_c - max)``, so that the backward keeps the relative precision of a small loss)
    and ``denom`` (the divisor of the mean) are saved for the backward. ``score_offset`` (flat
    ``(M,)`` or ``None``): rank ``losses - score_offset`` (see :func:`select_rows`).
    """
    with device_guard(input):
        return _forward(
            input, target, weight, keep_ratio, keep_ratio_t, hardest, ignore_index, label_smoothing, reduction,
            score_offset,
        )  # fmt: skip


def _forward(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    keep_ratio: float,
    keep_ratio_t: Tensor | None,
    hardest: bool,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    score_offset: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The body of :func:`trimmed_ce_fwd`, on the input's device."""
    spatial = input.dim() == 3
    if input.stride(-1) != 1:
        input = input.contiguous()
    num_classes = input.shape[1] if spatial else input.shape[-1]
    num_rows = input.shape[0] * input.shape[2] if spatial else input.shape[0]
    target = target.contiguous()
    acc = accumulation_dtype(input.dtype)
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
            input, input.stride(0), input.stride(1), target, weight if has_weight else loss, loss, stats, num_rows,
            w_y, num_classes, num_pixels, ignore_index, float64_bits(label_smoothing),
            HAS_WEIGHT=has_weight, HAS_SMOOTHING=label_smoothing > 0.0, BLOCK_C=block_c, BLOCK_S=block_s,
            num_warps=warps,
        )  # fmt: skip
    else:
        block_c, warps = row_config(num_classes, input.element_size())
        wrap_triton(ce_forward_kernel)[(num_rows,)](
            input, input.stride(0), target, weight if has_weight else loss, loss, stats, num_rows, w_y,
            num_classes, ignore_index, float64_bits(label_smoothing),
            HAS_WEIGHT=has_weight, HAS_SMOOTHING=label_smoothing > 0.0, BLOCK_C=block_c, num_warps=warps,
        )  # fmt: skip

    out, kept, k, threshold, denom = select_rows(
        loss, w_y, target, input.dtype, keep_ratio, keep_ratio_t, hardest, ignore_index, reduction,
        score_offset=score_offset,
    )  # fmt: skip
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
) -> Tensor:
    """Gradient of ``out`` with respect to ``input`` (``(M, C)`` or ``(N, C, S)``, the gradient
    in the same shape); exact zeros on samples outside the kept set."""
    with device_guard(input):
        return _backward_grad(grad_out, input, target, weight, stats, kept, denom, label_smoothing)


def _backward_grad(
    grad_out: Tensor,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    kept: Tensor,
    denom: Tensor,
    label_smoothing: float,
) -> Tensor:
    """The body of :func:`trimmed_ce_bwd`, on the input's device."""
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
            input, input.stride(0), input.stride(1), grad, grad.stride(0), grad.stride(1), target.contiguous(),
            weight.contiguous() if has_weight else stats, weight_sum, stats, num_samples, kept, grad_out.contiguous(),
            denom, num_classes, num_pixels, float64_bits(label_smoothing),
            PER_SAMPLE_GRAD=grad_out.dim() == 1, HAS_WEIGHT=has_weight, HAS_SMOOTHING=has_smoothing,
            BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps,
        )  # fmt: skip
        return grad
    num_rows, num_classes = input.shape
    block_c, warps = row_config(num_classes, input.element_size())
    wrap_triton(ce_backward_kernel)[(num_rows,)](
        input, input.stride(0), grad, grad.stride(0), target.contiguous(),
        weight.contiguous() if has_weight else stats, weight_sum, stats, num_samples, kept, grad_out.contiguous(),
        denom, num_classes, float64_bits(label_smoothing),
        PER_ROW_GRAD=grad_out.dim() == 1, HAS_WEIGHT=has_weight, HAS_SMOOTHING=has_smoothing,
        BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return grad


def _setup_context(ctx, inputs, output) -> None:
    input, target, weight, _, _, _, _, label_smoothing, _, _ = inputs
    _, _, kept, _, _, stats, denom = output
    ctx.save_for_backward(input, target, weight, stats, kept, denom)
    ctx.label_smoothing = label_smoothing


def _backward(ctx, grad_out, *_unused):
    input, target, weight, stats, kept, denom = ctx.saved_tensors
    grad = trimmed_ce_bwd(grad_out, input, target, weight, stats, kept, denom, ctx.label_smoothing)
    return grad, None, None, None, None, None, None, None, None, None


def _double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


trimmed_ce_fwd.register_autograd(_backward, setup_context=_setup_context)
# The gradient is not differentiable again here: say so clearly when a second backward reaches it.
trimmed_ce_bwd.register_autograd(_double_backward)
