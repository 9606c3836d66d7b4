"""The ``torch.autograd.Function`` that glues the three Triton kernels together."""

from __future__ import annotations

import struct

import torch
import triton
from torch import Tensor

from .ce_backward import ce_backward_kernel
from .ce_forward import ce_forward_kernel
from .select import select_kernel

_REDUCTION_CODE = {"mean": 0, "sum": 1, "none": 2}


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


def select_block(num_rows: int) -> int:
    """Rows per iteration of the single selection program."""
    return min(max(triton.next_power_of_2(num_rows), 128), 2048)


class TrimmedCrossEntropyFunction(torch.autograd.Function):
    """Fused trimmed cross-entropy on ``input (M, C)``, ``target (M,)``.

    Saves the input plus O(M) tensors (logsumexp, kept mask, the mean's divisor) for the backward.
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        target: Tensor,
        weight: Tensor | None,
        keep_ratio: float | Tensor,
        keep: str,
        ignore_index: int,
        label_smoothing: float,
        reduction: str,
    ):
        num_rows, num_classes = input.shape
        if input.stride(1) != 1:
            input = input.contiguous()
        target = target.contiguous()
        acc = accumulation_dtype(input.dtype)
        dev = input.device
        loss = torch.empty(num_rows, dtype=acc, device=dev)
        lse = torch.empty(num_rows, dtype=acc, device=dev)
        w_y = torch.empty(num_rows, dtype=acc, device=dev)
        if weight is not None:
            weight = weight.contiguous()
        has_weight = weight is not None
        has_smoothing = label_smoothing > 0.0
        block_c, warps = row_config(num_classes, input.element_size())
        ce_forward_kernel[(num_rows,)](
            input, input.stride(0), target, weight if has_weight else loss, loss, lse, w_y,
            num_classes, ignore_index, float64_bits(label_smoothing),
            HAS_WEIGHT=has_weight, HAS_SMOOTHING=has_smoothing, BLOCK_C=block_c, num_warps=warps,
        )  # fmt: skip

        if isinstance(keep_ratio, Tensor) and keep_ratio.device.type == "cpu" and dev.type != "cpu":
            keep_ratio = float(keep_ratio)  # a host value costs no synchronisation
        ratio_on_device = isinstance(keep_ratio, Tensor)
        keep_all = not ratio_on_device and keep_ratio == 1.0
        kept = torch.empty(num_rows, dtype=torch.bool, device=dev)
        out = torch.empty(num_rows if reduction == "none" else (), dtype=input.dtype, device=dev)
        k = torch.empty((), dtype=torch.int64, device=dev)
        threshold = torch.empty((), dtype=input.dtype, device=dev)
        denom = torch.empty((), dtype=acc, device=dev)
        select_kernel[(1,)](
            loss, w_y, target, kept, out, out, k, threshold, denom, num_rows, ignore_index,
            float64_bits(1.0 if ratio_on_device else keep_ratio), keep_ratio if ratio_on_device else loss,
            RATIO_FROM_PTR=ratio_on_device, KEEP_ALL=keep_all, HARDEST=keep == "hardest",
            REDUCTION=_REDUCTION_CODE[reduction], BLOCK=select_block(num_rows), num_warps=4,
        )  # fmt: skip

        ctx.save_for_backward(input, target, weight, lse, kept, denom)
        ctx.label_smoothing = label_smoothing
        ctx.reduction = reduction
        losses = loss.to(input.dtype)
        ctx.mark_non_differentiable(losses, kept, k, threshold)
        return out, losses, kept, k, threshold

    @staticmethod
    def backward(ctx, grad_out: Tensor, *_unused):
        input, target, weight, lse, kept, denom = ctx.saved_tensors
        num_rows, num_classes = input.shape
        label_smoothing = ctx.label_smoothing
        grad = torch.empty((num_rows, num_classes), dtype=input.dtype, device=input.device)
        has_weight = weight is not None
        has_smoothing = label_smoothing > 0.0
        weight_sum = weight.sum(dtype=lse.dtype) if has_weight and has_smoothing else lse
        block_c, warps = row_config(num_classes, input.element_size())
        ce_backward_kernel[(num_rows,)](
            input, input.stride(0), grad, grad.stride(0), target, weight if has_weight else lse,
            weight_sum, lse, kept, grad_out.contiguous(), denom, num_classes, float64_bits(label_smoothing),
            PER_ROW_GRAD=ctx.reduction == "none", HAS_WEIGHT=has_weight, HAS_SMOOTHING=has_smoothing,
            BLOCK_C=block_c, num_warps=warps,
        )  # fmt: skip
        return grad, None, None, None, None, None, None, None
