"""``trimmed_cross_entropy``: validation, shape normalisation and backend dispatch.

Every backend receives the same normalised problem: an ``(M, C)`` input whose rows are the samples
in the target's flat order, or for inputs with spatial dimensions the ``(N, C, S)`` view with
``M = N * S`` samples in ``n * S + s`` order (the class dimension strided); an ``(M,)`` integer
target; and one :class:`~fused_trim._common.TrimOptions` record of validated options (a CPU
``keep_ratio`` tensor arrives as a Python float outside ``torch.compile``). Every backend entry
point is ``trimmed_cross_entropy_2d(input, target, opts)`` or
``trimmed_linear_cross_entropy_2d(input, linear_weight, linear_bias, target, opts, share=None)``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import native
from . import reference as _reference
from ._common import (
    BACKENDS,
    INT64_MAX,
    KEEP_CHOICES,
    REDUCTIONS,
    Keep,
    Reduction,
    TrimInfo,
    TrimOptions,
    autocast_cast,
    autocast_dtype,
    autocast_result_dtype,
    check_choice,
    check_chunk_size,
    check_ignore_index,
    check_label_smoothing,
    check_logit_softcap,
    check_ratio,
    check_weight,
    check_z_loss,
    default_chunk_size,
    out_dtype,
    ranking_scores,
    reduced_z_loss,
)
from ._groups import GROUP_REDUCTIONS, group_info

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["resolve_backend", "trimmed_cross_entropy", "trimmed_linear_cross_entropy"]


def _dtensor_class() -> type | None:
    """``DTensor`` once ``torch.distributed.tensor`` is loaded. No DTensor exists before that, and
    importing it here would add its import time to the first call of every program."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _reject_dtensors(**named: object) -> None:
    """A clear error for a DTensor where the op takes this rank's own rows (or a constant)."""
    dtensor = _dtensor_class()
    if dtensor is None:
        return
    for name, value in named.items():
        if isinstance(value, dtensor):
            raise TypeError(
                f"{name} must be a plain tensor, got a DTensor with placements {tuple(value.placements)}: pass "
                f"this rank's local tensor ({name}.to_local()); the op trims the rows it is given, and "
                "process_group= trims over the rows of every rank"
            )


def _gathered(value: Tensor | None) -> Tensor | None:
    """A DTensor head parameter as the full tensor, gathered over its device mesh for this call.

    The gradient goes back to the DTensor in its own placements (a reduce-scatter for ``Shard``, an
    all-reduce for ``Replicate``) as the *mean* over the mesh of each rank's gradient: what FSDP2
    (and DDP) make of data-parallel gradients, and each rank's own gradient where every rank holds
    the same input. A plain tensor comes back as it is.
    """
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(value, dtensor):
        return value
    from torch.distributed.tensor import Partial

    return value.full_tensor(grad_placements=[Partial("avg")] * value.device_mesh.ndim)


def _host_checkable(t: Tensor) -> bool:
    """Whether reading ``t``'s values on the host is free: a CPU tensor outside ``torch.compile``.

    Elsewhere value checks run on the device (``torch._assert_async``): no host synchronisation,
    no graph break; a failing check raises asynchronously, as an out-of-range class index does in
    ``F.cross_entropy`` on CUDA.
    """
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_keep_ratio(keep_ratio: float | Tensor) -> float | Tensor:
    if isinstance(keep_ratio, Tensor):
        if keep_ratio.dim() != 0 or not keep_ratio.is_floating_point():
            raise TypeError(
                "keep_ratio must be a Python float or a 0-dim floating-point tensor, got a tensor "
                f"of shape {tuple(keep_ratio.shape)} and dtype {keep_ratio.dtype}"
            )
        if _host_checkable(keep_ratio):
            value = float(keep_ratio.detach())
            if not 0.0 < value <= 1.0:
                raise ValueError(f"keep_ratio must be in (0, 1], got {value}")
            # A host value: no backend then copies the CPU tensor to a CUDA input's device on
            # every call (a synchronising host-to-device copy). Equal to the tensor's value in float64.
            return value
        else:
            torch._assert_async((keep_ratio > 0) & (keep_ratio <= 1), "keep_ratio must be in (0, 1]")
        return keep_ratio
    return check_ratio("keep_ratio", keep_ratio)


def _check_keep_count(keep_count: object) -> int | Tensor:
    if isinstance(keep_count, Tensor):
        if (
            keep_count.dim() != 0
            or keep_count.is_floating_point()
            or keep_count.is_complex()
            or keep_count.dtype == torch.bool
        ):
            raise TypeError(
                "keep_count must be an int or a 0-dim integer tensor, got a tensor "
                f"of shape {tuple(keep_count.shape)} and dtype {keep_count.dtype}"
            )
        if not _host_checkable(keep_count):
            torch._assert_async(keep_count >= 0, "keep_count must be >= 0")
            return keep_count
        keep_count = int(keep_count)  # a host value, as a CPU keep_ratio tensor becomes one
    if isinstance(keep_count, bool) or not isinstance(keep_count, int):
        raise TypeError(f"keep_count must be an int or a 0-dim integer tensor, got {keep_count!r}")
    if not 0 <= keep_count <= INT64_MAX:
        raise ValueError(f"keep_count must be >= 0 (and fit in int64), got {keep_count}")
    return keep_count


