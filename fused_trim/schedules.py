"""Keep-ratio schedules: small callables that map training progress to a keep ratio in ``(0, 1]``.

Every schedule is called as ``schedule(epoch, step=0)`` with the 0-based epoch and the 0-based
index of the mini-batch *within* that epoch, and returns a Python float. Epochs past the last one
hold the final value. A schedule from ``start`` to ``end`` returns exactly ``start`` first and
exactly ``end`` last, and no rounding error takes it outside ``[start, end]``.
:class:`~fused_trim.TrimmedCrossEntropyLoss` keeps this progress for you (``set_epoch`` / ``step``).

Example::

    >>> from fused_trim.schedules import LinearSchedule
    >>> schedule = LinearSchedule(epochs=5)          # the paper's: 1.0 at epoch 0 -> 0.2 at epoch 4
    >>> [round(schedule(e), 2) for e in range(5)]
    [1.0, 0.8, 0.6, 0.4, 0.2]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._common import check_ratio

__all__ = [
    "KeepRatioSchedule",
    "LinearSchedule",
    "LinearStepSchedule",
    "WarmupSchedule",
    "CosineSchedule",
    "StepSchedule",
    "ConstantSchedule",
    "OrderedSGDSchedule",
]


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_progress(epoch: int, step: int) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")


def _within(value: float, start: float, end: float) -> float:
    """``value`` clipped to ``[min(start, end), max(start, end)]``: a rounding error never takes a
    schedule past its end points (a ratio of ``1.0000000000000002`` would be rejected)."""
    return min(max(value, min(start, end)), max(start, end))


def _ramp(start: float, end: float, t: int, last: int) -> float:
    """``start + (end - start) * t / last`` (the author's arithmetic); exactly ``start`` at
    ``t = 0`` or when ``last == 0``, exactly ``end`` from ``t = last`` on."""
    if last <= 0 or t <= 0:
        return start
    if t >= last:
        return end
    return _within(start + (end - start) * t / last, start, end)


class KeepRatioSchedule:
    """Base class of keep-ratio schedules.

    Subclasses implement :meth:`value`; calling the schedule validates the progress and returns
    ``value(epoch, step)``. Make a subclass a ``@dataclass(eq=False)``, as the schedules here are,
    and its repr says what it is (the module's repr shows it). A schedule whose :attr:`gives_count`
    is true returns a number of samples to keep (an int >= 0, for the modules' ``keep_count``)
    instead of a ratio.
    """

    @property
    def gives_count(self) -> bool:
        """Whether the values are counts (``keep_count``), not ratios (``keep_ratio``)."""
        return False

    def __call__(self, epoch: int = 0, step: int = 0) -> float:
        """Keep ratio at ``epoch`` (0-based) and mini-batch ``step`` (0-based, within the epoch)."""
        _check_progress(epoch, step)
        return self.value(epoch, step)

    def value(self, epoch: int, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


# The schedules are dataclasses for their ``__init__`` and ``__repr__``; ``eq=False`` keeps them
# compared (and hashed) by identity, as any callable, since OrderedSGDSchedule changes as it runs.
@dataclass(eq=False)
class _EpochRange(KeepRatioSchedule):
    """A schedule from ``start`` at epoch 0 to ``end`` at the last of ``epochs`` epochs."""

    epochs: int
    start: float = 1.0
    end: float = 0.2

    def __post_init__(self) -> None:
        self.epochs = _check_count("epochs", self.epochs, 1)
        self.start = check_ratio("start", self.start)
        self.end = check_ratio("end", self.end)


class LinearSchedule(_EpochRange):
    r"""The mini-batch trimming schedule of Fassold (2021): linear in the epoch, constant within one.

    .. math:: r(e) = \text{start} + (\text{end} - \text{start}) \cdot \frac{e}{\text{epochs} - 1}

    so ``r = start`` at epoch 0 and ``r = end`` at the last epoch ``epochs - 1``. With one epoch
    the ratio is ``start``; epochs past the last hold ``end``.

    Args:
        epochs: number of training epochs (>= 1).
        start: keep ratio at epoch 0.
        end: keep ratio at the last epoch.
    """

    def value(self, epoch: int, step: int) -> float:
        return _ramp(self.start, self.end, epoch, self.epochs - 1)


@dataclass(eq=False)
class LinearStepSchedule(KeepRatioSchedule):
    r"""The same linear ramp, updated every mini-batch instead of every epoch.

    With :math:`t = e \cdot \text{steps\_per\_epoch} + s` and
    :math:`T = \text{epochs} \cdot \text{steps\_per\_epoch}`,
    :math:`r = \text{start} + (\text{end} - \text{start}) \cdot t / (T - 1)`: ``start`` at the first
    mini-batch, ``end`` at the last.

    Args:
        epochs: number of training epochs (>= 1).
        steps_per_epoch: mini-batches per epoch (>= 1).
        start: keep ratio at the first mini-batch.
        end: keep ratio at the last mini-batch.
    """

    epochs: int
    steps_per_epoch: int
    start: float = 1.0
    end: float = 0.2

    def __post_init__(self) -> None:
        self.epochs = _check_count("epochs", self.epochs, 1)
        self.steps_per_epoch = _check_count("steps_per_epoch", self.steps_per_epoch, 1)
        self.start = check_ratio("start", self.start)
        self.end = check_ratio("end", self.end)

    def value(self, epoch: int, step: int) -> float:
        t = epoch * self.steps_per_epoch + step
        return _ramp(self.start, self.end, t, self.epochs * self.steps_per_epoch - 1)


@dataclass(eq=False)
class WarmupSchedule(KeepRatioSchedule):
    """No trimming (ratio 1.0) for the first ``warmup_epochs`` epochs, then ``schedule``.

    ``schedule`` is evaluated with the epoch counted from the end of the warm-up, so build it for the
    remaining ``epochs - warmup_epochs`` epochs.

    Args:
        schedule: the schedule (or a fixed ratio) that follows the warm-up.
        warmup_epochs: number of epochs without trimming (>= 0).
    """

    schedule: KeepRatioSchedule | float
    warmup_epochs: int

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, KeepRatioSchedule):
            self.schedule = ConstantSchedule(self.schedule)
        self.warmup_epochs = _check_count("warmup_epochs", self.warmup_epochs, 0)

    def value(self, epoch: int, step: int) -> float:
        if epoch < self.warmup_epochs:
            return 1.0
        return self.schedule(epoch - self.warmup_epochs, step)


class CosineSchedule(_EpochRange):
    r"""Cosine decay from ``start`` at epoch 0 to ``end`` at the last epoch, constant within one.

    .. math:: r(e) = \text{end} + \tfrac12 (\text{start} - \text{end})
              \left(1 + \cos\frac{\pi e}{\text{epochs} - 1}\right)

    Args:
        epochs: number of training epochs (>= 1).
        start: keep ratio at epoch 0.
        end: keep ratio at the last epoch.
    """

    def value(self, epoch: int, step: int) -> float:
        if self.epochs == 1 or epoch == 0:  # (the formula gives start + 1 ulp for some end points)
            return self.start
        if epoch >= self.epochs - 1:
            return self.end
        frac = epoch / (self.epochs - 1)
        value = self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(math.pi * frac))
        return _within(value, self.start, self.end)


@dataclass(eq=False)
class StepSchedule(KeepRatioSchedule):
    """``start`` multiplied by ``gamma`` at each milestone epoch reached.

    Args:
        milestones: epochs at which the ratio drops (increasing, >= 1).
        gamma: factor in ``(0, 1]`` applied at each milestone.
        start: keep ratio before the first milestone.
    """

    milestones: Sequence[int]
    gamma: float = 0.5
    start: float = 1.0

    def __post_init__(self) -> None:
        self.milestones = tuple(self.milestones)
        for m in self.milestones:
            _check_count("each milestone", m, 1)
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"milestones must be strictly increasing, got {self.milestones}")
        self.gamma = check_ratio("gamma", self.gamma)
        self.start = check_ratio("start", self.start)

    def value(self, epoch: int, step: int) -> float:
        return self.start * self.gamma ** sum(epoch >= m for m in self.milestones)


@dataclass(eq=False)
class ConstantSchedule(KeepRatioSchedule):
    """The same keep ratio at every step.

    Args:
        ratio: the keep ratio, in ``(0, 1]``.
    """

    ratio: float

    def __post_init__(self) -> None:
        self.ratio = check_ratio("ratio", self.ratio)

    def value(self, epoch: int, step: int) -> float:
        return self.ratio


@dataclass(eq=False)
class OrderedSGDSchedule(KeepRatioSchedule):
    """Ordered SGD's schedule (Kawaguchi & Lu, 2020): halve what is kept each time the training
    accuracy crosses a threshold.

    Report the training accuracy (a fraction in ``[0, 1]``) with :meth:`update`, e.g. once per epoch;
    the value is ``start * factor ** c`` where ``c`` counts the thresholds crossed so far. A
    threshold, once crossed, stays crossed. The schedule ignores ``epoch`` and ``step``.

    Two forms. The ratio form (``start``, a keep ratio) goes to ``keep_ratio``. The count form
    (``start_count``, a number of samples, the original method: ``s = 64 -> 32 -> 16 -> 8 -> 4``
    as the accuracy crosses 80/90/95/99.5 %) gives ``max(1, round(start_count * factor ** c))``
    samples (``round`` being ``floor(x + 0.5)``, as for ``keep_ratio``), whatever the batch size, and
    goes to the modules' ``keep_count``.

    Args:
        start: keep ratio before any threshold is crossed (the ratio form).
        thresholds: training accuracies, as fractions, that each trigger one reduction.
        factor: factor in ``(0, 1]`` applied per threshold crossed (``0.5``: halve).
        start_count: an int >= 1: the count form, keeping this many samples at first (``start``
            is then unused and must stay 1.0).

    Example::

        >>> schedule = OrderedSGDSchedule(start_count=64)
        >>> [schedule.update(acc) for acc in (0.5, 0.85, 0.92, 0.96, 0.999)]
        [64, 32, 16, 8, 4]
    """

    start: float = 1.0
    thresholds: Sequence[float] = (0.8, 0.9, 0.95, 0.995)
    factor: float = 0.5
    start_count: int | None = None
    crossed: int = field(default=0, init=False)  # thresholds crossed so far

    def __post_init__(self) -> None:
        self.start = check_ratio("start", self.start)
        self.thresholds = tuple(float(t) for t in self.thresholds)
        for t in self.thresholds:
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"thresholds are accuracies in [0, 1], got {t!r}")
        self.factor = check_ratio("factor", self.factor)
        if self.start_count is not None:
            self.start_count = _check_count("start_count", self.start_count, 1)
            if self.start != 1.0:
                raise ValueError(f"give start (a ratio) or start_count (a count), not both: start={self.start}")

    @property
    def gives_count(self) -> bool:
        return self.start_count is not None

    def __repr__(self) -> str:
        first = f"start={self.start!r}" if self.start_count is None else f"start_count={self.start_count!r}"
        return (
            f"OrderedSGDSchedule({first}, thresholds={self.thresholds!r}, factor={self.factor!r}, "
            f"crossed={self.crossed!r})"
        )

    def update(self, train_accuracy: float) -> float | int:
        """Record a training accuracy in ``[0, 1]`` and return the new keep ratio (or count)."""
        acc = float(train_accuracy)
        if math.isnan(acc) or not 0.0 <= acc <= 1.0:
            raise ValueError(f"train_accuracy must be a fraction in [0, 1], got {train_accuracy!r}")
        self.crossed = max(self.crossed, sum(acc >= t for t in self.thresholds))
        return self.value(0, 0)

    def value(self, epoch: int, step: int) -> float | int:
        if self.start_count is not None:
            # (halves rounded up, as the library rounds r * n: on full batches the ratio form's k)
            return max(1, math.floor(self.start_count * self.factor**self.crossed + 0.5))
        return self.start * self.factor**self.crossed
