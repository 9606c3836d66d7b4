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

The package: :mod:`.config` (the settings and their command-line flags), :mod:`.runner` (the arms
over seeds, and the registry of tasks), a task module per task (:mod:`.classifier`, with its data
and models in :mod:`.data`), :mod:`.training` (what every task's training loop shares: the
keep-ratio and learning-rate schedules), :mod:`.stats` (paired differences and their intervals) and
:mod:`.report` (the table, the CSV and the figure).
"""

from .classifier import CSV_FIELDS, load_data, train_run
from .config import SCHEDULES, TASKS, DemoConfig, add_arguments, config_from_args
from .report import format_table, plot, write_csv
from .runner import run_demo
from .stats import summarize, t_interval, verdict
from .training import lr_factor, make_schedule

__all__ = [
    "CSV_FIELDS",
    "SCHEDULES",
    "TASKS",
    "DemoConfig",
    "add_arguments",
    "config_from_args",
    "format_table",
    "load_data",
    "lr_factor",
    "make_schedule",
    "plot",
    "run_demo",
    "summarize",
    "t_interval",
    "train_run",
    "verdict",
    "write_csv",
]
