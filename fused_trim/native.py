"""The compiled native op (``fused_trim._C``) and its autograd glue.

The C++ (CPU) and CUDA sources live in ``csrc/``. They register two ``torch.library`` ops,
``fused_trim::trimmed_ce_fwd`` and ``fused_trim::trimmed_ce_bwd``; this module gives them fake
(meta) implementations, so ``torch.compile(fullgraph=True)`` traces through them. The autograd
formula is registered in C++ (``csrc/ops.cpp``, the ``Autograd`` key, for every device): the
backward op fed with the forward's saved logsumexp and per-row scale, no Python on the path.

Spatial inputs reach :func:`trimmed_cross_entropy_2d` as ``(N, C, S)`` (rows in ``n * S + s``
order). The CPU op reads them in place (vectorised across the pixels, which are adjacent in
memory, the classes ``S`` apart; only an input whose last dimension is not unit-stride is made
contiguous first) and returns the gradient in the same ``(N, C, S)`` layout. The CUDA op takes
``(M, C)`` rows only: CUDA tensors are first moved to ``(N * S, C)`` with one copy
(:func:`fused_trim._common.as_rows`).

Build: the first time the op is needed on a machine, :func:`fused_trim._build.build` compiles
``csrc/`` against the installed torch and caches the library (``~/.cache/fused_trim`` or
``$FUSED_TRIM_CACHE_DIR``); later processes load it in milliseconds. ``build()`` (or
``python -m fused_trim build``) does it ahead of time. When nothing can be built (no compiler, no
sources), one warning says why, ``backend="auto"`` falls back to the reference and
``backend="native"`` raises with the reason. ``FUSED_TRIM_NO_BUILD=1`` forbids compiling (a cached
library is still used).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ._build import build, want_cuda
from ._common import (
    Reduction,
    TrimOptions,
    acc_dtype,
    as_rows,
    first_equal_rows,
    forms_gradient_in_forward,
    kernel_ratio,
    ranking_scores,
    rule_k,
)
from ._groups import keep_positions_options, masked_target, reduce_kept, select_groups

__all__ = [
    "build",
    "empty_cache",
    "is_available",
    "trimmed_cross_entropy_2d",
    "trimmed_linear_cross_entropy_2d",
    "unavailable_reason",
]

_lock = threading.Lock()
_state: dict[str, object] = {}  # "error": str | None, "cuda": bool, "path": str


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def _load() -> str | None:
    """Build (once) and load the op; returns the error, or None on success."""
    if "error" in _state:
        return _state["error"]  # type: ignore[return-value]
    with _lock:
        if "error" in _state:
            return _state["error"]  # type: ignore[return-value]
        error: str | None = None
        try:
            if not hasattr(torch.ops, "fused_trim") or not hasattr(torch.ops.fused_trim, "trimmed_ce_fwd"):
                allow = os.environ.get("FUSED_TRIM_NO_BUILD") != "1"
                try:
                    path = build(allow_compile=allow)
                except RuntimeError as exc:
                    if not want_cuda():
                        raise
                    # The CUDA kernels did not build (say, nvcc and torch disagree on the CUDA
                    # version): keep the CPU op rather than lose both.
                    warnings.warn(
                        f"fused_trim: the native CUDA kernels could not be built ({exc}); building the CPU op only.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    path = build(allow_compile=allow, with_cuda=False)
                torch.ops.load_library(str(path))
                _state["path"] = str(path)
            _register_python_parts()
            _state["cuda"] = torch._C._dispatch_has_kernel_for_dispatch_key("fused_trim::trimmed_ce_fwd", "CUDA")
        except Exception as exc:  # noqa: BLE001 - any failure means "fall back"
            error = f"the compiled extension fused_trim._C is not available: {exc}"
            warnings.warn(
                f"fused_trim: {error}. backend='auto' uses the reference implementation on the CPU.",
                RuntimeWarning,
                stacklevel=3,
            )
        _state["error"] = error
        return error


def unavailable_reason(device: torch.device) -> str | None:
    """Why the native op cannot run on ``device``, or ``None`` when it can.

    The first call on a machine may compile the extension (tens of seconds, once).
    """
    if not isinstance(device, torch.device):
        device = device.device if isinstance(device, Tensor) else torch.device(device)
    if device.type == "cpu" and _state.get("error", "not loaded") is None:
        return None  # the fast path of every call once the op is loaded
    if device.type not in ("cpu", "cuda"):
        return f"the native op has kernels for CPU and CUDA tensors only, not {device.type}"
    error = _load()
    if error is not None:
        return error
    if device.type == "cuda" and not _state.get("cuda"):
        return "the native op was built without its CUDA kernels (no CUDA torch, nvcc or GPU at build time)"
    return None


def is_available(device: torch.device) -> bool:
    """Whether ``backend="native"`` can run on ``device``."""
    return unavailable_reason(device) is None


def empty_cache() -> None:
    """Release the CPU gradient blocks the native op keeps for reuse (at most four; see
    ``csrc/trimmed_ce_cpu.cpp``). ``FUSED_TRIM_NO_GRAD_CACHE=1`` disables the cache."""
    if _load() is None:
        torch.ops.fused_trim.empty_cache()


# --------------------------------------------------------------------------------------------
# Fake implementations and autograd
# --------------------------------------------------------------------------------------------


def _num_rows(input):
    """Samples of the op's input: ``M`` of ``(M, C)``, ``N * S`` of ``(N, C, S)``."""
    torch._check(input.dim() in (2, 3), lambda: f"fused_trim: input must be (M, C) or (N, C, S), got {input.shape}")
    return input.shape[0] if input.dim() == 2 else input.shape[0] * input.shape[2]


