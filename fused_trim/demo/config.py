"""The demo's settings (:class:`DemoConfig`) and their command-line flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DemoConfig", "add_arguments", "config_from_args"]

# The modules runner.run_demo can train (see runner.task_module); "lm" has its own settings and flags
# (fused_trim.demo.lm: LMConfig, add_arguments), which the command line picks by --task.
TASKS = ("classifier", "lm")
DATASETS = ("mnist1d", "digits")
MODELS = ("cnn", "mlp", "linear")
SCHEDULES = ("linear", "linear-step", "warmup", "cosine", "step", "constant", "osgd")
LR_SCHEDULES = ("cosine", "step", "constant")


@dataclass
class DemoConfig:
    """Everything that decides a demo run; the defaults are the README's default run."""

    task: str = "classifier"
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
            (self.task in TASKS, f"--task must be one of {TASKS}, got {self.task!r}"),
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
    a(
        "--task",
        choices=TASKS,
        default=d.task,
        help="what is trained (default %(default)s; lm: a small language model, see --task lm --help)",
    )
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
        task=args.task,
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
