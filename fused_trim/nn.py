"""The loss modules: :func:`~fused_trim.trimmed_cross_entropy` and
:func:`~fused_trim.trimmed_linear_cross_entropy` with their options held and a keep-ratio schedule."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ._common import (
    BACKENDS,
    KEEP_CHOICES,
    REDUCTIONS,
    TrimInfo,
    check_choice,
    check_chunk_size,
    check_ignore_index,
    check_label_smoothing,
    check_logit_softcap,
    check_ratio,
    check_weight,
    check_z_loss,
)
from ._groups import GROUP_REDUCTIONS
from .functional import _check_keep_rule, trimmed_cross_entropy, trimmed_linear_cross_entropy
from .schedules import ConstantSchedule

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["TrimmedCrossEntropyLoss", "TrimmedLinearCrossEntropyLoss"]


class _RatioState:
    """The keep ratio (or count) of a module, held once.

    ``value`` is the schedule's value the next forward uses. A compiled forward reads it from
    ``on[device]``, a 0-dim float64 (int64 for a count) tensor per device that :meth:`set` fills in
    place, so a moving schedule never recompiles the graph and no step copies the ratio from the
    host. float64: a float32 0.7 rounds ``k = floor(0.7 * 5 + 0.5)`` down to 3. Plain tensors, not
    buffers, so that moving the module never meets a device without float64. ``last`` is the value
    of the last forward; after a compiled one it is ``value`` until :meth:`set` moves on (a compiled
    forward runs no Python to record it).
    """

    def __init__(self, value: float | int, dtype: torch.dtype = torch.float64) -> None:
        self.value = value
        self.host = torch.tensor(value, dtype=dtype)  # what a new device's tensor is copied from
        self.on: dict[torch.device, Tensor] = {self.host.device: self.host}
        self._last: float | None = None
        self._last_compiled = False

    @property
    def last(self) -> float | None:
        """The ratio of the last forward (``None`` before the first)."""
        return self.value if self._last_compiled else self._last

    def set(self, value: float) -> None:
        """Move to ``value``; every device's tensor follows (on a GPU a fill kernel: no copy, no sync)."""
        if value == self.value:
            return
        self._last, self._last_compiled = self.last, False
        self.value = value
        self.host.fill_(value)  # kept current even when no device tensor is the host's
        for t in self.on.values():
            if t is not self.host:
                t.fill_(value)

    def used_eagerly(self) -> float:
        """``value``, recorded as the last forward's."""
        self._last, self._last_compiled = self.value, False
        return self.value

    def used_compiled(self, device: torch.device) -> Tensor:
        """The ratio tensor on ``device`` (a graph input, not a constant); a device met for the first
        time gets a copy, once (the next call recompiles to read it)."""
        t = self.on.get(device)
        if t is None:
            t = self.on[device] = self.host.to(device, copy=True)
        self._last_compiled = True
        return t


class _ConstantCount:
    """A fixed keep count as a schedule of counts."""

    gives_count = True

    def __init__(self, count: int) -> None:
        self.count = count

    def __call__(self, epoch: int = 0, step: int = 0) -> int:
        return self.count

    def __repr__(self) -> str:
        return repr(self.count)


