"""What a demo run shows: the table it prints, the CSV of every epoch and the figure."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import DemoConfig


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


def write_csv(rows: list[dict[str, object]], path: Path, fields: Sequence[str]) -> None:
    """One line per (arm, seed, epoch), columns ``fields`` (the task's ``CSV_FIELDS``)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
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