def _fwd_fake(
    input,
    target,
    weight,
    keep_ratio,
    keep_ratio_t,
    easiest,
    ignore_index,
    label_smoothing,
    reduction,
    score_offset=None,
    keep_threshold=None,
    min_kept=0,
    logit_softcap=0.0,
    z_loss=0.0,
):
    m = _num_rows(input)
    acc = acc_dtype(input.dtype)
    out = input.new_empty((m,) if reduction == Reduction.NONE else ())
    return (
        out,
        input.new_empty((m,), dtype=acc),
        input.new_empty((m,), dtype=torch.bool),
        input.new_empty((), dtype=torch.int64),
        input.new_empty(()),
        input.new_empty((m,), dtype=acc),
        input.new_empty((m,), dtype=acc),
    )


def _bwd_fake(
    grad_out, input, target, weight, lse, rowscale, ignore_index, label_smoothing, logit_softcap=0.0, z_loss=0.0
):
    _num_rows(input)
    return input.new_empty(input.shape)  # contiguous, as the CPU and CUDA ops return it


# The LM head (csrc/linear_ce_cpu.cpp): the gradient mask bits of linear_ce_bwd / linear_ce_keep_all.
_GRAD_INPUT, _GRAD_WEIGHT, _GRAD_BIAS = 1, 2, 4


def _grad_mask(needs: tuple[bool, bool, bool], has_bias: bool) -> int:
    """The gradient mask of ``needs`` = (input, linear_weight, linear_bias) wanted."""
    return (
        (_GRAD_INPUT if needs[0] else 0)
        | (_GRAD_WEIGHT if needs[1] else 0)
        | (_GRAD_BIAS if has_bias and needs[2] else 0)
    )


def _linear_rows_fake(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    ignore_index,
    label_smoothing,
    chunk_size,
    logit_softcap=0.0,
    z_loss=0.0,
):
    acc = acc_dtype(input.dtype)
    return input.new_empty((input.shape[0],), dtype=acc), input.new_empty((input.shape[0],), dtype=acc)


