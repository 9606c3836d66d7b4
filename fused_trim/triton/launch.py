"""Launch helpers shared by the Triton ops: block configurations, the device guard, host
scalars as kernel arguments, and the exact-k select both forwards end with."""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from .._common import Keep, Reduction, TrimOptions, ranking_scores, rule_k
from .grid_select import grid_select
from .select import select_kernel

# Up to this many rows one program selects (one launch; ~0.2 s interpreted at 65536 rows).
# Beyond it (segmentation maps, large token batches) the select spreads over a grid of programs
# of GRID_BLOCK rows each: per 8-bit digit a histogram launch and a one-program pick, then tie
# counts, their prefix sums, the kept flags with partial sums, and a fixed-order final sum.
SINGLE_PROGRAM_MAX_ROWS = 65536
GRID_BLOCK = 2048


def float64_bits(value: float) -> int:
    """A host float as its float64 bit pattern: Triton passes float scalars as fp32, bits stay exact."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def head_args(logit_softcap: float | None, z_loss: float) -> tuple[tuple[int, int], dict[str, bool]]:
    """The row kernels' soft-cap and z-loss arguments: ``((softcap_bits, z_loss_bits), {HAS_CAP,
    HAS_Z})``; both flags off when the options are (the plain kernels)."""
    bits = (float64_bits(1.0 if logit_softcap is None else logit_softcap), float64_bits(z_loss))
    return bits, {"HAS_CAP": logit_softcap is not None, "HAS_Z": z_loss != 0.0}


def row_config(num_classes: int, element_size: int, capped: bool = False) -> tuple[int, int]:
    """``(BLOCK_C, num_warps)`` of the row kernels: the column block and its warps.

    ``capped`` (``logit_softcap``): at most 4096 columns for 2-byte logits too, as for fp32 ones: the
    cap's temporaries took the bf16 8192-column backward from 128 to 176 registers in an sm_90
    compile (one program per SM instead of two), at 4096 columns 98."""
    max_block = 16384 // max(element_size, 4 if capped else 2)  # 32 KiB of logits in flight per program
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
    easiest: bool,
    ignore_index: int,
    reduction: int,
    score_offset: Tensor | None = None,
    keep_threshold: Tensor | None = None,
    min_kept: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The exact-k select on per-row losses (one program, or the grid select past
    ``SINGLE_PROGRAM_MAX_ROWS``): ``(out, kept, k, threshold, denom)``, ``out`` and ``threshold``
    in ``out_dtype``. Shared by the cross-entropy and LM-head forwards.

    ``score_offset`` (``(num_rows,)``, any float dtype, on the losses' device, or ``None``): rank
    ``loss - score_offset`` (formed in the losses' dtype) instead; ``threshold`` is then the k-th
    score; ``out`` and ``denom`` are still of the plain losses. ``keep_threshold`` (a 0-dim tensor
    on the losses' device, or ``None``): the threshold rule with ``min_kept`` replaces the ratio;
    its ``k`` (:func:`fused_trim._common.rule_k`: one elementwise pass over the scores and a sum,
    on the device) reaches the kernels as an exact count."""
    num_rows, dev = loss.shape[0], loss.device
    has_offset = score_offset is not None
    if has_offset:
        score_offset = score_offset.contiguous()
    if keep_threshold is not None:
        rule = TrimOptions(keep=Keep(int(easiest)), keep_threshold=keep_threshold, min_kept=min_kept)
        keep_ratio_t = rule_k(ranking_scores(loss, score_offset), target != ignore_index, rule)
    ratio_on_device = keep_ratio_t is not None
    kept = torch.empty(num_rows, dtype=torch.bool, device=dev)
    out = torch.empty(num_rows if reduction == Reduction.NONE else (), dtype=out_dtype, device=dev)
    # The kernel's two outputs get distinct buffers (the per-row losses and the scalar result): one
    # buffer passed twice would leave torch.compile's mutation analysis to guess which is written.
    unused = torch.empty(1, dtype=out_dtype, device=dev)
    per_row, result = (out, unused) if reduction == Reduction.NONE else (unused, out)
    k = torch.empty((), dtype=torch.int64, device=dev)
    threshold = torch.empty((), dtype=out_dtype, device=dev)
    denom = torch.empty((), dtype=loss.dtype, device=dev)
    ratio_bits = float64_bits(keep_ratio)
    ratio_ptr = keep_ratio_t if ratio_on_device else loss
    if num_rows <= SINGLE_PROGRAM_MAX_ROWS:
        wrap_triton(select_kernel)[(1,)](
            loss,
            w_y,
            target,
            kept,
            per_row,
            result,
            k,
            threshold,
            denom,
            num_rows,
            ignore_index,
            ratio_bits,
            ratio_ptr,
            RATIO_FROM_PTR=ratio_on_device,
            KEEP_ALL=not ratio_on_device and keep_ratio == 1.0,
            EASIEST=easiest,
            REDUCTION=reduction,
            BLOCK=select_block(num_rows),
            HAS_OFFSET=has_offset,
            offset_ptr=score_offset,
            num_warps=4,
        )
    else:
        grid_select(
            loss,
            w_y,
            target,
            kept,
            out,
            k,
            threshold,
            denom,
            ignore_index,
            ratio_bits,
            ratio_ptr,
            ratio_on_device,
            easiest,
            reduction,
            GRID_BLOCK,
            offset=score_offset,
        )
    return out, kept, k, threshold, denom


def device_ratio(keep_ratio: float | Tensor, device) -> tuple[float, Tensor | None]:
    """``(host ratio, device ratio tensor or None)``: a 0-dim tensor on ``device`` is read by the
    kernels; a floating one elsewhere is read on the host (no synchronisation with ``device``); an
    exact count on the CPU (a host ``keep_count``) becomes a device tensor by a fill (no copy)."""
    if isinstance(keep_ratio, Tensor):
        if keep_ratio.device == device:
            return 1.0, keep_ratio
        if not keep_ratio.is_floating_point():
            if keep_ratio.device.type != "cpu":
                raise ValueError(f"an exact keep count must be on {device} or the CPU, got {keep_ratio.device}")
            return 1.0, torch.full((), int(keep_ratio), dtype=torch.int64, device=device)
        return float(keep_ratio), None  # a host value costs no synchronisation
    return float(keep_ratio), None


def device_threshold(keep_threshold: float | Tensor | None, device) -> Tensor | None:
    """The threshold as the 0-dim float64 tensor on ``device`` the select reads (a host value by a
    fill, no copy), or ``None``."""
    if keep_threshold is None:
        return None
    if isinstance(keep_threshold, Tensor):
        if keep_threshold.device == device:
            return keep_threshold.to(torch.float64)
        keep_threshold = float(keep_threshold)  # a CPU tensor: a host value
    return torch.full((), keep_threshold, dtype=torch.float64, device=device)
