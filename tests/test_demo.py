"""The demo (``python -m fused_trim demo``) on tiny settings: outputs, pairing, determinism, statistics."""

from __future__ import annotations

import csv
import io
import math
import re

import pytest
import torch

pytest.importorskip("mnist1d")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from fused_trim import LinearSchedule, demo  # noqa: E402
from fused_trim.__main__ import main  # noqa: E402
from fused_trim.demo import (  # noqa: E402
    CSV_FIELDS,
    SCHEDULES,
    DemoConfig,
    load_data,
    lr_factor,
    make_schedule,
    plot,
    run_demo,
    t_interval,
    train_run,
    verdict,
)

RESULT_FIELDS = [f for f in CSV_FIELDS if f != "time_s"]


def _tiny(tmp_path, **kwargs) -> DemoConfig:
    settings = dict(epochs=2, seeds=1, train_size=400, out=tmp_path, progress=False)
    settings.update(kwargs)
    return DemoConfig(**settings)


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_demo_writes_csv_png_and_both_arms(tmp_path):
    stream = io.StringIO()
    result = run_demo(_tiny(tmp_path, seeds=2), stream=stream)
    rows = _read(tmp_path / "metrics.csv")
    assert list(rows[0]) == list(CSV_FIELDS)
    assert {(r["arm"], r["seed"], r["epoch"]) for r in rows} == {
        (arm, str(seed), str(epoch)) for arm in ("baseline", "trimmed") for seed in (0, 1) for epoch in (1, 2)
    }
    png = (tmp_path / "test_error.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    table = (tmp_path / "summary.txt").read_text()
    printed = stream.getvalue()
    assert result["table"] in table and result["table"] in printed
    assert "baseline" in printed and "trimmed - baseline" in printed
    for r in rows:
        assert 0.0 <= float(r["test_error"]) <= 1.0
    # the schedule: no trimming in the baseline; the paper's 1.0 -> 0.2 in the trimmed arm
    by = {(r["arm"], r["seed"], r["epoch"]): r for r in rows}
    for seed in "01":
        assert float(by["baseline", seed, "2"]["keep_ratio"]) == 1.0
        assert float(by["trimmed", seed, "1"]["keep_ratio"]) == 1.0
        assert float(by["trimmed", seed, "2"]["keep_ratio"]) == pytest.approx(0.2)
        assert float(by["trimmed", seed, "2"]["kept_fraction"]) == pytest.approx(0.2)
        # paired arms: same initial weights, mini-batches and learning rates, so with r = 1 in the first
        # epoch the trimmed arm reproduces the baseline exactly; at r = 0.2 it no longer does
        first = [by[arm, seed, "1"] for arm in ("baseline", "trimmed")]
        assert [first[0][f] for f in RESULT_FIELDS[5:]] == [first[1][f] for f in RESULT_FIELDS[5:]]
        assert by["baseline", seed, "2"]["train_loss"] != by["trimmed", seed, "2"]["train_loss"]
    # the summary's paired difference is the per-seed difference of the final test errors
    final = {(r["arm"], r["seed"]): 100 * float(r["test_error"]) for r in rows if r["epoch"] == "2"}
    diffs = [final["trimmed", s] - final["baseline", s] for s in "01"]
    assert result["summary"]["paired"]["trimmed"]["final"][0] == pytest.approx(sum(diffs) / 2, abs=1e-3)
    assert f"0: {diffs[0]:+.2f}, 1: {diffs[1]:+.2f}" in printed
    assert "95% CI (Student t, 1 df)" in printed and "verdict (final epoch): " in printed
    # summary.txt records the resolved keep end, not the "use the default" None
    assert "keep_end=0.2," in table and "keep_end=None" not in table


def test_same_seed_same_results_other_seed_differs(tmp_path):
    configs = [_tiny(tmp_path / str(i), first_seed=s) for i, s in enumerate([3, 3, 4])]
    runs = [run_demo(cfg, stream=io.StringIO()) for cfg in configs]
    results = [[[r[f] for f in RESULT_FIELDS if f != "seed"] for r in run["rows"]] for run in runs]
    assert results[0] == results[1]
    assert results[0] != results[2]


def test_cnn_learns_mnist1d(tmp_path):
    # A short check that the CNN learns MNIST-1D: a broken pipeline stays near 90% error (chance).
    rows = run_demo(_tiny(tmp_path, epochs=4, train_size=None), stream=io.StringIO())["rows"]
    baseline = [r for r in rows if r["arm"] == "baseline"]
    assert baseline[-1]["test_error"] < 0.5
    assert baseline[-1]["test_error"] < baseline[0]["test_error"]


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_runs(tmp_path, name):
    epochs = 6 if name == "osgd" else 3
    # Ordered SGD's original setting: mini-batches of 64, counts 64 -> 32 -> 16 -> 8 -> 4.
    size, batch = (192, 64) if name == "osgd" else (200, 100)
    cfg = _tiny(
        tmp_path, dataset="digits", model="mlp", schedule=name, epochs=epochs, train_size=size, batch_size=batch
    )
    schedule = make_schedule(cfg, steps_per_epoch=2)
    if name == "osgd":
        assert schedule.gives_count and schedule(0) == 64
    else:
        assert 0.0 < schedule(0) <= 1.0
    rows = train_run(load_data("digits", size), cfg, "trimmed", seed=0)
    ratios = [r["keep_ratio"] for r in rows]
    if name == "osgd":  # the count halved per threshold crossed by the previous epochs' training accuracy
        crossed = 0
        for row, ratio in zip(rows, ratios, strict=True):
            assert ratio == row["kept_fraction"] == 64 * 0.5**crossed / 64
            crossed = max(crossed, sum(1 - row["train_error"] >= t for t in (0.8, 0.9, 0.95, 0.995)))
        assert ratios[0] == 1.0 and ratios[-1] <= 0.5  # it did halve
    elif name == "linear-step":  # 2 steps per epoch: 1.0, 0.84 | 0.68, 0.52 | 0.36, 0.2
        assert ratios == pytest.approx([0.92, 0.6, 0.28])
    elif name == "constant":
        assert ratios == pytest.approx([0.2, 0.2, 0.2])
    else:  # linear, warmup (0 epochs of 3), cosine, step: from 1.0 to 0.2 at the last epoch
        assert ratios[0] == 1.0 and ratios[-1] == pytest.approx(0.2)
        assert 0.2 < ratios[1] < 1.0


def test_paper_schedule_is_the_default():
    cfg = DemoConfig(epochs=7)
    schedule = make_schedule(cfg, steps_per_epoch=40)
    assert isinstance(schedule, LinearSchedule)
    assert [schedule(e) for e in range(7)] == pytest.approx([1 + (0.2 - 1) * e / 6 for e in range(7)])


def test_keep_easiest_with_label_noise_keeps_fewer_noisy_labels(tmp_path):
    cfg = _tiny(tmp_path, dataset="digits", model="mlp", keep="easiest", label_noise=0.4, epochs=3)
    cfg.train_size = None
    assert cfg.resolved_keep_end() == pytest.approx(0.6)
    rows = train_run(load_data("digits"), cfg, "trimmed", seed=0)
    assert rows[0]["noisy_in_batch"] == pytest.approx(0.4, abs=0.01)
    assert rows[-1]["kept_fraction"] == pytest.approx(0.6, abs=0.01)
    # the loss keeps the easiest 60%: far fewer flipped labels among them than in the batches
    assert rows[-1]["noisy_in_kept"] < 0.5 * rows[-1]["noisy_in_batch"]


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["demo", "--dataset", "digits", "--model", "linear", "--epochs", "2", "--seeds", "1"]
    args += ["--train-size", "300", "--schedule", "cosine", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "CosineSchedule(epochs=2" in capsys.readouterr().out
    assert (out / "metrics.csv").exists() and (out / "test_error.png").exists()
    with pytest.raises(SystemExit):
        main(["demo", "--dataset", "imagenet"])
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0", "--out", str(out)])


def test_t_interval_against_the_closed_form():
    # n = 3: mean 2, std 1, 2 degrees of freedom, whose t quantile has the closed form
    # (2p - 1) / sqrt(2p(1 - p)); p = 0.975 gives 4.302652...
    p = 0.975
    q = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    lo, hi = t_interval([1.0, 2.0, 3.0])
    assert (lo, hi) == pytest.approx((2 - q / math.sqrt(3), 2 + q / math.sqrt(3)), rel=1e-12)
    assert hi == pytest.approx(4.48413, abs=1e-5)
    # n = 2: one degree of freedom, t = tan(pi (p - 1/2)) = 12.7062...; the half width is t * |a - b| / 2
    lo, hi = t_interval([-1.0, 0.0])
    half = math.tan(math.pi * (p - 0.5)) * math.sqrt(0.5) / math.sqrt(2)
    assert (lo, hi) == pytest.approx((-0.5 - half, -0.5 + half), rel=1e-12)
    assert t_interval([0.7]) is None


def test_verdict_cases():
    assert verdict((-1.5, -0.25)) == "trimming better at 95% (CI -1.50 … -0.25 points)"
    assert verdict((0.1, 2.0)) == "trimming worse at 95% (CI +0.10 … +2.00 points)"
    assert verdict((-0.8, 0.4)) == "no difference resolved at 95% (CI -0.80 … +0.40 points)"
    assert verdict((0.0, 0.0)).startswith("no difference resolved")
    assert verdict(None) == "no 95% interval exists with one seed (run two or more)"


def test_one_seed_table_says_n_a(tmp_path):
    printed = io.StringIO()
    run_demo(_tiny(tmp_path, dataset="digits", model="linear", train_size=200), stream=printed)
    table = printed.getvalue()
    assert "± n/a" in table and "± 0.00" not in table
    assert "no 95% interval exists with one seed" in table


def test_lr_schedule_first_and_last_step():
    total = 40 * 100
    assert lr_factor("cosine", 0, total) == 1.0
    assert lr_factor("cosine", total // 2, total) == pytest.approx(0.5)
    last = lr_factor("cosine", total - 1, total)
    assert last == pytest.approx((1 + math.cos(math.pi * (total - 1) / total)) / 2) and 0 < last < 1e-6
    assert [lr_factor("step", s, 100) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert {lr_factor("constant", s, 100) for s in (0, 99)} == {1.0}


def test_lr_schedule_reaches_the_optimizer(tmp_path):
    cfg = _tiny(tmp_path, dataset="digits", model="linear", train_size=200, epochs=4, batch_size=50)
    rows = train_run(load_data("digits", 200), cfg, "baseline", seed=0)
    # 4 steps per epoch, 16 in all; the row records the rate of the epoch's last step
    assert [r["lr"] for r in rows] == pytest.approx([0.02 * lr_factor("cosine", 4 * e + 3, 16) for e in range(4)])
    cfg.lr_schedule = "constant"
    assert {r["lr"] for r in train_run(load_data("digits", 200), cfg, "baseline", seed=0)} == {0.02}


def test_compare_trains_the_baseline_once_per_seed(tmp_path, monkeypatch):
    calls = []
    real = demo.train_run

    def counting(data, cfg, arm, seed, bar=None):
        calls.append((arm, seed))
        return real(data, cfg, arm, seed, bar)

    monkeypatch.setattr(demo.classifier, "train_run", counting)
    arms = ("linear", "warmup", "osgd", "constant")
    cfg = _tiny(tmp_path, dataset="digits", model="mlp", seeds=2, train_size=200, compare=arms)
    printed = io.StringIO()
    result = run_demo(cfg, stream=printed)
    names = ["baseline"] + [f"trimmed-{a}" for a in arms]
    assert sorted(calls) == sorted((arm, seed) for arm in names for seed in (0, 1))
    table = printed.getvalue().splitlines()
    for name in names:  # one row of test errors per arm, one paired block per trimmed arm
        assert sum(re.match(rf"{name} +\d", line) is not None for line in table) == 1
    for name in names[1:]:
        assert sum(line.startswith(f"{name} - baseline") for line in table) == 1
    assert sum("verdict (final epoch)" in line for line in table) == len(arms)
    fig = plot(result["rows"], cfg)
    for ax in fig.axes:  # test error and keep ratio: one curve per arm
        assert [line.get_label().split(" (")[0] for line in ax.get_lines()] == names
    keep = {r["arm"]: r["keep_ratio"] for r in result["rows"] if r["epoch"] == 2 and r["seed"] == 0}
    assert keep["baseline"] == 1.0 and keep["trimmed-constant"] == pytest.approx(0.2)


def test_out_must_be_empty_unless_overwrite(tmp_path):
    (tmp_path / "old.txt").write_text("a previous run")
    cfg = _tiny(tmp_path, dataset="digits", model="linear", train_size=200)
    with pytest.raises(ValueError, match="--out .* is not empty.*--overwrite"):
        run_demo(cfg, stream=io.StringIO())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]
    cfg.overwrite = True
    run_demo(cfg, stream=io.StringIO())
    assert (tmp_path / "summary.txt").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--keep-end", "1.5"], "--keep-end must be in \\(0, 1\\], got 1.5"),
        (["--keep-start", "0"], "--keep-start must be in \\(0, 1\\], got 0.0"),
        (["--keep-end", "nan"], "--keep-end must be in"),
        (["--train-size", "100000"], "--train-size must be in \\[1, 4000\\] for mnist1d, got 100000"),
        (["--compare", "linear,fancy"], "--compare: schedules are a comma-separated list"),
        (["--lr-schedule", "exp"], "--lr-schedule: invalid choice"),
        (["--schedule", "warmup", "--warmup", "3", "--epochs", "3"], "--warmup must be in"),
        (["--compare", "linear,step", "--keep-start", "0.5", "--keep-end", "0.8"], "--keep-end <= --keep-start"),
    ],
)
def test_flag_errors_name_the_flag(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        main(["demo", *flags, "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capsys):
    run_demo(_tiny(tmp_path, dataset="digits", model="linear", train_size=200, progress=True), stream=io.StringIO())
    assert "\r" not in capsys.readouterr().err


def test_native_op_is_loaded_before_training_starts(tmp_path, monkeypatch):
    # Resolving the backend is what compiles the native op on first use: it must happen before the
    # first epoch is timed (and before the progress bar starts), not after training.
    events = []
    resolve, train = demo.runner.resolve_backend, demo.classifier.train_run
    monkeypatch.setattr(demo.runner, "resolve_backend", lambda *a: events.append("resolve") or resolve(*a))
    monkeypatch.setattr(demo.classifier, "train_run", lambda *a, **k: events.append("train") or train(*a, **k))
    run_demo(_tiny(tmp_path, dataset="digits", model="linear", train_size=200), stream=io.StringIO())
    assert events == ["resolve", "train", "train"]


def test_the_task_is_a_pluggable_choice(tmp_path):
    """--task names a module of fused_trim.demo that gives the runner what it needs; an unknown one
    is refused by name before anything trains."""
    task = demo.runner.task_module("classifier")
    assert task.CSV_FIELDS == CSV_FIELDS and callable(task.load) and callable(task.train_run)
    assert task.steps_per_epoch(task.load(_tiny(tmp_path, dataset="digits", train_size=250)), _tiny(tmp_path)) == 3
    assert task.load(_tiny(tmp_path, dataset="digits", train_size=50)).device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--task must be one of \('classifier', 'lm'\), got 'poem'"):
        run_demo(_tiny(tmp_path, task="poem"), stream=io.StringIO())
    with pytest.raises(ValueError, match="--task lm is configured by fused_trim.demo.lm.LMConfig"):
        run_demo(_tiny(tmp_path, task="lm"), stream=io.StringIO())
    assert (
        "task=classifier"
        in (
            run_demo(_tiny(tmp_path, dataset="digits", model="linear", train_size=100), stream=io.StringIO())["txt"]
        ).read_text()
    )