def _linear_trimmed_fake(
    losses,
    lse,
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    keep_ratio,
    keep_ratio_t,
    easiest,
    ignore_index,
    label_smoothing,
    reduction,
    chunk_size,
    score_offset=None,
    logit_softcap=0.0,
    z_loss=0.0,
):
    n = input.shape[0]
    return (
        input.new_empty((n,) if reduction == Reduction.NONE else ()),
        input.new_empty((n,), dtype=torch.bool),
        input.new_empty((), dtype=torch.int64),
        input.new_empty(()),
        input.new_empty((n,), dtype=acc_dtype(input.dtype)),
    )


def _linear_bwd_fake(
    grad_out,
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    lse,
    kept,
    rowscale,
    ignore_index,
    label_smoothing,
    chunk_size,
    grad_mask,
    logit_softcap=0.0,
    z_loss=0.0,
):
    has_bias = linear_bias is not None and grad_mask & _GRAD_BIAS
    return (
        input.new_empty(input.shape if grad_mask & _GRAD_INPUT else (0,)),
        linear_weight.new_empty(linear_weight.shape if grad_mask & _GRAD_WEIGHT else (0,)),
        linear_bias.new_empty(linear_bias.shape) if has_bias else input.new_empty((0,)),
    )


def _linear_keep_all_fake(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    easiest,
    ignore_index,
    label_smoothing,
    reduction,
    chunk_size,
    grad_mask,
    logit_softcap=0.0,
    z_loss=0.0,
):
    (n, d), v = input.shape, linear_weight.shape[0]
    acc = acc_dtype(input.dtype)
    has_bias = linear_bias is not None and grad_mask & _GRAD_BIAS
    return (
        input.new_empty(()),
        input.new_empty((n,), dtype=acc),
        input.new_empty((n,), dtype=torch.bool),
        input.new_empty((), dtype=torch.int64),
        input.new_empty(()),
        input.new_empty((), dtype=acc),
        input.new_empty((n, d) if grad_mask & _GRAD_INPUT else (0,), dtype=acc),
        input.new_empty((v, d) if grad_mask & _GRAD_WEIGHT else (0,), dtype=acc),
        input.new_empty((v,) if has_bias else (0,), dtype=acc),
        input.new_empty((n,), dtype=acc),
    )


def _linear_scale_fake(grad, factor, dtype):
    return grad.new_empty(grad.shape, dtype=dtype)


def _linear_trimmed_setup_context(ctx, inputs, output) -> None:
    _, lse, input, linear_weight, linear_bias, target, weight = inputs[:7]
    ignore_index, label_smoothing, _, chunk_size, _, logit_softcap, z_loss = inputs[10:17]
    _, kept, _, _, rowscale = output
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, lse, kept, rowscale)
    ctx.args = (ignore_index, label_smoothing, chunk_size)
    ctx.head = (logit_softcap, z_loss)
    ctx.mark_non_differentiable(*output[1:])


def _linear_trimmed_backward(ctx, grad_out, *_unused):
    """The kept rows' gradient, recomputed from their logits (linear_ce_bwd)."""
    input, linear_weight, linear_bias, target, weight, lse, kept, rowscale = ctx.saved_tensors
    needs = ctx.needs_input_grad[2:5]
    mask = _grad_mask(needs, linear_bias is not None)
    d_input, d_weight, d_bias = torch.ops.fused_trim.linear_ce_bwd.default(
        grad_out, input, linear_weight, linear_bias, target, weight, lse, kept, rowscale, *ctx.args, mask, *ctx.head
    )
    grads = (
        d_input if mask & _GRAD_INPUT else None,
        d_weight if mask & _GRAD_WEIGHT else None,
        d_bias if mask & _GRAD_BIAS else None,
    )
    return (None, None, *grads) + (None,) * 12


def _linear_keep_all_setup_context(ctx, inputs, output) -> None:
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype, None if inputs[2] is None else inputs[2].dtype)
    ctx.mask = inputs[10]
    ctx.save_for_backward(*output[5:9])  # gscale and the unscaled gradients
    ctx.mark_non_differentiable(*output[1:])


