"""Pieces shared by the dispatch layer and every backend: names, codes, the options record, ``k``
and the info record."""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import torch
from torch import Tensor

KEEP_CHOICES = ("hardest", "easiest")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "native", "reference")


class Reduction(enum.IntEnum):
    """The reduction as every backend's kernels take it. ``enum Reduction`` in
    ``csrc/trimmed_ce_common.h`` and the ``REDUCTION_*`` constexprs of ``triton/_radix.py`` mirror
    these values."""

    NONE = 0
    MEAN = 1
    SUM = 2


class Keep(enum.IntEnum):
    """The keep direction; ``bool(keep)`` is the ``easiest`` flag of the C++ ops and the
    ``EASIEST`` constexpr of the Triton kernels."""

    HARDEST = 0
    EASIEST = 1


class TrimOptions(NamedTuple):
    """Every option of a trimmed loss, validated once by :mod:`fused_trim.functional` and handed
    as one record to each backend entry point and to :mod:`fused_trim.distributed`, which derives
    its variants with ``opts._replace(...)``.

    ``keep_ratio`` is a Python float in ``(0, 1]`` or a 0-dim tensor: floating (a ratio) or, inside
    the library, int64 (an exact count, a rank's share of a global selection). ``score_offset`` is
    flat ``(M,)`` and detached. ``chunk_size`` (rows of logits at a time) is the LM head's and
    always set there. ``result_dtype`` is the dtype of ``out`` and ``threshold`` (``None``: the
    input's); under ``torch.autocast`` the dispatch layer sets it to fp32 for bf16/fp16 inputs
    (:func:`autocast_dtype`).

    The keep rule (:func:`keep_k`): ``keep_count`` (an int >= 0 or a 0-dim int64 tensor) when not
    ``None``, else ``keep_threshold`` (a finite float or a 0-dim floating tensor) with ``min_kept``
    when not ``None``, else ``keep_ratio``; with a count or a threshold ``keep_ratio`` is 1.0 and
    unused. ``group_ids`` (``None``: every position is its own unit) makes groups of positions
    the unit the rule ranks and counts: an ``int`` ``B`` (``group_ids="rows"``: ``B`` consecutive
    runs of ``M // B`` positions) or a flat ``(M,)`` int64 tensor of ids in ``[0, M)``;
    ``group_reduction`` (``"mean"`` or ``"sum"``) forms a group's score (:mod:`fused_trim._groups`).
    The fields after ``group_reduction`` belong to options other backends implement; their
    defaults mean "off".
    """

    keep_ratio: float | Tensor = 1.0
    keep: Keep = Keep.HARDEST
    weight: Tensor | None = None
    ignore_index: int = -100
    label_smoothing: float = 0.0
    reduction: Reduction = Reduction.MEAN
    score_offset: Tensor | None = None
    chunk_size: int | None = None
    keep_count: int | Tensor | None = None
    keep_threshold: float | Tensor | None = None
    min_kept: int = 0
    group_ids: Tensor | int | None = None
    group_reduction: str = "mean"
    logit_softcap: float | None = None
    z_loss: float = 0.0
    result_dtype: torch.dtype | None = None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every sum, max and exp: fp64 for fp64 input, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def out_dtype(opts: TrimOptions, input_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a backend's ``out`` and ``threshold``: ``opts.result_dtype``, else the input's."""
    return input_dtype if opts.result_dtype is None else opts.result_dtype


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype (what ``F.linear`` casts its operands to) when ``torch.autocast`` is on
    for ``device``'s type, else ``None``. ``torch.compile`` reads it as the state it traces under."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def autocast_cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` as autocast casts an operand of a lower-precision op: floating tensors other than
    fp64 go to ``dtype`` (differentiably: the gradient comes back in ``t``'s own dtype)."""
    if t is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
        return t
    return t.to(dtype)


def autocast_result_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The loss dtype ``F.cross_entropy`` gives under autocast for logits of ``dtype``: fp32 for
    bf16/fp16 (the op is on autocast's fp32 list), else ``None`` (the input's own dtype)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else None


def double_backward_message(op: str) -> str:
    """The error every backend raises when a second backward reaches ``op``'s gradient (the C++
    ops carry the same text for ``trimmed_cross_entropy``)."""
    return f"double backward of {op} is not supported; use backend='reference'"


class TrimInfo(NamedTuple):
    """What ``return_info=True`` returns beside the loss.

    Attributes:
        losses: per-sample losses ``l_i`` (detached, the target's shape, input dtype);
            0 on ignored samples.
        kept: bool mask of the kept set K (the target's shape).
        k: 0-dim int64 tensor, the number of kept samples.
        threshold: 0-dim tensor, the loss of the k-th sample in ranking order (the smallest kept
            loss for ``keep="hardest"``, the largest for ``"easiest"``); NaN when ``k == 0``.
            With a ``score_offset``, the k-th *score* ``l_i - score_offset_i`` instead.
        global_loss: with a ``process_group``, the global loss for logging (the global mean or
            sum; the global sum for ``reduction="none"``); ``None`` otherwise. ``k`` and
            ``threshold`` are then global too, ``losses`` and ``kept`` this rank's.
        scores: with a ``score_offset``, the ranked scores ``l_i - score_offset_i`` (detached,
            the target's shape, in the accumulation dtype: fp32, fp64 for fp64 input; ignored
            samples hold ``-score_offset_i`` and are never kept); ``None`` otherwise.
        lse: per-sample logsumexp of the (soft-capped) logits (detached, the target's shape, the
            accumulation dtype); 0 on ignored samples.
        z_loss: the z term ``z_loss * lse_i**2`` reduced over the kept set as the loss is (its
            mean over ``sum w[y_i]``, its sum, or per sample), included in the loss; ``None``
            without ``z_loss``. With a ``process_group``, over this rank's kept samples.
        group_scores: with ``group_ids``, each group's score (the mean or sum of its valid
            positions' losses, or scores with a ``score_offset``; the accumulation dtype): shape
            ``(target.shape[0],)`` for ``"rows"``, ``(M,)`` indexed by id for an id tensor, where
            ids that no valid position holds (gaps, all-ignored groups) hold 0 and are never kept.
            ``k`` then counts groups and ``threshold`` is the k-th group score. ``None`` otherwise.
        group_kept: with ``group_ids``, the bool mask of the kept groups (``group_scores``' shape);
            ``None`` otherwise.
    """

    losses: Tensor
    kept: Tensor
    k: Tensor
    threshold: Tensor
    global_loss: Tensor | None = None
    scores: Tensor | None = None
    lse: Tensor | None = None
    z_loss: Tensor | None = None
    group_scores: Tensor | None = None
    group_kept: Tensor | None = None


def check_ratio(name: str, value: object) -> float:
    """A Python float (or int) in ``(0, 1]``, else a ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:  # also false for NaN
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """``ValueError`` naming ``name`` and ``value`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_ignore_index(value: object) -> int:
    """An int (not a bool), else a ``TypeError`` naming ``ignore_index``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ignore_index must be an int, got {value!r}")
    return value


def check_label_smoothing(value: object) -> float:
    """A Python float (or int) in ``[0, 1]``, else a ``TypeError``/``ValueError`` naming ``label_smoothing``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"label_smoothing must be a float in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:  # also false for NaN
        raise ValueError(f"label_smoothing must be in [0, 1], got {value!r}")
    return float(value)


def check_weight(weight: object, num_classes: int | None = None) -> None:
    """``None`` or a 1-D floating-point tensor of class weights (of length ``num_classes`` when
    given), else a ``ValueError``/``TypeError`` naming ``weight`` and what it got."""
    if weight is None:
        return
    wrong_length = isinstance(weight, Tensor) and num_classes is not None and weight.shape[-1:] != (num_classes,)
    if not isinstance(weight, Tensor) or weight.dim() != 1 or wrong_length:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        length = "" if num_classes is None else f" of length C = {num_classes}"
        raise ValueError(f"weight must be a 1-D tensor{length}, got {shape}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got dtype {weight.dtype}")


def host_k(n: int, keep_ratio: float) -> int:
    """:func:`compute_k` for a host count and ratio: ``min(n, max(1, floor(keep_ratio * n + 0.5)))``
    (``0`` when ``n = 0``). With ``n`` the number of rows it bounds ``k`` without reading a tensor."""
    return min(n, max(1, math.floor(keep_ratio * n + 0.5))) if n > 0 else 0


def keeps_all(opts: TrimOptions) -> bool:
    """Whether every valid sample is known to be kept before any loss exists: the ratio rule with a
    Python float ratio of 1.0 (not a count, which may be below ``n``, nor a threshold). The one
    condition of every keep-all fast path."""
    return (
        opts.keep_count is None
        and opts.keep_threshold is None
        and opts.group_ids is None
        and not isinstance(opts.keep_ratio, Tensor)
        and opts.keep_ratio == 1.0
    )


def forms_gradient_in_forward(opts: TrimOptions, params: tuple[Tensor | None, ...], share) -> bool:
    """Whether an LM-head backend may form the gradient during the forward (3 matmuls, not 4).

    Only when every valid row is known to be kept before the forward (:func:`keeps_all`, no global
    ``share``, no ``score_offset`` whose threshold would be a score), the reduction is a scalar (its
    upstream gradient one number to scale by in the backward), and a gradient of one of ``params``
    is wanted.
    """
    return (
        keeps_all(opts)
        and share is None
        and opts.score_offset is None
        and opts.reduction != Reduction.NONE
        and torch.is_grad_enabled()
        and any(p is not None and p.requires_grad for p in params)
    )


def compute_k(n: Tensor, keep_ratio: float | Tensor) -> Tensor:
    """``k = min(n, max(1, floor(keep_ratio * n + 0.5)))`` in float64; ``k = 0`` when ``n = 0``.

    Works on device tensors without a host synchronisation.

    Args:
        n: 0-dim integer tensor, the number of valid samples.
        keep_ratio: a float or a 0-dim floating-point tensor in ``(0, 1]``; internally also a
            0-dim *integer* tensor, an exact count (``k = min(n, keep_ratio)``), which is how
            :mod:`fused_trim.distributed` hands each rank its share of a global selection.
    """
    if isinstance(keep_ratio, Tensor) and not keep_ratio.is_floating_point():
        return torch.minimum(keep_ratio.to(device=n.device, dtype=torch.int64), n.to(torch.int64))
    nf = n.to(torch.float64)
    r = keep_ratio.to(device=n.device, dtype=torch.float64) if isinstance(keep_ratio, Tensor) else keep_ratio
    k = torch.floor(r * nf + 0.5).clamp(min=1.0)
    k = torch.minimum(k, nf)
    return k.to(torch.int64)


def past_threshold(scores: Tensor, valid: Tensor, threshold: float | Tensor, keep: Keep) -> Tensor:
    """Which valid samples are strictly past ``threshold``: ``score > threshold`` for
    ``keep="hardest"`` (a NaN score too: NaN ranks above +inf), ``score < threshold`` for
    ``"easiest"`` (never a NaN), compared in float64, so a threshold between two representable
    losses of a lower precision is not rounded onto one of them. ``-0.0 == +0.0``."""
    s = scores.to(torch.float64)
    t = threshold.to(device=s.device, dtype=torch.float64) if isinstance(threshold, Tensor) else float(threshold)
    past = s < t if keep == Keep.EASIEST else (s > t) | torch.isnan(s)
    return past & valid


def keep_k(n: Tensor, opts: TrimOptions, past: Tensor | None = None) -> Tensor:
    """The number of samples to keep, ``k``, as a 0-dim int64 device tensor: the one keep rule.

    * ``keep_count`` set: ``k = min(n, keep_count)`` (Ordered SGD);
    * ``keep_threshold`` set: ``k = max(min(n, min_kept), past)``, ``past`` the number of valid
      samples strictly past the threshold (:func:`past_threshold`; OHEM);
    * else the ratio: :func:`compute_k`.

    ``n`` (and ``past``) are 0-dim integer tensors, counted over whatever is ranked (samples, or
    groups of them); with a process group the global counts. No host synchronisation.
    """
    n = n.to(torch.int64)
    if opts.keep_count is not None:
        count = opts.keep_count
        if isinstance(count, Tensor):
            return torch.minimum(count.to(device=n.device, dtype=torch.int64), n)
        return n.clamp(max=int(count))
    if opts.keep_threshold is not None:
        if past is None:
            raise ValueError("the threshold rule needs the count of samples past the threshold")
        return torch.maximum(n.clamp(max=int(opts.min_kept)), past.to(device=n.device, dtype=torch.int64))
    return compute_k(n, opts.keep_ratio)


def rule_k(scores: Tensor, valid: Tensor, opts: TrimOptions) -> Tensor:
    """:func:`keep_k` over ranked values ``scores`` (``(M,)``, what the selection ranks) of which
    ``valid`` take part: ``n`` and, for the threshold rule, ``past`` counted here."""
    n = valid.sum()
    past = None
    if opts.keep_threshold is not None:
        past = past_threshold(scores, valid, opts.keep_threshold, opts.keep).sum()
    return keep_k(n, opts, past)


def kernel_ratio(opts: TrimOptions) -> float | Tensor:
    """What the kernels' ratio argument takes for the ratio or the count rule: ``keep_ratio``, or
    ``keep_count`` as an exact int64 count tensor (a host count on the CPU). Not for a threshold,
    whose ``k`` depends on the losses."""
    count = opts.keep_count
    if count is None:
        return opts.keep_ratio
    if isinstance(count, Tensor):
        return count.to(torch.int64)
    return torch.tensor(int(count), dtype=torch.int64)


def exact_count_options(opts: TrimOptions, count: Tensor) -> TrimOptions:
    """``opts`` with ``k`` fixed to ``count`` (a 0-dim int64 tensor: a rank's share of a global
    selection, or a count a backend computed), passed to the kernels as an exact count."""
    return opts._replace(keep_ratio=count, keep_count=None, keep_threshold=None, min_kept=0)


def ranking_scores(losses: Tensor, score_offset: Tensor | None) -> Tensor:
    """The values the selection ranks: ``losses - score_offset`` in ``losses``' dtype (the
    accumulation dtype; the offset is first converted to it), or ``losses`` without an offset.
    Every backend's kernel forms the same difference, so this is bitwise what it ranked."""
    if score_offset is None:
        return losses
    return losses - score_offset.to(device=losses.device, dtype=losses.dtype)


INT64_MAX = 2**63 - 1


def ordered_keys(scores: Tensor, keep: Keep) -> Tensor:
    """int64 keys whose order is the ranking order (a larger key ranks first; ties then go to the
    lower index): the float64 bits mapped to a monotone integer, ``-0.0`` folded into ``+0.0`` (one
    value, as in the Triton and C++ keys), NaN to the largest key, the order reversed for
    ``keep="easiest"``. Every Python selection ranks these keys."""
    x = scores.to(torch.float64)
    x = torch.where(x == 0, torch.zeros_like(x), x)  # -0.0 == 0: one key for both zeros
    bits = x.view(torch.int64)
    key = bits ^ ((bits >> 63) & INT64_MAX)
    key = torch.where(torch.isnan(x), torch.full_like(key, INT64_MAX), key)
    return -1 - key if keep == Keep.EASIEST else key


def stable_select(scores: Tensor, valid: Tensor, k: Tensor, keep: Keep) -> tuple[Tensor, Tensor, Tensor]:
    """The kept set: the ``k`` largest (``"hardest"``) or smallest (``"easiest"``) valid scores,
    ties to the lower index, NaN ranked above +inf, ``-0.0`` equal to ``+0.0``
    (:func:`ordered_keys`).

    Static shapes only (a sort of every row, masks instead of ``nonzero``), so that it traces under
    ``torch.compile(fullgraph=True)``. Returns ``(kept, order, threshold)``: the bool mask, every
    row in ranking order (valid rows first), and the k-th score (NaN when ``k == 0``).
    """
    keys = ordered_keys(scores, keep)
    order = torch.sort(keys, descending=True, stable=True).indices
    order = order[torch.sort(valid[order].to(torch.int8), descending=True, stable=True).indices]
    ranked = torch.arange(order.shape[0], device=order.device) < k
    kept = torch.zeros_like(valid).scatter(0, order, ranked)
    nan = torch.full((), float("nan"), dtype=scores.dtype, device=scores.device)
    if order.shape[0] == 0:
        return kept, order, nan
    pos = (k - 1).clamp(min=0).reshape(1)  # (gather, not indexing: k stays a tensor under compile)
    last = scores.gather(0, order.gather(0, pos)).squeeze(0)
    return kept, order, torch.where(k > 0, last, nan)


def first_equal_rows(input: Tensor, target: Tensor, block_elems: int = 1 << 22) -> Tensor:
    """For each row ``i`` of ``input (N, D)``, the lowest index ``j`` whose row and target are
    bitwise equal to row ``i``'s (``i`` itself when none comes before it); ``(N,)`` int64.

    BLAS rounds a row of a GEMM by its position in the tile (MKL: 1 in 8 positions differ in the
    last place, at a fixed shape), so duplicated tokens whose rows fall at different places of their
    chunks get losses an ulp apart and "ties go to the lower index" fails. Taking every duplicate's
    loss from its first occurrence makes equal rows tie whatever the BLAS and the chunking.
    Static shapes only (a hash sort, then exact comparison of neighbours), so it traces under
    ``torch.compile``; a hash collision can only leave a duplicate unmatched, never match unequal rows.
    The hash and the comparison run over blocks of rows of about ``block_elems`` elements.
    """
    n, d = input.shape
    if n < 2:
        return torch.arange(n, device=input.device)
    width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[input.element_size()]
    bits = input.view(width) if input.stride(-1) == 1 else input.contiguous().view(width)
    cols = torch.arange(1, d + 1, device=input.device, dtype=torch.int64)
    mult = (cols * -7046029254386353131) ^ (cols << 29)  # odd-ish per-column multipliers (wrapping)
    # Row blocks bound the temporaries to about ``block_elems`` elements (the input may be GiBs).
    step = max(1, block_elems // max(d, 1))
    blocks = [(bits[i : i + step].to(torch.int64) * mult).sum(1) for i in range(0, n, step)]
    h = torch.cat(blocks) * -4658895280553007687 + target.to(torch.int64)
    order = torch.sort(h, stable=True).indices
    hs, ts = h[order], target[order]
    same = (hs[1:] == hs[:-1]) & (ts[1:] == ts[:-1])
    lo, hi = order[:-1], order[1:]  # sorted neighbours, compared exactly a block of pairs at a time
    equal = [(bits[hi[i : i + step]] == bits[lo[i : i + step]]).all(1) for i in range(0, n - 1, step)]
    same = same & torch.cat(equal)
    pos = torch.arange(n, device=input.device)
    start = torch.cat([pos[:1], torch.where(same, torch.zeros_like(pos[1:]), pos[1:])]).cummax(0).values
    first = torch.empty_like(order).scatter_(0, order, order[start])
    return first


def as_rows(input: Tensor) -> Tensor:
    """``(M, C)`` rows of a backend's input, which is ``(M, C)`` or ``(N, C, S)`` (the spatial
    layout, rows in ``n * S + s`` order); the latter costs one ``(N, C, S) -> (N * S, C)`` copy.
    For backends (and code paths) without a kernel that reads the class dimension strided."""
    if input.dim() == 2:
        return input
    return input.movedim(1, -1).reshape(-1, input.shape[1])


def default_chunk_size(num_rows: int, in_features: int, num_classes: int) -> int:
    """Rows of logits the LM head computes at a time when ``chunk_size=None``.

    A chunk's fp32 logits hold about ``max(N * D, 2**22)`` values: as many as the input (torch's
    "aspect ratio" rule, so the extra memory stays of the order of the input's), but at least
    16 MiB, so each chunk's matmul stays large enough to run at full speed. The result is in
    ``[1, N]`` and a multiple of 8 below ``N``.
    """
    if num_rows <= 0:
        return 1
    rows = -(-max(num_rows * in_features, 1 << 22) // max(num_classes, 1))
    if rows >= num_rows:
        return num_rows
    return max(8, (rows + 7) // 8 * 8) if num_rows > 8 else num_rows


def check_chunk_size(chunk_size: object) -> int | None:
    """``None`` or a positive int, else a ``TypeError``/``ValueError`` naming ``chunk_size``."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def check_logit_softcap(value: object) -> float | None:
    """``None`` or a finite Python float (or int) ``> 0``, else a ``TypeError``/``ValueError``
    naming ``logit_softcap``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"logit_softcap must be None or a float > 0, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"logit_softcap must be a finite float > 0, got {value!r}")
    return float(value)


def check_z_loss(value: object) -> float:
    """A finite Python float (or int) ``>= 0``, else a ``TypeError``/``ValueError`` naming ``z_loss``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"z_loss must be a float >= 0, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"z_loss must be a finite float >= 0, got {value!r}")
    return float(value)


def reduced_z_loss(lse: Tensor, kept: Tensor, target: Tensor, opts: TrimOptions, dtype: torch.dtype) -> Tensor | None:
    """``TrimInfo.z_loss``: the z terms ``opts.z_loss * lse_i**2`` of the kept samples, reduced as
    the loss is (``opts.reduction``; the mean over the kept ``sum w[y_i]``), in ``dtype``; ``None``
    when ``opts.z_loss`` is 0. ``lse``, ``kept`` and ``target`` are flat ``(M,)``."""
    if opts.z_loss == 0.0:
        return None
    acc = lse.dtype
    z = torch.where(kept, opts.z_loss * lse * lse, 0)
    if opts.reduction == Reduction.NONE:
        return z.to(dtype)
    if opts.reduction == Reduction.SUM:
        return z.sum().to(dtype)
    if opts.weight is None:
        denom = kept.sum().to(acc)
    else:
        w = opts.weight.detach().to(device=lse.device, dtype=acc)
        denom = torch.where(kept, w[target.clamp(0, w.shape[0] - 1).long()], 0).sum()
    return (z.sum() / denom).to(dtype)
