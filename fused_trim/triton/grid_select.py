"""Grid select: the exact-k radix select of :mod:`.select` spread over a grid of programs of
``BLOCK`` rows each, for more rows than one program should scan (segmentation maps, large token
batches).

Per 8-bit digit, :func:`grid_histogram_kernel` adds every block's digit histogram to a global one
and :func:`grid_pick_kernel` (one program) picks the digit of the k-th key; then
:func:`grid_ties_kernel` counts each block's ties at the k-th key, :func:`grid_scan_kernel` turns
the counts into exclusive prefix sums, :func:`grid_keep_kernel` writes the kept flags and per-block
partial sums, and :func:`grid_finish_kernel` sums those in a fixed order. Counts are int64 (the
histogram and its prefix sums stay exact past 2^31 rows); integer atomics make the result
independent of the programs' order. :func:`grid_select` launches the sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ._ce import to_output
from ._radix import REDUCTION_NONE, block_keys, compute_k, radix_step, sign_bit, store_results


@triton.jit
def _kth_key(state_ptr, IS_FP64: tl.constexpr):
    """The k-th key found so far (``state[0]``, stored in unsigned-flipped space)."""
    key_dtype: tl.constexpr = tl.int64 if IS_FP64 else tl.int32
    return tl.load(state_ptr).to(key_dtype) ^ sign_bit(IS_FP64)


@triton.jit
def grid_histogram_kernel(
    loss_ptr,
    target_ptr,
    state_ptr,
    hist_ptr,
    num_rows,
    ignore_index,
    SHIFT: tl.constexpr,
    EASIEST: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_OFFSET: tl.constexpr = False,
    offset_ptr=None,
):
    """Step 1 (per digit): the histogram of digit ``(u >> SHIFT) & 255`` over the block's valid rows
    whose key matches the prefix found so far (``state[0]``, under mask ``state[1]``), added to the
    global int64 ``hist``."""
    IS_FP64: tl.constexpr = loss_ptr.dtype.element_ty == tl.float64
    key_dtype: tl.constexpr = tl.int64 if IS_FP64 else tl.int32
    _, _, valid, _, key = block_keys(
        tl.program_id(0).to(tl.int64) * BLOCK,
        loss_ptr,
        target_ptr,
        num_rows,
        ignore_index,
        EASIEST,
        BLOCK,
        HAS_OFFSET,
        offset_ptr,
    )
    u = key ^ sign_bit(IS_FP64)
    prefix = tl.load(state_ptr).to(key_dtype)
    prefix_mask = tl.load(state_ptr + 1).to(key_dtype)
    match = valid & ((u & prefix_mask) == prefix)
    digit = ((u >> SHIFT) & 255).to(tl.int32)
    hist = tl.histogram(digit, 256, mask=match).to(tl.int64)
    tl.atomic_add(hist_ptr + tl.arange(0, 256), hist, sem="relaxed")


@triton.jit
def grid_pick_kernel(
    state_ptr,
    hist_ptr,
    keep_ratio_bits,
    ratio_ptr,
    SHIFT: tl.constexpr,
    FIRST: tl.constexpr,
    IS_FP64: tl.constexpr,
    RATIO_FROM_PTR: tl.constexpr,
):
    """Step 2 (per digit), one program: the digit of the k-th key. ``state`` (int64) is
    ``[prefix, prefix_mask, krem, k, n]``; the first digit's histogram covers every valid row, so
    its total is ``n``, from which ``k`` follows. Clears the histogram for the next digit."""
    key_dtype: tl.constexpr = tl.int64 if IS_FP64 else tl.int32
    bins = tl.arange(0, 256)
    hist = tl.load(hist_ptr + bins)
    if FIRST:
        n = tl.sum(hist, 0)
        k = compute_k(n, keep_ratio_bits, ratio_ptr, RATIO_FROM_PTR)
        tl.store(state_ptr + 3, k)
        tl.store(state_ptr + 4, n)
        krem = k
        prefix = tl.zeros((), key_dtype)
        prefix_mask = tl.zeros((), key_dtype)
    else:
        krem = tl.load(state_ptr + 2)
        prefix = tl.load(state_ptr).to(key_dtype)
        prefix_mask = tl.load(state_ptr + 1).to(key_dtype)
    krem, prefix, prefix_mask = radix_step(hist, krem, prefix, prefix_mask, SHIFT, key_dtype)
    tl.store(state_ptr, prefix.to(tl.int64))
    tl.store(state_ptr + 1, prefix_mask.to(tl.int64))
    tl.store(state_ptr + 2, krem)
    tl.store(hist_ptr + bins, tl.zeros((256,), tl.int64))


@triton.jit
def grid_ties_kernel(
    loss_ptr,
    target_ptr,
    state_ptr,
    ties_ptr,
    num_rows,
    ignore_index,
    EASIEST: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_OFFSET: tl.constexpr = False,
    offset_ptr=None,
):
    """Step 3: ``ties[pid]`` = the number of valid rows of block ``pid`` whose key is the k-th key."""
    IS_FP64: tl.constexpr = loss_ptr.dtype.element_ty == tl.float64
    _, _, valid, _, key = block_keys(
        tl.program_id(0).to(tl.int64) * BLOCK,
        loss_ptr,
        target_ptr,
        num_rows,
        ignore_index,
        EASIEST,
        BLOCK,
        HAS_OFFSET,
        offset_ptr,
    )
    tie = valid & (key == _kth_key(state_ptr, IS_FP64))
    tl.store(ties_ptr + tl.program_id(0), tl.sum(tie.to(tl.int64), 0))


@triton.jit
def grid_scan_kernel(ties_ptr, num_blocks, BLOCK: tl.constexpr):
    """Step 4, one program, in place: ``ties[b] <- sum(ties[:b])``, the ties before each block."""
    carry = tl.zeros((), tl.int64)
    for start in range(0, num_blocks, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < num_blocks
        t = tl.load(ties_ptr + idx, mask=mask, other=0)
        tl.store(ties_ptr + idx, carry + tl.cumsum(t, 0) - t, mask=mask)
        carry += tl.sum(t, 0)


@triton.jit
def grid_keep_kernel(
    loss_ptr,
    wy_ptr,
    target_ptr,
    state_ptr,
    ties_before_ptr,
    kept_ptr,
    out_ptr,
    partial_ptr,
    num_rows,
    num_blocks,
    ignore_index,
    EASIEST: tl.constexpr,
    REDUCTION: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_OFFSET: tl.constexpr = False,
    offset_ptr=None,
):
    """Step 5: keeps ``key > T`` and the ties at ``T`` whose global tie rank is below ``krem``;
    writes ``kept``, ``out`` (for "none"), and the block's kept loss and weight sums to
    ``partial[pid]`` and ``partial[num_blocks + pid]``."""
    IS_FP64: tl.constexpr = loss_ptr.dtype.element_ty == tl.float64
    pid = tl.program_id(0)
    idx, in_range, valid, loss, key = block_keys(
        tl.program_id(0).to(tl.int64) * BLOCK,
        loss_ptr,
        target_ptr,
        num_rows,
        ignore_index,
        EASIEST,
        BLOCK,
        HAS_OFFSET,
        offset_ptr,
    )
    kth = _kth_key(state_ptr, IS_FP64)
    krem = tl.load(state_ptr + 2)
    tie = valid & (key == kth)
    tie_i = tie.to(tl.int64)
    tie_rank = tl.load(ties_before_ptr + pid) + tl.cumsum(tie_i, 0) - tie_i
    kept = (valid & (key > kth)) | (tie & (tie_rank < krem))
    wy = tl.load(wy_ptr + idx, mask=kept, other=0.0)
    kept_loss = tl.where(kept, loss, 0.0)
    tl.store(kept_ptr + idx, kept, mask=in_range)
    if REDUCTION == REDUCTION_NONE:
        tl.store(out_ptr + idx, to_output(kept_loss, out_ptr.dtype.element_ty), mask=in_range)
    tl.store(partial_ptr + pid, tl.sum(kept_loss, 0))
    tl.store(partial_ptr + num_blocks + pid, tl.sum(tl.where(kept, wy, 0.0), 0))


@triton.jit
def grid_finish_kernel(
    partial_ptr,
    state_ptr,
    result_ptr,
    k_ptr,
    threshold_ptr,
    denom_ptr,
    num_blocks,
    EASIEST: tl.constexpr,
    REDUCTION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Step 6, one program: the partial sums in a fixed order (deterministic), then the mean or
    sum, ``k``, the threshold loss and the backward's divisor."""
    acc_dtype: tl.constexpr = partial_ptr.dtype.element_ty
    IS_FP64: tl.constexpr = acc_dtype == tl.float64
    sum_loss = tl.zeros((), acc_dtype)
    sum_w = tl.zeros((), acc_dtype)
    for start in range(0, num_blocks, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < num_blocks
        sum_loss += tl.sum(tl.load(partial_ptr + idx, mask=mask, other=0.0), 0)
        sum_w += tl.sum(tl.load(partial_ptr + num_blocks + idx, mask=mask, other=0.0), 0)
    k = tl.load(state_ptr + 3)
    store_results(
        sum_loss,
        sum_w,
        k,
        _kth_key(state_ptr, IS_FP64),
        result_ptr,
        denom_ptr,
        k_ptr,
        threshold_ptr,
        EASIEST,
        REDUCTION,
    )


def grid_select(
    loss: Tensor,
    w_y: Tensor,
    target: Tensor,
    kept: Tensor,
    out: Tensor,
    k: Tensor,
    threshold: Tensor,
    denom: Tensor,
    ignore_index: int,
    ratio_bits: int,
    ratio_ptr: Tensor,
    ratio_on_device: bool,
    easiest: bool,
    reduction: int,
    block: int,
    offset: Tensor | None = None,
) -> None:
    """Launch the six steps over ``loss`` (rows in blocks of ``block``); writes what
    :func:`.select.select_kernel` writes. ``offset`` (``(M,)``, any float dtype, or ``None``): rank
    ``loss - offset``."""
    has_offset = offset is not None
    num_rows = loss.shape[0]
    is_fp64 = loss.dtype == torch.float64
    nbits = 64 if is_fp64 else 32
    blocks = triton.cdiv(num_rows, block)
    state = torch.zeros(5, dtype=torch.int64, device=loss.device)  # prefix, mask, krem, k, n
    hist = torch.zeros(256, dtype=torch.int64, device=loss.device)
    for digit in range(nbits // 8):
        shift = nbits - 8 * (digit + 1)
        wrap_triton(grid_histogram_kernel)[(blocks,)](
            loss,
            target,
            state,
            hist,
            num_rows,
            ignore_index,
            SHIFT=shift,
            EASIEST=easiest,
            BLOCK=block,
            HAS_OFFSET=has_offset,
            offset_ptr=offset,
            num_warps=8,
        )
        wrap_triton(grid_pick_kernel)[(1,)](
            state,
            hist,
            ratio_bits,
            ratio_ptr,
            SHIFT=shift,
            FIRST=digit == 0,
            IS_FP64=is_fp64,
            RATIO_FROM_PTR=ratio_on_device,
            num_warps=4,
        )
    ties = torch.empty(blocks, dtype=torch.int64, device=loss.device)
    wrap_triton(grid_ties_kernel)[(blocks,)](
        loss,
        target,
        state,
        ties,
        num_rows,
        ignore_index,
        EASIEST=easiest,
        BLOCK=block,
        HAS_OFFSET=has_offset,
        offset_ptr=offset,
        num_warps=8,
    )
    wrap_triton(grid_scan_kernel)[(1,)](ties, blocks, BLOCK=1024, num_warps=4)
    partial = torch.empty(2 * blocks, dtype=loss.dtype, device=loss.device)
    wrap_triton(grid_keep_kernel)[(blocks,)](
        loss,
        w_y,
        target,
        state,
        ties,
        kept,
        out,
        partial,
        num_rows,
        blocks,
        ignore_index,
        EASIEST=easiest,
        REDUCTION=reduction,
        BLOCK=block,
        HAS_OFFSET=has_offset,
        offset_ptr=offset,
        num_warps=8,
    )
    wrap_triton(grid_finish_kernel)[(1,)](
        partial,
        state,
        out,
        k,
        threshold,
        denom,
        blocks,
        EASIEST=easiest,
        REDUCTION=reduction,
        BLOCK=1024,
        num_warps=4,
    )