def _linear_keep_all_backward(ctx, grad_out, *_unused):
    """The forward's unscaled gradients times ``grad_out / denominator`` (``grad_out`` for "sum")."""
    gscale, d_input, d_weight, d_bias = ctx.saved_tensors
    factor = grad_out.to(gscale.dtype) * gscale
    scale = torch.ops.fused_trim.linear_ce_scale.default
    bits = (_GRAD_INPUT, _GRAD_WEIGHT, _GRAD_BIAS)
    grads = [
        scale(g, factor, dtype) if ctx.mask & bit else None
        for g, dtype, bit in zip((d_input, d_weight, d_bias), ctx.dtypes, bits, strict=True)
    ]
    return (*grads,) + (None,) * 10


def _register_python_parts() -> None:
    if _state.get("registered"):
        return
    torch.library.register_fake("fused_trim::trimmed_ce_fwd", _fwd_fake)
    torch.library.register_fake("fused_trim::trimmed_ce_bwd", _bwd_fake)
    torch.library.register_fake("fused_trim::linear_ce_rows", _linear_rows_fake)
    torch.library.register_fake("fused_trim::linear_ce_trimmed", _linear_trimmed_fake)
    torch.library.register_fake("fused_trim::linear_ce_bwd", _linear_bwd_fake)
    torch.library.register_fake("fused_trim::linear_ce_keep_all", _linear_keep_all_fake)
    torch.library.register_fake("fused_trim::linear_ce_scale", _linear_scale_fake)
    torch.library.register_autograd(
        "fused_trim::linear_ce_trimmed", _linear_trimmed_backward, setup_context=_linear_trimmed_setup_context
    )
    torch.library.register_autograd(
        "fused_trim::linear_ce_keep_all", _linear_keep_all_backward, setup_context=_linear_keep_all_setup_context
    )
    _state["registered"] = True


# --------------------------------------------------------------------------------------------
# Backend entry point
# --------------------------------------------------------------------------------------------


def _op_ratio(keep_ratio: float | Tensor) -> tuple[float, Tensor | None]:
    """The ops' ``(keep_ratio, keep_ratio_t)`` pair: a tensor (a ratio, or an exact int64 count) is
    passed as ``keep_ratio_t`` and read by the op, a float as ``keep_ratio``."""
    if isinstance(keep_ratio, Tensor):
        return 0.0, keep_ratio
    return float(keep_ratio), None


def _head_args(opts: TrimOptions) -> tuple[float, float]:
    """The ops' ``(logit_softcap, z_loss)`` arguments: the cap as a float, 0 when off."""
    return (0.0 if opts.logit_softcap is None else float(opts.logit_softcap)), float(opts.z_loss)


def _check_loaded(input: Tensor) -> None:
    """Raise, saying why, unless the op can run on ``input``'s device."""
    if _state.get("error", "not loaded") is not None or not input.is_cpu:
        reason = unavailable_reason(input.device)
        if reason is not None:
            raise RuntimeError(f"backend='native' cannot run here: {reason}")