class _ScheduledLoss(nn.Module):
    """What both loss modules share: the trimming options, checked at construction, and the keep
    ratio's schedule and progress (:meth:`set_epoch`, :meth:`step`)."""

    weight: Tensor | None

    def __init__(
        self,
        keep_ratio: float | Callable[[int, int], float] | None = None,
        *,
        keep_count: int | Callable[[int, int], int] | None = None,
        keep_threshold: float | None = None,
        min_kept: int | None = None,
        keep: str = "hardest",
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        backend: str = "auto",
        process_group: ProcessGroup | None = None,
        logit_softcap: float | None = None,
        z_loss: float = 0.0,
        group_ids: str | None = None,
        group_reduction: str = "mean",
    ) -> None:
        super().__init__()
        # The rule, checked now (as the functional checks it, a schedule standing for its values).
        given = [
            name
            for name, value in (
                ("keep_ratio", keep_ratio),
                ("keep_count", keep_count),
                ("keep_threshold", keep_threshold),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise ValueError(
                f"exactly one of keep_ratio, keep_count and keep_threshold sets k, got {' and '.join(given)}"
            )
        _check_keep_rule(
            None if callable(keep_ratio) else keep_ratio,
            None if callable(keep_count) else keep_count,
            keep_threshold,
            min_kept,
        )
        for name, value, wants_count in (("keep_ratio", keep_ratio, False), ("keep_count", keep_count, True)):
            # (a plain callable is taken at its word; a schedule says what it gives)
            gives_count = getattr(value, "gives_count", None) if callable(value) else None
            if gives_count is not None and bool(gives_count) != wants_count:
                kind = "counts" if wants_count else "ratios"
                raise ValueError(f"{name} takes a schedule of {kind}, got {value!r}")
        self.keep_threshold = keep_threshold
        self.min_kept = min_kept
        if keep_count is not None:
            self.rule = "keep_count"
            self.schedule = keep_count if callable(keep_count) else _ConstantCount(keep_count)
        elif keep_threshold is not None:
            self.rule = "keep_threshold"
            self.schedule = None
        else:
            self.rule = "keep_ratio"
            ratio = 1.0 if keep_ratio is None else keep_ratio
            self.schedule = ratio if callable(ratio) else ConstantSchedule(ratio)  # validates now
        # The functional checks, now rather than at the first forward (the weight's length at the
        # forward, when C is known).
        check_choice("keep", keep, KEEP_CHOICES)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("backend", backend, BACKENDS)
        check_ignore_index(ignore_index)
        check_label_smoothing(label_smoothing)
        check_weight(weight)
        if group_ids not in (None, "rows"):
            raise ValueError(
                f"group_ids must be 'rows' or None at construction (pass a tensor of ids to forward), got {group_ids!r}"
            )
        check_choice("group_reduction", group_reduction, GROUP_REDUCTIONS)
        self.group_ids = group_ids
        self.group_reduction = group_reduction
        self.logit_softcap = check_logit_softcap(logit_softcap)
        self.z_loss = check_z_loss(z_loss)
        self.keep = keep
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.backend = backend
        self.process_group = process_group
        self.epoch = 0
        self.step_in_epoch = 0
        self.info: TrimInfo | None = None
        counts = self.rule == "keep_count"
        self._ratio = _RatioState(self._scheduled(), torch.int64 if counts else torch.float64)

    def _scheduled(self) -> float | int:
        """The scheduled value the next forward will use: a ratio, a count, or (threshold rule)
        the threshold itself, which no schedule moves."""
        if self.schedule is None:
            return float(self.keep_threshold)
        value = self.schedule(self.epoch, self.step_in_epoch)
        if self.rule == "keep_count":
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
            raise ValueError(f"the keep count of schedule {self.schedule!r} must be an int >= 0, got {value!r}")
        r = float(value)
        if 0.0 < r <= 1.0:  # read every forward: the named check (and its repr) only for a bad value
            return r
        return check_ratio(f"the keep ratio of schedule {self.schedule!r}", r)

    @property
    def keep_ratio(self) -> float | None:
        """The keep ratio the next forward will use (``None`` under a count or threshold rule)."""
        return self._scheduled() if self.rule == "keep_ratio" else None

    @property
    def keep_count(self) -> int | None:
        """The keep count the next forward will use (``None`` under a ratio or threshold rule)."""
        return self._scheduled() if self.rule == "keep_count" else None

    @property
    def last_keep_ratio(self) -> float | None:
        """The keep ratio the last forward used (``None`` before the first, and under a count or
        threshold rule), read on the host."""
        return self._ratio.last if self.rule == "keep_ratio" else None

    @property
    def last_keep_count(self) -> int | None:
        """The keep count the last forward used (``None`` before the first, and under a ratio or
        threshold rule), read on the host."""
        return self._ratio.last if self.rule == "keep_count" else None

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (0-based): the schedule is read at its first mini-batch."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch
        self.step_in_epoch = 0
        self._ratio.set(self._scheduled())

    def step(self) -> None:
        """Advance to the next mini-batch of the current epoch."""
        self.step_in_epoch += 1
        self._ratio.set(self._scheduled())

    def _rule_for(self, device: torch.device) -> dict:
        """The keep rule a forward on ``device`` passes on: the ratio or count as a Python number
        eagerly (the schedule read now), the device's tensor under ``torch.compile``; or the
        threshold and ``min_kept``."""
        if self.rule == "keep_threshold":
            return dict(keep_threshold=self.keep_threshold, min_kept=self.min_kept)
        if torch.compiler.is_compiling():
            return {self.rule: self._ratio.used_compiled(device)}
        self._ratio.set(self._scheduled())
        return {self.rule: self._ratio.used_eagerly()}

    def _options(self) -> dict:
        """The trimming arguments of the functional call, as this module holds them."""
        return dict(
            keep=self.keep,
            weight=self.weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            backend=self.backend,
            return_info=True,
            process_group=self.process_group,
            logit_softcap=self.logit_softcap,
            z_loss=self.z_loss,
            group_reduction=self.group_reduction,
        )

    def _groups(self, group_ids: Tensor | str | None) -> Tensor | str | None:
        """A forward's ``group_ids``: the call's, else the module's."""
        return self.group_ids if group_ids is None else group_ids

    def extra_repr(self) -> str:
        if self.rule == "keep_threshold":
            rule = f"keep_threshold={self.keep_threshold!r}, min_kept={self.min_kept!r}"
        else:
            rule = f"{self.rule}={self.schedule!r}"
        return (
            f"{rule}, keep={self.keep!r}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
            f"backend={self.backend!r}"
            + ("" if self.logit_softcap is None else f", logit_softcap={self.logit_softcap}")
            + ("" if self.z_loss == 0.0 else f", z_loss={self.z_loss}")
            + ("" if self.group_ids is None else f", group_ids={self.group_ids!r}")
            + ("" if self.group_reduction == "mean" else f", group_reduction={self.group_reduction!r}")
        )


class TrimmedCrossEntropyLoss(_ScheduledLoss):
    r"""Cross-entropy over only the hardest (or easiest) samples of each mini-batch.

    Mirrors :class:`torch.nn.CrossEntropyLoss` (class-index targets) and adds the keep ratio,
    fixed or scheduled. With ``keep_ratio=1.0`` it computes exactly ``nn.CrossEntropyLoss``. See
    :func:`~fused_trim.trimmed_cross_entropy` for the semantics of every argument.

    A schedule is any callable ``schedule(epoch, step) -> float`` (see :mod:`fused_trim.schedules`).
    The module keeps the progress: call :meth:`set_epoch` at the start of each epoch and
    :meth:`step` after each mini-batch (only per-step schedules need the latter).

    Under :func:`torch.compile` the forward reads the ratio from a 0-dim float64 tensor on the
    input's device, one per device, which :meth:`set_epoch` and :meth:`step` fill in place, so a
    moving schedule never recompiles the graph and no step copies the ratio from the host. A
    device's tensor is made by the first compiled forward on it, which copies the ratio there once;
    the next call recompiles once to read the tensor. A schedule whose value changes otherwise
    (:class:`~fused_trim.schedules.OrderedSGDSchedule`'s ``update``) takes effect at the next
    :meth:`set_epoch` or :meth:`step`. Eager forwards read the schedule themselves.

    Args:
        keep_ratio: a float in ``(0, 1]`` or a schedule; ``None`` (the default): 1.0 unless
            ``keep_count`` or ``keep_threshold`` is given. Exactly one of the three sets ``k``.
        keep_count: keep ``min(n, c)`` samples: an int ``c >= 0`` or a schedule of counts
            (``OrderedSGDSchedule(start_count=64)``: Ordered SGD), held like a ratio schedule.
        keep_threshold: keep every sample whose loss is strictly past this float (fixed), at
            least ``min_kept`` (OHEM; see :func:`~fused_trim.trimmed_cross_entropy`).
        min_kept: with ``keep_threshold`` only.
        keep: ``"hardest"`` (mini-batch trimming) or ``"easiest"`` (noisy labels).
        weight: class weights of shape ``(C,)``; stored as a buffer.
        ignore_index: target value that is never kept.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: in ``[0, 1]``.
        backend: ``"auto"``, ``"triton"``, ``"native"`` or ``"reference"``.
        process_group: trim over the global batch of this ``torch.distributed`` group (see
            :mod:`fused_trim.distributed`); ``info.global_loss`` is then the value to log.
        logit_softcap, z_loss: soft-capping of the logits and the z-loss weight (see
            :func:`~fused_trim.trimmed_cross_entropy`).
        group_ids: ``"rows"`` (each index of the target's first dimension is one sample: whole
            sequences or images are ranked and kept) or ``None``; a tensor of group ids belongs to
            a batch and is given to :meth:`forward`. See :func:`~fused_trim.trimmed_cross_entropy`.
        group_reduction: ``"mean"`` or ``"sum"``: a group's score from its positions' losses.

    Attributes:
        info: the :class:`~fused_trim.TrimInfo` of the last forward (``None`` before the first).

    Example::

        from fused_trim import TrimmedCrossEntropyLoss
        from fused_trim.schedules import LinearSchedule
        criterion = TrimmedCrossEntropyLoss(LinearSchedule(epochs=10))
        for epoch in range(10):
            criterion.set_epoch(epoch)
            for x, y in loader:
                loss = criterion(model(x), y)
                loss.backward(); optimizer.step(); optimizer.zero_grad()
                criterion.step()
    """

    def forward(
        self,
        input: Tensor,
        target: Tensor,
        score_offset: Tensor | None = None,
        group_ids: Tensor | str | None = None,
    ) -> Tensor:
        """The trimmed loss of ``input`` and ``target``; ``score_offset`` (the target's shape, or
        ``None``) ranks ``l_i - score_offset_i`` instead of ``l_i`` for this call; ``group_ids``
        (the target's shape, or ``"rows"``) replaces the module's for this call (see
        :func:`~fused_trim.trimmed_cross_entropy`)."""
        rule = self._rule_for(input.device)
        loss, info = trimmed_cross_entropy(
            input, target, score_offset=score_offset, group_ids=self._groups(group_ids), **rule, **self._options()
        )
        self.info = info
        return loss


class TrimmedLinearCrossEntropyLoss(_ScheduledLoss):
    r"""The LM head and the trimmed loss in one module: :func:`~fused_trim.trimmed_linear_cross_entropy`.

    ``criterion(hidden, target)`` computes ``TrimmedCrossEntropyLoss(...)(F.linear(hidden,
    linear_weight, linear_bias), target)`` without the ``(N, V)`` logits. Schedules, ``set_epoch``,
    ``step``, ``info`` and ``torch.compile`` behave as in :class:`TrimmedCrossEntropyLoss`.

    Args:
        linear_weight: the head's weight ``(V, D)``, e.g. ``model.lm_head.weight``. Held by
            reference, not registered: it stays a parameter of the model only. ``None``: pass it
            to every forward. Under FSDP2 build the module after ``fully_shard`` (which replaces
            the parameters): it then holds the sharded DTensor, which the op gathers (see
            :func:`~fused_trim.trimmed_linear_cross_entropy`); or pass the head's parameters to
            a forward called inside the model's, where FSDP2 has gathered them.
        keep_ratio: a float in ``(0, 1]`` or a schedule (``keep_count``, ``keep_threshold`` and
            ``min_kept``, keywords, as in :class:`TrimmedCrossEntropyLoss`).
        linear_bias: the head's bias ``(V,)`` (held like ``linear_weight``) or ``None``.
        chunk_size: rows of logits held at a time (see :func:`~fused_trim.trimmed_linear_cross_entropy`).
        keep, weight, ignore_index, reduction, label_smoothing, backend, process_group,
            logit_softcap, z_loss, group_ids, group_reduction: as in
            :class:`TrimmedCrossEntropyLoss`; ``weight`` is the class weight ``(V,)``.

    Example::

        criterion = TrimmedLinearCrossEntropyLoss(model.lm_head.weight, LinearSchedule(epochs=3))
        loss = criterion(model.backbone(tokens)[:, :-1], tokens[:, 1:])
    """

    def __init__(
        self,
        linear_weight: Tensor | None = None,
        keep_ratio: float | Callable[[int, int], float] | None = None,
        *,
        linear_bias: Tensor | None = None,
        chunk_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(keep_ratio, **kwargs)
        for name, value in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a tensor or None, got {type(value).__name__}")
        # Plain attributes, not parameters: the head's weight belongs to the model.
        object.__setattr__(self, "linear_weight", linear_weight)
        object.__setattr__(self, "linear_bias", linear_bias)
        self.chunk_size = check_chunk_size(chunk_size)

    def forward(
        self,
        input: Tensor,
        target: Tensor,
        linear_weight: Tensor | None = None,
        linear_bias: Tensor | None = None,
        score_offset: Tensor | None = None,
        group_ids: Tensor | str | None = None,
    ) -> Tensor:
        """Loss of hidden states ``input (*, D)`` against ``target (*)``; a ``linear_weight`` or
        ``linear_bias`` given here replaces the one given at construction; ``score_offset`` (the
        target's shape) ranks ``l_i - score_offset_i`` for this call; ``group_ids`` (the target's
        shape, or ``"rows"``) replaces the module's for this call."""
        weight = self.linear_weight if linear_weight is None else linear_weight
        bias = self.linear_bias if linear_bias is None else linear_bias
        if weight is None:
            raise ValueError("linear_weight is None: give it at construction or to forward")
        rule = self._rule_for(input.device)
        loss, info = trimmed_linear_cross_entropy(
            input,
            weight,
            target,
            **rule,
            linear_bias=bias,
            chunk_size=self.chunk_size,
            score_offset=score_offset,
            group_ids=self._groups(group_ids),
            **self._options(),
        )
        self.info = info
        return loss

    def extra_repr(self) -> str:
        shape = None if self.linear_weight is None else tuple(self.linear_weight.shape)
        return f"linear_weight={shape}, chunk_size={self.chunk_size}, " + super().extra_repr()