def _check_keep_threshold(keep_threshold: object) -> float | Tensor:
    if isinstance(keep_threshold, Tensor):
        if keep_threshold.dim() != 0 or not keep_threshold.is_floating_point():
            raise TypeError(
                "keep_threshold must be a float or a 0-dim floating-point tensor, got a tensor "
                f"of shape {tuple(keep_threshold.shape)} and dtype {keep_threshold.dtype}"
            )
        if not _host_checkable(keep_threshold):
            torch._assert_async(torch.isfinite(keep_threshold), "keep_threshold must be finite")
            return keep_threshold.detach()
        keep_threshold = float(keep_threshold.detach())
    if isinstance(keep_threshold, bool) or not isinstance(keep_threshold, (int, float)):
        raise TypeError(f"keep_threshold must be a float or a 0-dim floating-point tensor, got {keep_threshold!r}")
    if not math.isfinite(keep_threshold):
        raise ValueError(f"keep_threshold must be finite, got {keep_threshold!r}")
    return float(keep_threshold)


def _check_keep_rule(
    keep_ratio: object, keep_count: object, keep_threshold: object, min_kept: object
) -> tuple[float | Tensor, int | Tensor | None, float | Tensor | None, int]:
    """The validated keep rule ``(keep_ratio, keep_count, keep_threshold, min_kept)``: exactly one
    of the first three given (``None`` is "not given"; none given is a ratio of 1.0), ``min_kept``
    only with a threshold. With a count or a threshold the ratio comes back as 1.0 (unused)."""
    given = [
        name
        for name, value in (("keep_ratio", keep_ratio), ("keep_count", keep_count), ("keep_threshold", keep_threshold))
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(f"exactly one of keep_ratio, keep_count and keep_threshold sets k, got {' and '.join(given)}")
    if min_kept is not None and keep_threshold is None:
        raise ValueError(f"min_kept={min_kept!r} applies only with keep_threshold, which was not given")
    if min_kept is None:
        min_kept = 0
    elif isinstance(min_kept, bool) or not isinstance(min_kept, int):
        raise TypeError(f"min_kept must be an int >= 0, got {min_kept!r}")
    elif not 0 <= min_kept <= INT64_MAX:
        raise ValueError(f"min_kept must be >= 0 (and fit in int64), got {min_kept}")
    ratio = 1.0 if keep_ratio is None else _check_keep_ratio(keep_ratio)
    count = None if keep_count is None else _check_keep_count(keep_count)
    threshold = None if keep_threshold is None else _check_keep_threshold(keep_threshold)
    return ratio, count, threshold, min_kept


def _check_shapes(input: Tensor, target: Tensor) -> None:
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"input and target must be tensors, got {type(input).__name__} and {type(target).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor of logits, got dtype {input.dtype}")
    if target.is_floating_point() or target.is_complex():
        raise TypeError(
            f"target must hold integer class indices, got dtype {target.dtype}: "
            "class-probability targets are not supported"
        )
    if target.dtype == torch.bool:
        raise TypeError("target must hold integer class indices, got dtype torch.bool")
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (C,), got a 0-dim tensor")
    if input.dim() == 1:
        expected: tuple[int, ...] = ()
    else:
        expected = (input.shape[0], *input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}: "
            f"expected target of shape {expected}"
        )
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if num_classes == 0:
        raise ValueError(f"input has no classes (C = 0), shape {tuple(input.shape)}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")


def _check_scalar_options(ignore_index: object, label_smoothing: object) -> None:
    check_ignore_index(ignore_index)
    check_label_smoothing(label_smoothing)