def _widened(opts: TrimOptions, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The ops' operands for ``opts.result_dtype``: the C++ ops return ``out`` in their input's
    dtype, so a wider result (fp32 for bf16/fp16 operands under autocast) comes from operands
    widened to it (differentiably: the gradient is rounded back once, as autocast's casts do).
    Exact: the statistics are fp32 either way, and a GEMM of widened bf16/fp16 values in fp32 is
    one of the narrow values with fp32 accumulation. It costs a widened copy of each operand."""
    dtype = tensors[0].dtype
    if opts.result_dtype is None or opts.result_dtype == dtype:
        return tensors
    return tuple(None if t is None else t.to(opts.result_dtype) for t in tensors)


class _KeptRowsLoss(torch.autograd.Function):
    """A loss formed outside the op over a given kept set, with the op's backward
    (``trimmed_ce_bwd``) fed the per-row scale (``1 / sum_K w[y_i]`` for "mean", else 1, on the
    kept rows; 0 elsewhere: exact zeros without reading those rows' logits)."""

    @staticmethod
    def forward(ctx, input, out, target, weight, lse, rowscale, ignore_index, label_smoothing, softcap, z_loss):  # noqa: D102
        ctx.save_for_backward(input, target, weight, lse, rowscale)
        ctx.args = (ignore_index, label_smoothing, softcap, z_loss)
        ctx.mark_non_differentiable(target, lse, rowscale)
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        input, target, weight, lse, rowscale = ctx.saved_tensors
        grad = torch.ops.fused_trim.trimmed_ce_bwd.default(grad_out, input, target, weight, lse, rowscale, *ctx.args)
        return (grad,) + (None,) * 9


def _grouped_cross_entropy_2d(
    input: Tensor, target: Tensor, opts: TrimOptions
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Group trimming (``opts.group_ids``): every row's loss from the op (keep all, no reduction,
    one read of the logits), the groups' selection (:func:`fused_trim._groups.select_groups`), the
    reduction over the kept rows, and the op's backward over them."""
    ignore_index, label_smoothing = int(opts.ignore_index), float(opts.label_smoothing)
    with torch.no_grad():
        _, losses, _, _, _, lse, _ = torch.ops.fused_trim.trimmed_ce_fwd.default(
            input.detach(),
            target,
            opts.weight,
            1.0,
            None,
            bool(opts.keep),
            ignore_index,
            label_smoothing,
            int(Reduction.NONE),
            None,
            None,
            0,
            *_head_args(opts),
        )
    valid = target != opts.ignore_index
    kept, k, threshold = select_groups(losses, valid, opts)
    out, kept_f, scale = reduce_kept(losses, kept, target, opts, input.dtype)
    rowscale = torch.where(kept, kept_f / scale, 0.0)  # (0, not NaN, when nothing is kept)
    out = _KeptRowsLoss.apply(
        input, out, target, opts.weight, lse, rowscale, ignore_index, label_smoothing, *_head_args(opts)
    )
    return out, losses, kept, k, threshold.to(input.dtype), torch.where(valid, lse, 0)


def trimmed_cross_entropy_2d(
    input: Tensor, target: Tensor, opts: TrimOptions
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The contract of :func:`fused_trim.reference.trimmed_cross_entropy_2d`; differences: the
    CPU op reads ``(N, C, S)`` in place, the CUDA op first copies it to ``(M, C)`` rows; a wider
    ``result_dtype`` widens the input first (:func:`_widened`)."""
    _check_loaded(input)
    (input,) = _widened(opts, input)
    if not input.is_cpu:
        # The CUDA op reads (M, C) rows with unit class stride: spatial inputs cost one copy.
        input = as_rows(input)
        if input.stride(-1) != 1:
            input = input.contiguous()
    # (The CPU op takes (M, C) or (N, C, S) with any strides itself.)
    if opts.group_ids is not None:
        return _grouped_cross_entropy_2d(input, target, opts)
    ratio, ratio_t = _op_ratio(kernel_ratio(opts))
    threshold_t = opts.keep_threshold
    if threshold_t is not None and not isinstance(threshold_t, Tensor):
        threshold_t = torch.tensor(threshold_t, dtype=torch.float64)  # read on the host by the op
    out, losses, kept, k, threshold, lse, _scale = torch.ops.fused_trim.trimmed_ce_fwd.default(
        input,
        target,
        opts.weight,
        ratio,
        ratio_t,
        bool(opts.keep),
        int(opts.ignore_index),
        float(opts.label_smoothing),
        int(opts.reduction),
        opts.score_offset,
        threshold_t,
        int(opts.min_kept),
        *_head_args(opts),
    )
    # losses and threshold are marked non-differentiable by the op's autograd (C++): no detach.
    # Both ops write lse = 0 for an ignored sample themselves (no masking pass over it here).
    return out, losses, kept, k, threshold, lse.detach()


def trimmed_linear_cross_entropy_2d(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    opts: TrimOptions,
    share: Callable[[Tensor, Tensor], Tensor] | None = None,
    gradient_in_forward: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The contract of :func:`fused_trim.reference.trimmed_linear_cross_entropy_2d`; differences:

    CPU tensors only. The forward (``linear_ce_rows``) computes every row's loss ``chunk_size``
    rows of logits at a time; the backward recomputes the kept rows only, gathered into GEMMs of a
    few chunks of rows (within about ``chunk_size x V`` values): ``1 + 3 k / N`` forward-sized
    GEMMs. Where :func:`fused_trim._common.forms_gradient_in_forward` allows it and
    ``gradient_in_forward`` is true, ``linear_ce_keep_all`` instead forms the unscaled gradient
    during the forward (3 GEMMs; each chunk's logits held tile-major, so a tile's three GEMMs run
    on one dense block) and the backward only scales it by the upstream scalar (and
    ``1 / denominator`` for "mean"). ``gradient_in_forward=False`` always recomputes. A wider
    ``result_dtype`` widens the operands first (:func:`_widened`).
    """
    if not input.is_cpu:
        raise RuntimeError(
            f"backend='native' cannot run trimmed_linear_cross_entropy on {input.device.type} tensors: its "
            "native op has CPU kernels only (use backend='triton' or 'auto' on CUDA)"
        )
    _check_loaded(input)
    input, linear_weight, linear_bias = _widened(opts, input, linear_weight, linear_bias)
    code = int(opts.reduction)
    ce_args = (opts.weight, int(opts.ignore_index), float(opts.label_smoothing))
    chunk_size = int(opts.chunk_size)
    head = _head_args(opts)
    params = (input, linear_weight, linear_bias)
    needs = tuple(p is not None and p.requires_grad for p in params)
    if gradient_in_forward and forms_gradient_in_forward(opts, params, share):
        out, losses, kept, k, threshold, *_, lse = torch.ops.fused_trim.linear_ce_keep_all.default(
            input,
            linear_weight,
            linear_bias,
            target,
            opts.weight,
            bool(opts.keep),
            *ce_args[1:],
            code,
            chunk_size,
            _grad_mask(needs, linear_bias is not None),
            *head,
        )
        return out, losses, kept, k, threshold, lse
    detached = [None if p is None else p.detach() for p in params]
    losses, lse = torch.ops.fused_trim.linear_ce_rows.default(*detached, target, *ce_args, chunk_size, *head)
    # Bitwise equal rows (duplicated tokens) tie, wherever BLAS placed them in a tile.
    first = first_equal_rows(input.detach(), target)
    losses, lse = losses[first], lse[first]
    valid = target != opts.ignore_index
    groups = None
    if opts.group_ids is not None:
        # The groups' selection, then every valid row of the kept groups (the target masked to them).
        groups = select_groups(losses, valid, opts, share)
        target = masked_target(target, groups[0], opts.ignore_index)
        opts = keep_positions_options(opts)
    if share is not None and groups is None:
        keep_ratio = share(losses, valid)
    elif opts.keep_threshold is not None:  # k from the losses, passed on as an exact count
        keep_ratio = rule_k(ranking_scores(losses, opts.score_offset), valid, opts)
    else:
        keep_ratio = kernel_ratio(opts)
    ratio, ratio_t = _op_ratio(keep_ratio)
    out, kept, k, threshold, _ = torch.ops.fused_trim.linear_ce_trimmed.default(
        losses,
        lse,
        input,
        linear_weight,
        linear_bias,
        target,
        opts.weight,
        ratio,
        ratio_t,
        bool(opts.keep),
        *ce_args[1:],
        code,
        chunk_size,
        opts.score_offset,
        *head,
    )
    if groups is not None:
        k, threshold = groups[1], groups[2].to(threshold.dtype)
    return out, losses, kept, k, threshold, lse
