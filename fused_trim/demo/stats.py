"""The paired comparison of arms over seeds: Student-t intervals and what they say."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from .config import DemoConfig


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Student-t ``confidence`` interval of the mean of ``values``; ``None`` with fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    from scipy.stats import t

    mean = statistics.fmean(values)
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def verdict(
    interval: tuple[float, float] | None, confidence: float = 0.95, unit: str = "points", digits: int = 2
) -> str:
    """What a confidence interval of ``trimmed - baseline`` (in ``unit``: points of test error for the
    classifier, nats per token for the LM; lower is better) says."""
    level = f"{100 * confidence:g}%"
    if interval is None:
        return f"no {level} interval exists with one seed (run two or more)"
    lo, hi = interval
    ci = f"CI {lo:+.{digits}f} … {hi:+.{digits}f} {unit}"
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
