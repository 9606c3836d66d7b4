"""What every task's training loop shares: the keep-ratio schedule of an arm and the learning rate."""

from __future__ import annotations

import math

from ..schedules import (
    ConstantSchedule,
    CosineSchedule,
    KeepRatioSchedule,
    LinearSchedule,
    LinearStepSchedule,
    OrderedSGDSchedule,
    StepSchedule,
    WarmupSchedule,
)
from .config import DemoConfig


def make_schedule(cfg: DemoConfig, steps_per_epoch: int, name: str | None = None) -> KeepRatioSchedule:
    """The keep-ratio schedule ``name`` (default ``cfg.schedule``) from ``keep_start`` to the keep end;
    ``"osgd"`` gives a schedule of counts (``gives_count``) starting at ``keep_start * batch_size``."""
    name = cfg.schedule if name is None else name
    start, end, epochs = cfg.keep_start, cfg.resolved_keep_end(), cfg.epochs
    if name == "linear":
        return LinearSchedule(epochs, start, end)
    if name == "linear-step":
        return LinearStepSchedule(epochs, steps_per_epoch, start, end)
    if name == "warmup":
        warmup = cfg.resolved_warmup()
        if not 0 <= warmup < epochs:
            raise ValueError(f"--warmup must be in [0, epochs), got {warmup} with {epochs} epochs")
        return WarmupSchedule(LinearSchedule(epochs - warmup, start, end), warmup)
    if name == "cosine":
        return CosineSchedule(epochs, start, end)
    if name == "step":
        # Two drops, at a third and two thirds of training, by equal factors from start to end.
        milestones = sorted({max(1, round(epochs * f)) for f in (1 / 3, 2 / 3)})
        if end > start:
            raise ValueError(f"--schedule step needs --keep-end <= --keep-start, got {end} > {start}")
        return StepSchedule(milestones, gamma=(end / start) ** (1 / len(milestones)), start=start)
    if name == "constant":
        return ConstantSchedule(end)
    # Ordered SGD as published: a fixed count of samples per mini-batch (at batch size 64 and
    # --keep-start 1.0: 64 -> 32 -> 16 -> 8 -> 4), a keep_count schedule.
    return OrderedSGDSchedule(start_count=max(1, round(start * cfg.batch_size)))


def lr_factor(name: str, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at the 0-based global mini-batch ``step`` of ``total_steps``.

    ``"cosine"``: ``(1 + cos(pi * step / total_steps)) / 2``, 1 at the first step and decaying towards 0
    at the end of training; ``"step"``: divided by 10 at half and again at three quarters of the steps;
    ``"constant"``: 1.
    """
    if name == "constant":
        return 1.0
    t = step / total_steps
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 0.1 ** ((t >= 0.5) + (t >= 0.75))
