"""``TrimmedCrossEntropyLoss``: the module form of :func:`~fused_trim.trimmed_cross_entropy`."""

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
    check_ignore_index,
    check_label_smoothing,
    check_ratio,
    check_weight,
)
from .functional import trimmed_cross_entropy
from .schedules import ConstantSchedule

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["TrimmedCrossEntropyLoss"]


class TrimmedCrossEntropyLoss(nn.Module):
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
        keep_ratio: a float in ``(0, 1]`` or a schedule.
        keep: ``"hardest"`` (mini-batch trimming) or ``"easiest"`` (noisy labels).
        weight: class weights of shape ``(C,)``; stored as a buffer.
        ignore_index: target value that is never kept.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: in ``[0, 1]``.
        backend: ``"auto"``, ``"triton"``, ``"native"`` or ``"reference"``.
        process_group: trim over the global batch of this ``torch.distributed`` group (see
            :mod:`fused_trim.distributed`); ``info.global_loss`` is then the value to log.

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

    weight: Tensor | None

    def __init__(
        self,
        keep_ratio: float | Callable[[int, int], float] = 1.0,
        *,
        keep: str = "hardest",
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        backend: str = "auto",
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if callable(keep_ratio):
            self.schedule = keep_ratio
        else:
            self.schedule = ConstantSchedule(keep_ratio)  # validates the ratio now
        # The functional checks, now rather than at the first forward (the weight's length at the
        # forward, when C is known).
        check_choice("keep", keep, KEEP_CHOICES)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("backend", backend, BACKENDS)
        check_ignore_index(ignore_index)
        check_label_smoothing(label_smoothing)
        check_weight(weight)
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
        self._last: float | None = None
        self._last_compiled = False  # the last forward was compiled: it used self._ratio
        self._ratio = self.keep_ratio
        # float64: a float32 0.7 rounds k = floor(0.7 * 5 + 0.5) down to 3. Not buffers, so that
        # moving the module never meets a device without float64, and every device the loss meets
        # gets its own: _refresh fills them all in place.
        self._ratio_t = torch.tensor(self._ratio, dtype=torch.float64)
        self._ratio_on: dict[torch.device, Tensor] = {self._ratio_t.device: self._ratio_t}

    @property
    def keep_ratio(self) -> float:
        """The keep ratio the next forward will use."""
        r = float(self.schedule(self.epoch, self.step_in_epoch))
        if 0.0 < r <= 1.0:  # read every forward: the named check (and its repr) only for a bad value
            return r
        return check_ratio(f"the keep ratio of schedule {self.schedule!r}", r)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (0-based): the schedule is read at its first mini-batch."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch
        self.step_in_epoch = 0
        self._refresh()

    def step(self) -> None:
        """Advance to the next mini-batch of the current epoch."""
        self.step_in_epoch += 1
        self._refresh()

    def _refresh(self) -> float:
        """Read the schedule now; the compiled forward's ratio tensors follow it (eager code)."""
        r = self.keep_ratio
        if r != self._ratio:
            if self._last_compiled:
                self._last, self._last_compiled = self._ratio, False
            self._ratio = r
            for t in self._ratio_on.values():
                t.fill_(r)  # on a GPU a fill kernel: no copy, no synchronisation
        return r

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            r: float | Tensor | None = self._ratio_on.get(input.device)  # a graph input, not a constant
            if r is None:  # first forward on this device: copy once and keep (the next call recompiles)
                r = self._ratio_on[input.device] = self._ratio_t.to(input.device, copy=True)
            self._last_compiled = True
        else:
            r = self._refresh()
            self._last, self._last_compiled = r, False
        loss, info = trimmed_cross_entropy(
            input,
            target,
            r,
            keep=self.keep,
            weight=self.weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            backend=self.backend,
            return_info=True,
            process_group=self.process_group,
        )
        self.info = info
        return loss

    @property
    def last_keep_ratio(self) -> float | None:
        """The keep ratio the last forward used (``None`` before the first), read on the host."""
        return self._ratio if self._last_compiled else self._last

    def extra_repr(self) -> str:
        return (
            f"keep_ratio={self.schedule!r}, keep={self.keep!r}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
            f"backend={self.backend!r}"
        )
