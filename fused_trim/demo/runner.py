"""A demo run: every arm of the chosen task over the seeds, then the statistics and the report."""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import torch

from ..functional import resolve_backend
from .config import TASKS, DemoConfig
from .report import format_table, plot, write_csv
from .stats import summarize
from .training import make_schedule

__all__ = ["run_demo", "task_module"]


def task_module(name: str) -> ModuleType:
    """The module of task ``name`` (one of ``TASKS``): ``fused_trim.demo.<name>``, which gives
    ``CSV_FIELDS``, ``load(cfg)``, ``steps_per_epoch(data, cfg)`` and ``train_run(data, cfg, arm, seed, bar)`` (see
    :mod:`.classifier`). A new task is such a module and its name in ``config.TASKS``."""
    if name not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {name!r}")
    return importlib.import_module(f"{__package__}.{name}")


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
    time) and the written paths ``csv``, ``png`` and ``txt``. ``--task lm`` runs
    :func:`fused_trim.demo.lm.run_lm_demo` on its :class:`~fused_trim.demo.lm.LMConfig`.
    """
    if cfg.task == "lm":
        from .lm import LMConfig, run_lm_demo

        if not isinstance(cfg, LMConfig):
            raise ValueError("--task lm is configured by fused_trim.demo.lm.LMConfig, not DemoConfig")
        return run_lm_demo(cfg, stream)
    cfg.validate()
    out = _check_out(cfg)
    stream = sys.stdout if stream is None else stream
    task = task_module(cfg.task)
    data = task.load(cfg)
    steps_per_epoch = task.steps_per_epoch(data, cfg)
    arms = cfg.arms()
    schedules = {a: repr(make_schedule(cfg, steps_per_epoch, s)) for a, s in arms.items() if s is not None}
    # Resolving the backend loads (on first use on a machine: compiles) the native op: before the clock
    # and the progress bar start, so neither counts the compile.
    backend = resolve_backend("auto", data.device)
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
                rows += task.train_run(data, cfg, arm, seed, bar)
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
    write_csv(rows, paths["csv"], task.CSV_FIELDS)
    plot(rows, cfg, paths["png"])
    text = f"{table}\n\ntraining wall time {wall:.1f} s\nconfig: {_resolved_config(cfg)}\n"
    paths["txt"].write_text(text, encoding="utf-8")
    print(table, file=stream)
    print(f"\ntraining took {wall:.1f} s; wrote {paths['csv']}, {paths['png']}, {paths['txt']}", file=stream)
    return {"rows": rows, "summary": summary, "table": table, "wall_s": wall, **paths}
