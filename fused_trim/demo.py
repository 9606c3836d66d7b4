"""Does mini-batch trimming help? Train the same model with and without it, over several seeds.

``python -m fused_trim demo`` trains *arms* on data generated offline:

- ``baseline``: plain cross-entropy (``trimmed_cross_entropy`` with ``keep_ratio=1.0``);
- ``trimmed``: the same loss keeping only a scheduled fraction of each mini-batch; with
  ``--compare linear,warmup,...`` one trimmed arm per listed keep-ratio schedule instead.

Every arm of one seed starts from the same weights, sees the same mini-batches in the same order and
uses the same learning-rate schedule, so the per-seed difference of test errors between a trimmed arm
and the baseline is a paired comparison; the table gives its Student-t 95% confidence interval over
seeds and a verdict. The run writes ``metrics.csv`` (every run's per-epoch metrics), ``test_error.png``
(test-error curves and the keep-ratio schedules) and ``summary.txt`` (the table it prints) into the
output folder.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import Tensor, nn

from .functional import _resolve_backend
from .nn import TrimmedCrossEntropyLoss
from .schedules import (
    ConstantSchedule,
    CosineSchedule,
    KeepRatioSchedule,
    LinearSchedule,
    LinearStepSchedule,
    OrderedSGDSchedule,
    StepSchedule,
    WarmupSchedule,
)

__all__ = ["DemoConfig", "run_demo", "add_arguments", "config_from_args"]

DATASETS = ("mnist1d", "digits")
MODELS = ("cnn", "mlp", "linear")
SCHEDULES = ("linear", "linear-step", "warmup", "cosine", "step", "constant", "osgd")
LR_SCHEDULES = ("cosine", "step", "constant")
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


@dataclass
class DemoConfig:
    """Everything that decides a demo run; the defaults are the README's default run."""

    dataset: str = "mnist1d"
    model: str = "cnn"
    epochs: int = 100
    seeds: int = 5
    first_seed: int = 0
    schedule: str = "linear"
    compare: tuple[str, ...] = ()  # non-empty: one trimmed arm per listed schedule (``schedule`` unused)
    keep_start: float = 1.0
    keep_end: float | None = None  # None: 0.2 for "hardest", 1 - label_noise (or 0.8) for "easiest"
    warmup: int | None = None  # None: a fifth of the epochs (schedule "warmup" only)
    keep: str = "hardest"
    label_noise: float = 0.0
    batch_size: int = 100
    lr: float = 2e-2
    lr_schedule: str = "cosine"
    train_size: int | None = None  # None: the whole training split
    out: Path = field(default_factory=lambda: Path("demo_out"))
    overwrite: bool = False  # replace the files of a non-empty ``out``
    threads: int = 1  # intra-op threads; models this small only lose time to more
    progress: bool = True  # a progress bar on stderr when it is a terminal

    def resolved_keep_end(self) -> float:
        """The keep ratio at the last epoch after applying the documented defaults."""
        if self.keep_end is not None:
            return self.keep_end
        if self.keep == "hardest":
            return 0.2
        return 1.0 - self.label_noise if self.label_noise > 0 else 0.8

    def resolved_warmup(self) -> int:
        """Epochs without trimming of the ``"warmup"`` schedule after applying the default."""
        return self.warmup if self.warmup is not None else self.epochs // 5

    def arms(self) -> dict[str, str | None]:
        """Arm name -> keep-ratio schedule name (``None``: the untrimmed baseline), in training order."""
        if self.compare:
            return {"baseline": None, **{f"trimmed-{name}": name for name in self.compare}}
        return {"baseline": None, "trimmed": self.schedule}

    def validate(self) -> None:
        """Raise ``ValueError`` naming the command-line flag of any inconsistent setting."""
        ratio_ok = [0.0 < r <= 1.0 for r in (self.keep_start, self.resolved_keep_end())]  # False for NaN
        checks = [
            (self.dataset in DATASETS, f"--dataset must be one of {DATASETS}, got {self.dataset!r}"),
            (self.model in MODELS, f"--model must be one of {MODELS}, got {self.model!r}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (
                all(name in SCHEDULES for name in self.compare),
                f"--compare takes schedules from {SCHEDULES}, got {','.join(self.compare)!r}",
            ),
            (len(set(self.compare)) == len(self.compare), f"--compare lists a schedule twice: {self.compare}"),
            (self.keep in ("hardest", "easiest"), f"--keep must be 'hardest' or 'easiest', got {self.keep!r}"),
            (ratio_ok[0], f"--keep-start must be in (0, 1], got {self.keep_start}"),
            (ratio_ok[1], f"--keep-end must be in (0, 1], got {self.resolved_keep_end()}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.seeds >= 1, f"--seeds must be >= 1, got {self.seeds}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"--lr-schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}",
            ),
            (0.0 <= self.label_noise < 1.0, f"--label-noise must be in [0, 1), got {self.label_noise}"),
            (self.train_size is None or self.train_size >= 1, f"--train-size must be >= 1, got {self.train_size}"),
            (self.threads >= 1, f"--threads must be >= 1, got {self.threads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        # The schedules' own constraints (--warmup, the step schedule's direction) are checked where
        # they are built: run_demo builds every arm's schedule before training starts.


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Data:
    """A classification data set as tensors; ``x`` is ``(N, L)`` signals or ``(N, H, W)`` images."""

    name: str
    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays() -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset seeds the global RNGs of numpy and random; leave the caller's untouched.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())  # generated locally (never get_dataset: it downloads)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


@functools.lru_cache(maxsize=4)
def _digits_arrays() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    mean, std = x_tr.mean(), x_tr.std()
    return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def load_data(name: str, train_size: int | None = None) -> Data:
    """MNIST-1D (4000 train / 1000 test signals of length 40, generated locally) or scikit-learn's
    digits (1347 / 450 images of 8x8, stratified split). ``train_size`` keeps the first samples."""
    arrays = _mnist1d_arrays() if name == "mnist1d" else _digits_arrays()
    x, y, x_test, y_test = (torch.as_tensor(a) for a in arrays)
    if train_size is not None:
        if not 1 <= train_size <= len(y):
            raise ValueError(f"--train-size must be in [1, {len(y)}] for {name}, got {train_size}")
        x, y = x[:train_size], y[:train_size]
    return Data(name, x.float(), y.long(), x_test.float(), y_test.long(), 10)


def add_label_noise(y: Tensor, fraction: float, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Give ``round(fraction * N)`` random samples a different, uniformly drawn wrong class.

    Returns the noisy labels and the bool mask of flipped samples.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    n_noisy = round(fraction * len(y))
    noisy = torch.zeros(len(y), dtype=torch.bool)
    noisy[torch.randperm(len(y), generator=g)[:n_noisy]] = True
    shift = torch.randint(1, num_classes, (len(y),), generator=g)
    return torch.where(noisy, (y + shift) % num_classes, y), noisy


# --------------------------------------------------------------------------------------------- models


class CNN1d(nn.Module):
    """The MNIST-1D paper's CNN: three strided convolutions (25 channels) and a linear head."""

    def __init__(self, length: int, num_classes: int, channels: int = 25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            width = self.features(torch.zeros(1, 1, length)).shape[1]
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.unsqueeze(1)))


class CNN2d(nn.Module):
    """A small CNN for 8x8 digits: two 3x3 convolutions (the second strided) and a linear head."""

    def __init__(self, shape: tuple[int, int], num_classes: int, channels: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            width = self.features(torch.zeros(1, 1, *shape)).shape[1]
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.unsqueeze(1)))


def build_model(name: str, data: Data) -> nn.Module:
    """``"cnn"``, ``"mlp"`` (two hidden layers of 100) or ``"linear"`` for ``data``'s input shape."""
    shape = tuple(data.x.shape[1:])
    if name == "cnn":
        return CNN1d(shape[0], data.num_classes) if len(shape) == 1 else CNN2d(shape, data.num_classes)
    features = math.prod(shape)
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(features, 100),
            nn.ReLU(),
            nn.Linear(100, 100),
            nn.ReLU(),
            nn.Linear(100, data.num_classes),
        )
    return nn.Sequential(nn.Flatten(), nn.Linear(features, data.num_classes))


