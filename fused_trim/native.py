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

import torch
from torch import Tensor

from ._build import build, want_cuda
from ._common import as_rows

__all__ = ["build", "empty_cache", "is_available", "trimmed_cross_entropy_2d", "unavailable_reason"]

_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}

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
                        f"fused_trim: the native CUDA kernels could not be built ({exc}); "
                        "building the CPU op only.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    path = build(allow_compile=allow, with_cuda=False)
                torch.ops.load_library(str(path))
                _state["path"] = str(path)
            _register_python_parts()
            _state["cuda"] = torch._C._dispatch_has_kernel_for_dispatch_key(
                "fused_trim::trimmed_ce_fwd", "CUDA"
            )
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
    """Release the CPU gradient blocks the native op keeps for reuse (at most two; see
    ``csrc/trimmed_ce_cpu.cpp``). ``FUSED_TRIM_NO_GRAD_CACHE=1`` disables the cache."""
    if _load() is None:
        torch.ops.fused_trim.empty_cache()


# --------------------------------------------------------------------------------------------
# Fake implementations and autograd
# --------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _num_rows(input):
    """Samples of the op's input: ``M`` of ``(M, C)``, ``N * S`` of ``(N, C, S)``."""
    torch._check(input.dim() in (2, 3), lambda: f"fused_trim: input must be (M, C) or (N, C, S), got {input.shape}")
    return input.shape[0] if input.dim() == 2 else input.shape[0] * input.shape[2]


def _fwd_fake(input, target, weight, keep_ratio, keep_ratio_t, easiest, ignore_index, label_smoothing,
              reduction):
    m = _num_rows(input)
    acc = _acc_dtype(input.dtype)
    out = input.new_empty((m,) if reduction == 0 else ())
    return (
        out,
        input.new_empty((m,), dtype=acc),
        input.new_empty((m,), dtype=torch.bool),
        input.new_empty((), dtype=torch.int64),
        input.new_empty(()),
        input.new_empty((m,), dtype=acc),
        input.new_empty((m,), dtype=acc),
    )


def _bwd_fake(grad_out, input, target, weight, lse, rowscale, ignore_index, label_smoothing):
    _num_rows(input)
    return input.new_empty(input.shape)  # contiguous, as the CPU and CUDA ops return it


def _register_python_parts() -> None:
    if _state.get("registered"):
        return
    torch.library.register_fake("fused_trim::trimmed_ce_fwd", _fwd_fake)
    torch.library.register_fake("fused_trim::trimmed_ce_bwd", _bwd_fake)
    _state["registered"] = True


# --------------------------------------------------------------------------------------------
# Backend entry point
# --------------------------------------------------------------------------------------------


def trimmed_cross_entropy_2d(
    input: Tensor,
    target: Tensor,
    keep_ratio: float | Tensor,
    keep: str,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The native op on the normalised ``(M, C)`` or ``(N, C, S)`` problem (see :mod:`fused_trim.reference`).

    Returns ``(out, losses, kept, k, threshold)``, ``losses`` in the accumulation dtype (see
    :func:`fused_trim.reference.trimmed_cross_entropy_2d`); only ``out`` carries gradient.
    """
    if _state.get("error", "not loaded") is not None or not input.is_cpu:
        reason = unavailable_reason(input.device)
        if reason is not None:
            raise RuntimeError(f"backend='native' cannot run here: {reason}")
    if not input.is_cpu:
        # The CUDA op reads (M, C) rows with unit class stride: spatial inputs cost one copy.
        input = as_rows(input)
        if input.stride(-1) != 1:
            input = input.contiguous()
    # (The CPU op takes (M, C) or (N, C, S) with any strides itself.)
    if isinstance(keep_ratio, Tensor):
        ratio, ratio_t = 0.0, keep_ratio
    else:
        ratio, ratio_t = float(keep_ratio), None
    out, losses, kept, k, threshold, _lse, _scale = torch.ops.fused_trim.trimmed_ce_fwd.default(
        input,
        target,
        weight,
        ratio,
        ratio_t,
        keep == "easiest",
        int(ignore_index),
        float(label_smoothing),
        _REDUCTION_CODES[reduction],
    )
    # losses and threshold are marked non-differentiable by the op's autograd (C++): no detach.
    return out, losses, kept, k, threshold