def _check_weight(weight: Tensor | None, num_classes: int, input: Tensor) -> None:
    check_weight(weight, num_classes)
    if weight is None:
        return
    if weight.device != input.device:
        raise ValueError(f"weight is on {weight.device} but input is on {input.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        # As F.cross_entropy (whose nll_loss raises the same): no backend computes a gradient for
        # the class weights, and a silent None would be wrong.
        raise RuntimeError(
            "weight requires grad, but the loss is not differentiable with respect to the class "
            "weights (neither is F.cross_entropy): pass weight.detach()"
        )


def _check_per_sample(name: str, value: Tensor, target: Tensor, on: tuple[str, Tensor], what: str) -> None:
    """``value`` has the target's shape (``what``: one value per ...) and the device of ``on``'s
    tensor, else a ``ValueError`` naming ``name``."""
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{name} shape {tuple(value.shape)} does not match target shape {tuple(target.shape)}: {what}")
    other, tensor = on
    if value.device != tensor.device:
        raise ValueError(f"{name} is on {value.device} but {other} is on {tensor.device}")


def _check_score_offset(score_offset: object, target: Tensor, input: Tensor) -> Tensor | None:
    """``None``, or the offset as a detached flat ``(M,)`` tensor: a floating-point tensor of the
    target's shape on the input's device, else an error naming ``score_offset`` and what it got."""
    if score_offset is None:
        return None
    if not isinstance(score_offset, Tensor):
        raise TypeError(f"score_offset must be a tensor or None, got {type(score_offset).__name__}")
    if not score_offset.is_floating_point():
        raise TypeError(f"score_offset must be a floating-point tensor, got dtype {score_offset.dtype}")
    _check_per_sample("score_offset", score_offset, target, ("input", input), "one value per sample")
    return score_offset.detach().reshape(-1)  # a constant for autograd


def _check_group_ids(group_ids: object, group_reduction: object, target: Tensor) -> Tensor | int | None:
    """The group layout for :class:`~fused_trim._common.TrimOptions`: ``None``, the number of rows
    ``B`` for ``"rows"``, or the ids as a flat ``(M,)`` int64 tensor (integer, the target's shape and
    device, in ``[0, M)``: checked on the host where that is free, else on the device), else an
    error naming ``group_ids`` (or ``group_reduction``) and the value."""
    check_choice("group_reduction", group_reduction, GROUP_REDUCTIONS)
    if group_ids is None:
        return None
    if isinstance(group_ids, str):
        if group_ids != "rows":
            raise ValueError(f"group_ids must be an integer tensor, 'rows' or None, got {group_ids!r}")
        return target.shape[0] if target.dim() > 0 else 1
    if not isinstance(group_ids, Tensor):
        raise TypeError(f"group_ids must be an integer tensor, 'rows' or None, got {type(group_ids).__name__}")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must hold integer group ids, got dtype {group_ids.dtype}")
    _check_per_sample("group_ids", group_ids, target, ("target", target), "one group id per position")
    ids = group_ids.reshape(-1).to(torch.int64)
    m = ids.shape[0]
    if m == 0:
        return ids
    if _host_checkable(ids):
        lo, hi = ids.aminmax()
        if int(lo) < 0 or int(hi) >= m:
            value = int(lo) if int(lo) < 0 else int(hi)
            raise ValueError(f"group_ids holds {value}, outside [0, M) = [0, {m}) for M = {m} positions")
    else:
        torch._assert_async(((ids >= 0) & (ids < m)).all(), "group_ids outside [0, M)")
    return ids


def _check_target_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    if target.numel() == 0:
        return
    if _host_checkable(target):
        # One pass in the common, valid case; the offending value is looked up only on failure.
        lo, hi = torch.where(target == ignore_index, 0, target).aminmax()
        if int(lo) < 0 or int(hi) >= num_classes:
            bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
            value = int(target[bad][0])
            raise ValueError(f"target holds {value}, outside [0, {num_classes}) and not ignore_index={ignore_index}")
    else:
        bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
        torch._assert_async(~bad.any(), "target outside [0, C) and not ignore_index")


def _triton_unavailable_reason(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({exc})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"input is on {device}; the Triton kernels need a CUDA tensor "
        "(or TRITON_INTERPRET=1 to run them on the CPU in Triton's interpreter)"
    )


@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs: a host-side fact about the machine, constant under torch.compile."""
    if backend == "auto":
        if device.type == "cuda" and _triton_unavailable_reason(device) is None:
            return "triton"
        if native.is_available(device):
            return "native"
        return "reference"
    if backend == "triton":
        reason = _triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run here: {reason}")
    elif backend == "native":
        reason = native.unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend='native' cannot run here: {reason}")
    return backend


def _options(
    keep_ratio: float | Tensor,
    keep: str,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    score_offset: Tensor | None,
    chunk_size: int | None = None,
    result_dtype: torch.dtype | None = None,
    rule: tuple = (None, None, 0),
    head: tuple = (None, 0.0),
    groups: tuple = (None, "mean"),
) -> TrimOptions:
    """The one options record every backend receives, from validated public arguments; ``rule``
    is ``(keep_count, keep_threshold, min_kept)`` from :func:`_check_keep_rule`, ``head``
    ``(logit_softcap, z_loss)``, ``groups`` ``(group_ids, group_reduction)``."""
    keep_count, keep_threshold, min_kept = rule
    return TrimOptions(
        group_ids=groups[0],
        group_reduction=groups[1],
        logit_softcap=head[0],
        z_loss=head[1],
        keep_ratio=keep_ratio,
        keep_count=keep_count,
        keep_threshold=keep_threshold,
        min_kept=min_kept,
        keep=Keep[keep.upper()],
        weight=weight,
        ignore_index=ignore_index,
        label_smoothing=float(label_smoothing),
        reduction=Reduction[reduction.upper()],
        score_offset=score_offset,
        chunk_size=chunk_size,
        result_dtype=result_dtype,
    )


def _backend_context(cast_to: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """Where a backend runs: with autocast off for ``device``'s type when it was on (``cast_to``),
    so that no op inside a backend is cast again: the dispatch layer has applied autocast's rule
    once, for every backend (see :func:`trimmed_linear_cross_entropy`)."""
    return contextlib.nullcontext() if cast_to is None else torch.autocast(device.type, enabled=False)


def resolve_backend(backend: str = "auto", device: torch.device | str = "cpu") -> str:
    """The backend that a call with ``backend`` on a tensor on ``device`` runs.

    ``"auto"`` gives ``"triton"`` for a CUDA device where Triton runs, else ``"native"`` where the
    native op is available, else ``"reference"``. A named backend comes back as it is, or raises
    :class:`RuntimeError` saying why it cannot run on ``device``. Resolving loads the native op (on
    a machine's first use it compiles it): call this before a timed loop to keep that out of the
    timing, or to log which backend a run used.

    Example::

        >>> fused_trim.resolve_backend("auto", "cpu")  # doctest: +SKIP
        'native'
    """
    check_choice("backend", backend, BACKENDS)
    return _resolve_backend(backend, torch.device(device))


def _backend_fn(name: str):
    if name == "triton":
        from .triton import trimmed_cross_entropy_2d
    elif name == "native":
        trimmed_cross_entropy_2d = native.trimmed_cross_entropy_2d
    else:
        trimmed_cross_entropy_2d = _reference.trimmed_cross_entropy_2d
    return trimmed_cross_entropy_2d


def trimmed_cross_entropy(
    input: Tensor,
    target: Tensor,
    keep_ratio: float | Tensor | None = None,
    *,
    keep_count: int | Tensor | None = None,
    keep_threshold: float | Tensor | None = None,
    min_kept: int | None = None,
    keep: str = "hardest",
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    return_info: bool = False,
    process_group: ProcessGroup | None = None,
    score_offset: Tensor | None = None,
    logit_softcap: float | None = None,
    z_loss: float = 0.0,
    group_ids: Tensor | str | None = None,
    group_reduction: str = "mean",
) -> Tensor | tuple[Tensor, TrimInfo]:
    r"""Cross-entropy over only the hardest (or easiest) samples of a mini-batch.

    The per-sample losses :math:`l_i` are exactly those of
    ``F.cross_entropy(input, target, weight, ignore_index=..., label_smoothing=..., reduction="none")``.
    Of the :math:`n` valid samples (``target != ignore_index``) the :math:`k` with the largest
    losses (``keep="hardest"``) or smallest (``keep="easiest"``) form the kept set :math:`K`. One
    keep rule sets :math:`k`: the ratio :math:`r` (:math:`k = \min(n, \max(1, \lfloor r n + 0.5
    \rfloor))`, mini-batch trimming), a count (:math:`k = \min(n, c)`, Ordered SGD) or a threshold
    (every sample whose loss is strictly past it, at least :math:`\min(n, m)`: OHEM). Ties go to the
    lower flat index; NaN ranks above ``+inf``. :math:`k` is decided on the device (no host
    synchronisation). The selection is a constant for autograd: the gradient is exactly zero on
    samples outside :math:`K`.

    Args:
        input: logits of shape ``(N, C)``, ``(C,)`` or ``(N, C, d1, ..., dk)``.
        target: class indices of shape ``(N,)``, ``()`` or ``(N, d1, ..., dk)``. A sample is one
            target position, so a segmentation map is trimmed over pixels.
        keep_ratio: fraction :math:`r \in (0, 1]` of valid samples to keep; a float or a 0-dim
            tensor (a tensor avoids recompiles under ``torch.compile``). ``1.0`` gives
            ``F.cross_entropy``. ``None`` (the default) means "not given": a ratio of 1.0 unless
            ``keep_count`` or ``keep_threshold`` sets :math:`k`. Exactly one of the three may be given.
        keep_count: keep :math:`k = \min(n, c)` samples, for ``c >= 0`` an int or a 0-dim integer
            tensor (Ordered SGD's fixed count; ``0`` keeps none: a NaN mean).
        keep_threshold: keep every valid sample whose loss (score, with ``score_offset``) is
            strictly above this value for ``keep="hardest"`` (a NaN loss counts as above), strictly
            below for ``"easiest"``, compared in float64; a finite float or a 0-dim floating tensor.
            A probability threshold :math:`p` (mmsegmentation's ``OHEMPixelSampler(thresh=p)``
            keeps pixels whose target probability is below :math:`p`) is
            ``keep_threshold=-math.log(p)`` with ``keep="hardest"``.
        min_kept: with ``keep_threshold`` only: keep at least :math:`\min(n, m)` samples, the ones
            past the threshold and then the next ones in ranking order (default 0: with none past
            the threshold nothing is kept and the mean is NaN).
        keep: ``"hardest"`` (mini-batch trimming, OHEM) or ``"easiest"`` (trimmed loss against
            noisy labels).
        weight: class weights of shape ``(C,)``, as in ``F.cross_entropy``.
        ignore_index: target value of samples that are never kept and get no gradient.
        label_smoothing: in ``[0, 1]``, as in ``F.cross_entropy``.
        reduction: ``"mean"`` (:math:`\sum_K l_i / \sum_K w_{y_i}`; NaN when :math:`k = 0`),
            ``"sum"`` or ``"none"`` (the target's shape, :math:`l_i` on :math:`K`, 0 elsewhere).
        backend: ``"auto"`` (Triton for CUDA tensors, the native op on the CPU when it is built,
            else the reference), ``"triton"``, ``"native"`` or ``"reference"``.
        return_info: also return a :class:`~fused_trim.TrimInfo` with the detached per-sample
            losses, the kept mask, ``k`` and the threshold loss.
        process_group: a ``torch.distributed`` group (e.g. ``dist.group.WORLD``): the kept set
            is chosen over the global batch of all its ranks, and each rank's loss is scaled so
            that DDP's gradient averaging gives the gradient of the global trimmed loss (see
            :mod:`fused_trim.distributed`); ``info.global_loss`` is the value to log.
        score_offset: a floating-point tensor of the target's shape on the input's device, or
            ``None``. Samples are then ranked by the score :math:`s_i = l_i - o_i`, formed in the
            accumulation dtype (fp32; fp64 for fp64 input; the offset is converted to it), with
            the same rules (ties to the lower index, NaN scores first); the reduction and the
            gradient are still those of the plain :math:`l_i` over :math:`K`. A constant for
            autograd: an offset that requires grad is used detached. ``info.threshold`` is then
            the k-th score and ``info.scores`` holds every score. With a frozen reference model's
            per-token losses as the offset this is Rho-1's excess-loss token selection.
        logit_softcap: ``c > 0`` (finite) or ``None``: every logit :math:`z` becomes
            :math:`c \tanh(z / c)` before the softmax, the smoothing and the loss (Gemma 2's final
            logit soft-capping, ``c = 30``); the gradient gains the factor :math:`1 - \tanh^2(z/c)`.
        z_loss: :math:`\lambda \ge 0`: each valid sample's loss becomes
            :math:`l_i + \lambda\, \mathrm{lse}_i^2` (PaLM's z-loss; :math:`\mathrm{lse}_i` the
            logsumexp of the capped logits; the term is not multiplied by the class weight). The
            ranking, the reduction and the gradient use this total; ``info.z_loss`` is its z part
            reduced over :math:`K`. ``0`` (the default) is exactly the plain loss.
        group_ids: ``None`` (each position is a sample), ``"rows"`` (each index of the target's
            first dimension is one sample: ``(B, T)`` token targets trim whole sequences,
            ``(N, H, W)`` maps whole images), or an integer tensor of the target's shape whose
            equal ids form one sample (ids in ``[0, M)`` for ``M`` positions, any order, gaps
            allowed: packed documents). The keep rule then ranks and counts *groups*: a group's
            score is the mean (``group_reduction="mean"``) or sum (``"sum"``) of its valid
            positions' losses (scores, with ``score_offset``); :math:`n` counts the groups with a
            valid position (the others are never kept); ties go to the lower group id (for
            ``"rows"``, the row), NaN ranks above ``+inf``. :math:`K` is every valid position of
            the kept groups, and the loss and gradient are those of the plain per-position losses
            over it (``"mean"``: :math:`\sum_K l_i / \sum_K w_{y_i}`). Scored on the device in
            a fixed order (bitwise repeatable), without a host synchronisation. ``info.k`` and
            ``info.threshold`` are then the number of kept groups and the k-th group score, and
            ``info.group_scores`` / ``info.group_kept`` hold every group's. With a
            ``process_group`` each rank's groups are its own and the selection runs over all
            ranks' groups. ``keep="hardest", group_ids="rows"`` is mini-batch trimming per
            sequence; ``keep="easiest"`` is loss truncation (Kang & Hashimoto, 2020).
        group_reduction: ``"mean"`` (default) or ``"sum"``: how a group's score is formed.

    Returns:
        The loss, in ``input``'s dtype (fp32 for bf16/fp16 input under ``torch.autocast``); with
        ``return_info=True`` the pair ``(loss, info)``.

    Note:
        Inputs with spatial dimensions ``(N, C, d1, ...)`` are read in place (the class dimension
        strided) by the native CPU and Triton kernels; the reference and the native CUDA op first
        move them to ``(N * d1 * ..., C)`` with one copy.

    Note:
        Under ``torch.autocast`` (for the input's device type) the op behaves as ``F.cross_entropy``
        does there: the loss of bf16/fp16 logits is formed and returned in fp32 (as are
        ``info.losses`` and ``info.threshold``), the gradient comes back in the logits' dtype. The
        logits are read as they are (the native backend first widens them to fp32: one copy).
    """
    keep_ratio, *rule = _check_keep_rule(keep_ratio, keep_count, keep_threshold, min_kept)
    check_choice("keep", keep, KEEP_CHOICES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    _reject_dtensors(input=input, target=target, weight=weight, score_offset=score_offset)
    _check_shapes(input, target)
    _check_scalar_options(ignore_index, label_smoothing)
    head = (check_logit_softcap(logit_softcap), check_z_loss(z_loss))
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    _check_weight(weight, num_classes, input)
    offset = _check_score_offset(score_offset, target, input)
    groups = (_check_group_ids(group_ids, group_reduction, target), group_reduction)
    name = _resolve_backend(backend, input.device)
    if not (name == "native" and input.device.type == "cpu"):
        # The native CPU op checks the class range in its own pass over the targets, before any
        # result exists, and raises the same ValueError: a second pass here would cost more than
        # the whole op at small shapes.
        _check_target_range(target, num_classes, ignore_index)

    # Normalise to (M, C) rows, or to the spatial layout (N, C, S), in the target's flat order.
    if input.dim() == 1:
        x2d = input.unsqueeze(0)
    elif input.dim() == 2:
        x2d = input
    else:
        rows = input.movedim(1, -1)
        if rows.is_contiguous():
            x2d = rows.reshape(-1, num_classes)  # channels-last: (N*S, C) is a view
        else:
            x2d = input.reshape(input.shape[0], num_classes, -1)  # a view when contiguous
    t1d = target.reshape(-1)
    if t1d.shape[0] == 0:
        name = "reference"  # an empty batch launches no kernel (a rank may still join collectives)
    # Under autocast F.cross_entropy forms bf16/fp16 logits' loss in fp32: so do the backends (their
    # statistics are fp32 anyway), and the loss comes back in fp32; the logits are read as they are.
    cast_to = autocast_dtype(input.device)
    result_dtype = None if cast_to is None else autocast_result_dtype(input.dtype)
    opts = _options(
        keep_ratio,
        keep,
        weight,
        ignore_index,
        label_smoothing,
        reduction,
        offset,
        None,
        result_dtype,
        rule,
        head,
        groups,
    )
    global_loss = None
    with _backend_context(cast_to, input.device):
        if process_group is None:
            out, losses, kept, k, threshold, lse = _backend_fn(name)(x2d, t1d, opts)
        else:
            from .distributed import trimmed_cross_entropy_global

            out, losses, kept, k, threshold, lse, global_loss = trimmed_cross_entropy_global(
                _backend_fn(name), x2d, t1d, opts, process_group
            )
    dtype = out_dtype(opts, input.dtype)
    return _result(out, losses, kept, k, threshold, lse, global_loss, opts, t1d, target, dtype, return_info)


def _result(
    out: Tensor,
    losses: Tensor,
    kept: Tensor,
    k: Tensor,
    threshold: Tensor,
    lse: Tensor | None,
    global_loss: Tensor | None,
    opts: TrimOptions,
    t1d: Tensor,
    target: Tensor,
    dtype: torch.dtype,
    return_info: bool,
) -> Tensor | tuple[Tensor, TrimInfo]:
    """A backend's flat results in the target's shape: the loss, and with ``return_info`` its info."""
    if out.dim() == 1:  # reduction="none"
        out = out.reshape(target.shape)
    if not return_info:
        return out
    offset, shape = opts.score_offset, target.shape
    scores = None if offset is None else ranking_scores(losses, offset).reshape(shape)
    z = None if lse is None else reduced_z_loss(lse, kept, t1d, opts, dtype)
    if z is not None and z.dim() == 1:
        z = z.reshape(shape)
    lse = None if lse is None else lse.reshape(shape)
    groups = (None, None)
    if opts.group_ids is not None:
        groups = group_info(losses, kept, t1d != opts.ignore_index, opts)
    losses = losses.to(dtype).reshape(shape)  # (the backends rank them in fp32 / fp64)
    return out, TrimInfo(losses, kept.reshape(shape), k, threshold, global_loss, scores, lse, z, *groups)


def _check_linear_shapes(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor) -> None:
    for name, value in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if linear_bias is not None and not isinstance(linear_bias, Tensor):
        raise TypeError(f"linear_bias must be a tensor or None, got {type(linear_bias).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor of hidden states, got dtype {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have shape (*, D), got a 0-dim tensor")
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must have shape (V, D), got {tuple(linear_weight.shape)}")
    num_classes, in_features = linear_weight.shape
    if input.shape[-1] != in_features:
        raise ValueError(
            f"input has D = {input.shape[-1]} features (shape {tuple(input.shape)}) but linear_weight "
            f"has D = {in_features} (shape {tuple(linear_weight.shape)})"
        )
    if num_classes == 0:
        raise ValueError(f"linear_weight has no classes (V = 0), shape {tuple(linear_weight.shape)}")
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes,):
        raise ValueError(f"linear_bias must have shape (V,) = ({num_classes},), got {tuple(linear_bias.shape)}")
    for name, value in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if value is None:
            continue
        if value.dtype != input.dtype:
            raise TypeError(
                f"{name} has dtype {value.dtype} but input has dtype {input.dtype}: convert one of them, "
                "or call under torch.autocast, which casts both as F.linear does"
            )
        if value.device != input.device:
            raise ValueError(f"{name} is on {value.device} but input is on {input.device}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}: "
            f"expected target of shape {tuple(input.shape[:-1])}"
        )
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")


def _linear_backend_fn(name: str):
    if name == "triton":
        from .triton import trimmed_linear_cross_entropy_2d
    elif name == "native":
        trimmed_linear_cross_entropy_2d = native.trimmed_linear_cross_entropy_2d
    else:
        trimmed_linear_cross_entropy_2d = _reference.trimmed_linear_cross_entropy_2d
    return trimmed_linear_cross_entropy_2d


def trimmed_linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    keep_ratio: float | Tensor | None = None,
    *,
    keep_count: int | Tensor | None = None,
    keep_threshold: float | Tensor | None = None,
    min_kept: int | None = None,
    linear_bias: Tensor | None = None,
    keep: str = "hardest",
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    return_info: bool = False,
    process_group: ProcessGroup | None = None,
    chunk_size: int | None = None,
    score_offset: Tensor | None = None,
    logit_softcap: float | None = None,
    z_loss: float = 0.0,
    group_ids: Tensor | str | None = None,
    group_reduction: str = "mean",
) -> Tensor | tuple[Tensor, TrimInfo]:
    r"""The LM head fused with trimming: ``trimmed_cross_entropy(F.linear(input, linear_weight,
    linear_bias), target, keep_ratio, ...)`` without ever holding the ``(N, V)`` logits.

    The forward computes every row's loss (logits in chunks of about ``chunk_size`` rows; on the
    GPU a cuBLAS GEMM per chunk, balanced chunks of whole 256-row tiles), the kept set is chosen on those losses
    exactly as :func:`trimmed_cross_entropy` chooses it, and the backward recomputes the logits of
    the kept rows only: about ``2 N D V + 6 k D V`` FLOPs per step instead of ``6 N D V``
    (``1 + 3 k / N`` forward-sized matmuls against 3: cheaper below a keep ratio of about 0.67).
    With a Python float ``keep_ratio`` of 1.0 and ``reduction`` ``"mean"``/``"sum"`` (no
    ``score_offset`` or ``process_group``, a gradient required) every valid row is kept and known
    before the forward, so the native and Triton backends form the gradient during the forward
    instead (3 matmuls, not 4; the reference recomputes at every ratio). Below 1.0 the kept set is
    known only after the forward and the backward recomputes (up to 4 matmuls near 1.0). The
    gradients of ``input``, ``linear_weight`` and ``linear_bias`` are accumulated in fp32 in a
    fixed order: bitwise repeatable. Rows outside the kept set get an exactly zero ``input``
    gradient. On CUDA nothing synchronises with the host: with a Python float ratio ``r`` the
    backward processes ``min(N, max(1, floor(r N + 0.5)))`` gathered rows (a bound on ``k`` known on
    the host; rows beyond ``k`` contribute zero), with a tensor ratio all ``N`` rows. The CPU
    backends gather exactly the kept rows.

    A ``DTensor`` ``linear_weight`` or ``linear_bias`` (the parameter of an FSDP2 ``fully_shard``-ed
    head read outside the head's forward, or any sharded or replicated DTensor) is gathered over its
    device mesh for the call (one all-gather; the full tensor is held for the backward, as FSDP2
    holds an unsharded parameter), and its gradient comes back as a DTensor in the parameter's
    placements holding the mean over the mesh of each rank's gradient (a reduce-scatter), as FSDP2
    and DDP average data-parallel gradients. Inside the head module's forward FSDP2 has gathered the
    parameter itself (a plain tensor there) and its own hooks reduce the gradient; the Hugging Face
    integration calls the op there. ``input``, ``target``, ``weight`` and ``score_offset`` are this
    rank's plain tensors (a DTensor raises).

    Args:
        input: hidden states ``(*, D)``; ``(N, D)`` for ``N`` tokens.
        linear_weight: the head's weight ``(V, D)`` (``model.lm_head.weight``), of ``input``'s
            dtype (under ``torch.autocast`` any floating dtype: both are cast, see below); a plain
            tensor or a DTensor (see above).
        target: class indices of shape ``*`` (``input.shape[:-1]``).
        keep_ratio, keep_count, keep_threshold, min_kept: the keep rule, as in
            :func:`trimmed_cross_entropy` (exactly one of the first three; ``None`` is not given).
        linear_bias: the head's bias ``(V,)`` or ``None``.
        keep, weight, ignore_index, label_smoothing, reduction, return_info, process_group,
            score_offset: as in :func:`trimmed_cross_entropy`; ``weight`` is the per-*class* weight
            ``(V,)``; ``score_offset`` has the target's shape (one value per token: rank by
            ``l_i - score_offset_i``, e.g. Rho-1's excess loss over a reference model).
        group_ids, group_reduction: as in :func:`trimmed_cross_entropy` (``"rows"``: each index of
            ``input.shape[0]`` is a sample, so ``(B, T, D)`` hidden states trim whole sequences);
            the backward still recomputes only the kept rows.
        logit_softcap, z_loss: as in :func:`trimmed_cross_entropy`, on the logits
            ``F.linear(input, linear_weight, linear_bias)`` (the cap after the bias; no capped
            logits are stored).
        backend: ``"auto"`` (Triton for CUDA tensors, the native op on the CPU), ``"triton"``,
            ``"native"`` or ``"reference"``.
        chunk_size: rows of logits held at a time (forward and backward). ``None`` picks
            ``ceil(max(N * D, 2**22) / V)`` rows (rounded up to a multiple of 8, at most ``N``):
            a chunk of fp32 logits about the size of the input, and at least 16 MiB.

    Returns:
        The loss in ``input``'s dtype (``"none"``: of ``target``'s shape; fp32 under autocast, see
        below); with ``return_info=True`` the pair ``(loss, info)``.

    Note:
        Under ``torch.autocast`` (for the input's device type) the op behaves as ``F.linear``
        followed by ``F.cross_entropy`` does there: ``input``, ``linear_weight`` and ``linear_bias``
        are cast to the autocast dtype as ``F.linear`` casts them (floating tensors other than
        fp64), so bf16 hidden states with an fp32 head work; the loss is formed and returned in
        fp32, and each gradient comes back in its parameter's own dtype. The logits themselves are
        accumulated in fp32 and never rounded to bf16 (the unfused path rounds them), so the result
        is closer to float64. Outside autocast ``input`` and the head must share a dtype.

    Example::

        loss = trimmed_linear_cross_entropy(hidden, model.lm_head.weight, labels, keep_ratio=0.2)
    """
    keep_ratio, *rule = _check_keep_rule(keep_ratio, keep_count, keep_threshold, min_kept)
    check_choice("keep", keep, KEEP_CHOICES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    chunk_size = check_chunk_size(chunk_size)
    _reject_dtensors(input=input, target=target, weight=weight, score_offset=score_offset)
    linear_weight, linear_bias = _gathered(linear_weight), _gathered(linear_bias)
    cast_to = autocast_dtype(input.device) if isinstance(input, Tensor) else None
    if cast_to is not None:
        # Autocast's rule for F.linear: its floating operands (fp64 excepted) in the autocast dtype,
        # differentiably, so each parameter's gradient comes back in its own dtype.
        input, linear_weight, linear_bias = (
            autocast_cast(t, cast_to) if isinstance(t, Tensor) else t for t in (input, linear_weight, linear_bias)
        )
    _check_linear_shapes(input, linear_weight, linear_bias, target)
    _check_scalar_options(ignore_index, label_smoothing)
    head = (check_logit_softcap(logit_softcap), check_z_loss(z_loss))
    num_classes, in_features = linear_weight.shape
    _check_weight(weight, num_classes, input)
    offset = _check_score_offset(score_offset, target, input)
    groups = (_check_group_ids(group_ids, group_reduction, target), group_reduction)
    name = _resolve_backend(backend, input.device)
    _check_target_range(target, num_classes, ignore_index)

    x2d = input.reshape(-1, in_features)
    t1d = target.reshape(-1)
    if chunk_size is None:
        chunk_size = default_chunk_size(x2d.shape[0], in_features, num_classes)
    if t1d.shape[0] == 0:
        name = "reference"
    fn = _linear_backend_fn(name)
    # ... and F.cross_entropy's: the loss of those (never rounded) logits formed and returned in fp32.
    result_dtype = None if cast_to is None else autocast_result_dtype(input.dtype)
    opts = _options(
        keep_ratio,
        keep,
        weight,
        ignore_index,
        label_smoothing,
        reduction,
        offset,
        chunk_size,
        result_dtype,
        rule,
        head,
        groups,
    )
    global_loss = None
    with _backend_context(cast_to, input.device):
        if process_group is None:
            out, losses, kept, k, threshold, lse = fn(x2d, linear_weight, linear_bias, t1d, opts)
        else:
            from .distributed import trimmed_linear_cross_entropy_global

            out, losses, kept, k, threshold, lse, global_loss = trimmed_linear_cross_entropy_global(
                fn, x2d, linear_weight, linear_bias, t1d, opts, process_group
            )
    dtype = out_dtype(opts, input.dtype)
    return _result(out, losses, kept, k, threshold, lse, global_loss, opts, t1d, target, dtype, return_info)