# ------------------------------------------------------------------------------------------ schedules


def make_schedule(cfg: DemoConfig, steps_per_epoch: int, name: str | None = None) -> KeepRatioSchedule:
    """The keep-ratio schedule ``name`` (default ``cfg.schedule``) from ``keep_start`` to the keep end."""
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
    return OrderedSGDSchedule(start)


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


# ------------------------------------------------------------------------------------------- training


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
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    torch.manual_seed(seed)  # the same initial weights in both arms
    model = build_model(cfg.model, data)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    schedule = ConstantSchedule(1.0) if schedule_name is None else make_schedule(cfg, steps_per_epoch, schedule_name)
    criterion = TrimmedCrossEntropyLoss(schedule, keep=cfg.keep)
    order = torch.Generator().manual_seed(seed)  # the same mini-batches in both arms
    rows: list[dict[str, object]] = []
    total_steps, global_step = cfg.epochs * steps_per_epoch, 0
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
            ratio_sum += criterion.last_keep_ratio
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
                "keep_ratio": ratio_sum / steps_per_epoch,
                "kept_fraction": kept / seen,
                "objective": objective_sum / steps_per_epoch,
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


# ------------------------------------------------------------------------------------------ reporting


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Student-t ``confidence`` interval of the mean of ``values``; ``None`` with fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    from scipy.stats import t

    mean = statistics.fmean(values)
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def verdict(interval: tuple[float, float] | None, confidence: float = 0.95) -> str:
    """What a confidence interval of ``trimmed - baseline`` (points of test error) says."""
    level = f"{100 * confidence:g}%"
    if interval is None:
        return f"no {level} interval exists with one seed (run two or more)"
    lo, hi = interval
    ci = f"CI {lo:+.2f} … {hi:+.2f} points"
    if hi < 0:
        return f"trimming better at {level} ({ci})"
    if lo > 0:
        return f"trimming worse at {level} ({ci})"
    return f"no difference resolved at {level} ({ci})"


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(rows: list[dict[str, object]], cfg: DemoConfig) -> dict[str, Any]:
    """Final and last-10%-of-epochs test error per arm (mean, std over seeds; std ``None`` with one seed)
    and, per trimmed arm, the paired per-seed differences ``trimmed - baseline`` in percentage points
    with their 95% t intervals."""
    tail = max(1, cfg.epochs // 10)
    arms = list(cfg.arms())
    seeds = sorted({int(r["seed"]) for r in rows})
    final: dict[str, list[float]] = {a: [] for a in arms}
    late: dict[str, list[float]] = {a: [] for a in arms}
    for arm in arms:
        for seed in seeds:
            curve = [100 * float(r["test_error"]) for r in rows if r["arm"] == arm and r["seed"] == seed]
            final[arm].append(curve[-1])
            late[arm].append(statistics.fmean(curve[-tail:]))
    paired: dict[str, dict[str, Any]] = {}
    for arm in arms[1:]:
        d_final = [t - b for t, b in zip(final[arm], final["baseline"], strict=True)]
        d_late = [t - b for t, b in zip(late[arm], late["baseline"], strict=True)]
        paired[arm] = {
            "per_seed_final": d_final,
            "final": _mean_std(d_final),
            "late": _mean_std(d_late),
            "ci_final": t_interval(d_final),
            "ci_late": t_interval(d_late),
            "wins_final": sum(d < 0 for d in d_final),
            "wins_late": sum(d < 0 for d in d_late),
            "verdict": verdict(t_interval(d_final)),
        }
    return {
        "seeds": seeds,
        "tail_epochs": tail,
        "final": {a: _mean_std(v) for a, v in final.items()},
        "late": {a: _mean_std(v) for a, v in late.items()},
        "per_seed_final": final,
        "paired": paired,
    }


def _pm(stats: tuple[float, float | None], signed: bool = False) -> str:
    mean, std = stats
    return f"{mean:{'+' if signed else ''}.2f} ± {'n/a' if std is None else f'{std:.2f}':<5}"


def _ci(interval: tuple[float, float] | None) -> str:
    return "n/a" if interval is None else f"{interval[0]:+.2f} … {interval[1]:+.2f}"


def _seed_range(seeds: Sequence[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"


def format_table(summary: dict[str, Any], cfg: DemoConfig) -> str:
    """The table the demo prints and writes to ``summary.txt``."""
    n = len(summary["seeds"])
    tail = summary["tail_epochs"]
    noise = f", label noise {cfg.label_noise:g}" if cfg.label_noise else ""
    lines = [
        f"{cfg.dataset}, model {cfg.model}, {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"Adam lr {cfg.lr:g} ({cfg.lr_schedule} lr schedule), {n} seed(s) ({_seed_range(summary['seeds'])}){noise}",
        f"trimmed: keep={cfg.keep!r}, backend {summary.get('backend', 'auto')!r}",
    ]
    for arm, schedule in summary.get("schedules", {}).items():
        lines.append(f"  {arm}: {schedule}")
    w = max(34, *(len(f"{arm} - baseline") + 2 for arm in summary["paired"]))
    lines += ["", f"{'test error (%)':<{w}}{'final epoch':>18}{f'mean of last {tail} epoch(s)':>28}"]
    for arm in summary["final"]:
        lines.append(f"{arm:<{w}}{_pm(summary['final'][arm]):>18}{_pm(summary['late'][arm]):>28}")
    df = f"{n - 1} df" if n > 1 else "one seed"
    for arm, p in summary["paired"].items():
        lines.append("")
        lines.append(f"{f'{arm} - baseline':<{w}}{_pm(p['final'], True):>18}{_pm(p['late'], True):>28}")
        lines.append(f"{f'  95% CI (Student t, {df})':<{w}}{_ci(p['ci_final']):>18}{_ci(p['ci_late']):>28}")
        wins_f, wins_l = f"{p['wins_final']} / {n}", f"{p['wins_late']} / {n}"
        lines.append(f"{'  seeds where trimming is better':<{w}}{wins_f:>18}{wins_l:>28}")
        per_seed = ", ".join(f"{s}: {d:+.2f}" for s, d in zip(summary["seeds"], p["per_seed_final"], strict=True))
        lines.append(f"  final-epoch difference per seed: {per_seed}")
        lines.append(f"  verdict (final epoch): {p['verdict']}")
    lines.append("")
    lines.append("(mean ± std over seeds; differences in percentage points, negative = trimming helps)")
    return "\n".join(line.rstrip() for line in lines)


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    """One line per (arm, seed, epoch), columns ``CSV_FIELDS``."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot(rows: list[dict[str, object]], cfg: DemoConfig, path: Path | None = None) -> Any:
    """Test error per epoch of every arm (mean over seeds, band min to max) and its keep ratio, one
    curve per arm in each panel; saved to ``path`` when given. Returns the matplotlib ``Figure``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_err, ax_keep = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    epochs = np.arange(1, cfg.epochs + 1)
    colors = ("tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
    for i, arm in enumerate(cfg.arms()):
        color = colors[i % len(colors)]
        seeds = sorted({r["seed"] for r in rows if r["arm"] == arm})
        for column, ax in (("test_error", ax_err), ("keep_ratio", ax_keep)):
            curves = np.array([[float(r[column]) for r in rows if r["arm"] == arm and r["seed"] == s] for s in seeds])
            if column == "test_error":
                curves *= 100
            ax.plot(epochs, curves.mean(0), color=color, label=f"{arm} (mean of {len(seeds)} seeds)")
            if len(seeds) > 1:
                ax.fill_between(epochs, curves.min(0), curves.max(0), color=color, alpha=0.2, lw=0)
    noise = f", label noise {cfg.label_noise:g}" if cfg.label_noise else ""
    ax_err.set(
        xlabel="epoch",
        ylabel="test error (%)",
        title=f"{cfg.dataset}, {cfg.model}{noise}: test error (band: min-max over seeds)",
    )
    final = [100 * float(r["test_error"]) for r in rows if r["epoch"] == cfg.epochs]
    ax_err.set_ylim(0, min(100, 2.5 * max(final)) if max(final) > 0 else None)
    ax_err.grid(alpha=0.3)
    ax_err.legend()
    ax_keep.set(xlabel="epoch", ylabel="keep ratio (mean per epoch)", title=f"keep={cfg.keep!r}")
    ax_keep.set_ylim(0, 1.05)
    ax_keep.grid(alpha=0.3)
    ax_keep.legend()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


# ---------------------------------------------------------------------------------------------- entry


def _check_out(cfg: DemoConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"--out {out} is not empty: pass --overwrite to replace its files, or name another folder")
    return out


def _resolved_config(cfg: DemoConfig) -> str:
    """``summary.txt``'s config line, with the defaults that depend on other settings filled in."""
    config = asdict(cfg)
    config.pop("progress")
    config["keep_end"] = cfg.resolved_keep_end()
    if "warmup" in (cfg.compare or (cfg.schedule,)):
        config["warmup"] = cfg.resolved_warmup()
    config["compare"] = ",".join(cfg.compare) or None
    return ", ".join(f"{k}={v}" for k, v in config.items())


def run_demo(cfg: DemoConfig, stream: TextIO | None = None) -> dict[str, Any]:
    """Run every arm over ``cfg.seeds`` seeds, print the table to ``stream`` and write the outputs.

    Returns a dict with ``rows`` (the CSV's rows), ``summary``, ``table``, ``wall_s`` (the training
    time) and the written paths ``csv``, ``png`` and ``txt``.
    """
    cfg.validate()
    out = _check_out(cfg)
    stream = sys.stdout if stream is None else stream
    data = load_data(cfg.dataset, cfg.train_size)
    steps_per_epoch = math.ceil(len(data.y) / cfg.batch_size)
    arms = cfg.arms()
    schedules = {a: repr(make_schedule(cfg, steps_per_epoch, s)) for a, s in arms.items() if s is not None}
    # Resolving the backend loads (on first use on a machine: compiles) the native op: before the clock
    # and the progress bar start, so neither counts the compile.
    backend = _resolve_backend("auto", data.x.device)
    seeds = range(cfg.first_seed, cfg.first_seed + cfg.seeds)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        total = len(arms) * len(seeds) * cfg.epochs
        # disable=None: no bar when stderr is not a terminal (a log file would get every update)
        bar = tqdm(total=total, unit="epoch", desc=f"{cfg.dataset}/{cfg.model}", dynamic_ncols=True, disable=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    rows: list[dict[str, object]] = []
    try:
        for seed in seeds:
            for arm in arms:
                rows += train_run(data, cfg, arm, seed, bar)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    summary = summarize(rows, cfg)
    summary["backend"] = backend
    summary["schedules"] = schedules
    table = format_table(summary, cfg)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "metrics.csv", "png": out / "test_error.png", "txt": out / "summary.txt"}
    write_csv(rows, paths["csv"])
    plot(rows, cfg, paths["png"])
    text = f"{table}\n\ntraining wall time {wall:.1f} s\nconfig: {_resolved_config(cfg)}\n"
    paths["txt"].write_text(text, encoding="utf-8")
    print(table, file=stream)
    print(f"\ntraining took {wall:.1f} s; wrote {paths['csv']}, {paths['png']}, {paths['txt']}", file=stream)
    return {"rows": rows, "summary": summary, "table": table, "wall_s": wall, **paths}


def _schedule_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in SCHEDULES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"schedules are a comma-separated list from {', '.join(SCHEDULES)}: {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line flags."""
    d = DemoConfig()
    a = parser.add_argument
    a("--dataset", choices=DATASETS, default=d.dataset, help="data set, made offline (default %(default)s)")
    a("--model", choices=MODELS, default=d.model, help="model (default %(default)s)")
    a("--epochs", type=int, default=d.epochs, help="training epochs (default %(default)s)")
    a("--seeds", type=int, default=d.seeds, help="number of seeds per arm (default %(default)s)")
    a("--first-seed", type=int, default=d.first_seed, help="seeds are first-seed, first-seed+1, ...")
    a(
        "--schedule",
        choices=SCHEDULES,
        default=d.schedule,
        help="keep-ratio schedule of the trimmed arm (default %(default)s: the paper's, linear in the epoch)",
    )
    a(
        "--compare",
        type=_schedule_list,
        default=(),
        metavar="S1,S2,...",
        help="instead of one trimmed arm, one per listed schedule (e.g. linear,warmup,osgd,constant), "
        "all against one baseline per seed",
    )
    a("--keep-start", type=float, default=d.keep_start, help="keep ratio at the first epoch (default 1.0)")
    a(
        "--keep-end",
        type=float,
        default=None,
        help="keep ratio at the last epoch (default 0.2; with --keep easiest 1 - label noise, or 0.8)",
    )
    a("--warmup", type=int, default=None, help="epochs untrimmed for --schedule warmup (default epochs/5)")
    a(
        "--keep",
        choices=("hardest", "easiest"),
        default=d.keep,
        help="keep the hardest samples (mini-batch trimming) or the easiest (against noisy labels)",
    )
    a("--label-noise", type=float, default=d.label_noise, help="fraction of training labels flipped")
    a("--batch-size", type=int, default=d.batch_size, help="mini-batch size (default %(default)s)")
    a("--lr", type=float, default=d.lr, help="Adam learning rate (default %(default)s)")
    a(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=d.lr_schedule,
        help="learning rate over the run, the same in every arm (default %(default)s: decays to ~0; "
        "step: /10 at 1/2 and 3/4; constant)",
    )
    a("--train-size", type=int, default=None, help="use only the first N training samples")
    a("--out", type=Path, default=d.out, help="output folder, empty or new (default %(default)s)")
    a("--overwrite", action="store_true", help="replace the files of a non-empty --out folder")
    a("--threads", type=int, default=d.threads, help="torch intra-op threads (default %(default)s)")
    a("--no-progress", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """A :class:`DemoConfig` from parsed command-line flags."""
    return DemoConfig(
        dataset=args.dataset,
        model=args.model,
        epochs=args.epochs,
        seeds=args.seeds,
        first_seed=args.first_seed,
        schedule=args.schedule,
        compare=args.compare,
        keep_start=args.keep_start,
        keep_end=args.keep_end,
        warmup=args.warmup,
        keep=args.keep,
        label_noise=args.label_noise,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        train_size=args.train_size,
        out=args.out,
        overwrite=args.overwrite,
        threads=args.threads,
        progress=not args.no_progress,
    )
