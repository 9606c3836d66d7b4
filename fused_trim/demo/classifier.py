"""The classifier task: a small model on MNIST-1D or scikit-learn's digits, trained per arm and seed.

A task module gives :mod:`.runner` ``CSV_FIELDS`` (the columns of its rows), ``load(cfg)`` (its
data, with a ``device``), ``steps_per_epoch(data, cfg)`` and ``train_run(data, cfg, arm, seed, bar)``
(one row per epoch, with at least ``arm``, ``seed``, ``epoch``, ``keep_ratio`` and ``test_error``,
which the statistics and the report read).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import TrimmedCrossEntropyLoss
from ..schedules import ConstantSchedule, OrderedSGDSchedule
from .config import DemoConfig
from .data import Data, add_label_noise, build_model, load_data
from .training import lr_factor, make_schedule

__all__ = ["CSV_FIELDS", "load", "load_data", "steps_per_epoch", "train_run"]

CSV_FIELDS = (
    "dataset",
    "model",
    "arm",
    "seed",
    "epoch",
    "lr",
    "keep_ratio",
    "kept_fraction",
    "objective",
    "train_loss",
    "train_error",
    "test_loss",
    "test_error",
    "noisy_in_batch",
    "noisy_in_kept",
    "time_s",
)


def load(cfg: DemoConfig) -> Data:
    """The data set ``cfg.dataset``, cut to ``cfg.train_size`` training samples."""
    return load_data(cfg.dataset, cfg.train_size)


def steps_per_epoch(data: Data, cfg: DemoConfig) -> int:
    """Mini-batches per epoch (the last one may be short)."""
    return math.ceil(len(data.y) / cfg.batch_size)


@torch.no_grad()
def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    model.eval()
    logits = torch.cat([model(xb) for xb in x.split(1000)])
    model.train()
    loss = nn.functional.cross_entropy(logits, y).item()
    error = (logits.argmax(1) != y).float().mean().item()
    return loss, error


def train_run(data: Data, cfg: DemoConfig, arm: str, seed: int, bar: Any | None = None) -> list[dict[str, object]]:
    """Train one arm (a key of ``cfg.arms()``) with one seed; returns one row of metrics per epoch
    (see ``CSV_FIELDS``; epochs are numbered from 1, the metrics measured after that epoch).

    ``bar`` is an optional tqdm bar advanced once per epoch.
    """
    schedule_name = cfg.arms()[arm]
    y_train, noisy = data.y, torch.zeros(len(data.y), dtype=torch.bool)
    if cfg.label_noise > 0:
        y_train, noisy = add_label_noise(data.y, cfg.label_noise, data.num_classes, seed)
    n = len(y_train)
    steps = steps_per_epoch(data, cfg)
    torch.manual_seed(seed)  # the same initial weights in both arms
    model = build_model(cfg.model, data)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    schedule = ConstantSchedule(1.0) if schedule_name is None else make_schedule(cfg, steps, schedule_name)
    if schedule.gives_count:  # Ordered SGD's fixed counts
        criterion = TrimmedCrossEntropyLoss(keep_count=schedule, keep=cfg.keep)
    else:
        criterion = TrimmedCrossEntropyLoss(schedule, keep=cfg.keep)
    order = torch.Generator().manual_seed(seed)  # the same mini-batches in both arms
    rows: list[dict[str, object]] = []
    total_steps, global_step = cfg.epochs * steps, 0
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        criterion.set_epoch(epoch)
        ratio_sum = objective_sum = 0.0
        kept = seen = noisy_seen = noisy_kept = 0
        for idx in torch.randperm(n, generator=order).split(cfg.batch_size):
            loss = criterion(model(data.x[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = cfg.lr * lr_factor(cfg.lr_schedule, global_step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            global_step += 1
            criterion.step()
            info = criterion.info
            count = criterion.last_keep_count
            # (a count's ratio: of the mini-batch it was applied to)
            ratio_sum += criterion.last_keep_ratio if count is None else min(1.0, count / len(idx))
            objective_sum += loss.item()
            kept += int(info.k)
            seen += len(idx)
            noisy_seen += int(noisy[idx].sum())
            noisy_kept += int(noisy[idx][info.kept].sum())
        train_loss, train_error = _evaluate(model, data.x, y_train)
        test_loss, test_error = _evaluate(model, data.x_test, data.y_test)
        if isinstance(schedule, OrderedSGDSchedule):
            schedule.update(1.0 - train_error)
        rows.append(
            {
                "dataset": data.name,
                "model": cfg.model,
                "arm": arm,
                "seed": seed,
                "epoch": epoch + 1,
                "lr": lr,
                "keep_ratio": ratio_sum / steps,
                "kept_fraction": kept / seen,
                "objective": objective_sum / steps,
                "train_loss": train_loss,
                "train_error": train_error,
                "test_loss": test_loss,
                "test_error": test_error,
                "noisy_in_batch": noisy_seen / seen,
                "noisy_in_kept": noisy_kept / kept,
                "time_s": time.perf_counter() - t0,
            }
        )
        if bar is not None:
            bar.set_postfix_str(f"seed {seed} {arm}: test error {100 * test_error:.1f}%", refresh=False)
            bar.update(1)
    return rows
