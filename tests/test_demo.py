"""The demo (``python -m fused_trim demo``) on tiny settings: outputs, pairing, determinism."""

from __future__ import annotations

import csv
import io

import pytest

pytest.importorskip("mnist1d")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from fused_trim import LinearSchedule  # noqa: E402
from fused_trim.__main__ import main  # noqa: E402
from fused_trim.demo import (  # noqa: E402
    CSV_FIELDS,
    SCHEDULES,
    DemoConfig,
    load_data,
    make_schedule,
    run_demo,
    train_run,
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
        (arm, str(seed), str(epoch)) for arm in ("baseline", "trimmed") for seed in (0, 1) for epoch in (0, 1)
    }
    png = (tmp_path / "test_error.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    table = (tmp_path / "summary.txt").read_text()
    printed = stream.getvalue()
    assert result["table"] in table and result["table"] in printed
    assert "baseline" in printed and "trimmed" in printed and "paired difference" in printed
    for r in rows:
        assert 0.0 <= float(r["test_error"]) <= 1.0
    # the schedule: no trimming in the baseline; the paper's 1.0 -> 0.2 in the trimmed arm
    by = {(r["arm"], r["seed"], r["epoch"]): r for r in rows}
    for seed in "01":
        assert float(by["baseline", seed, "1"]["keep_ratio"]) == 1.0
        assert float(by["trimmed", seed, "0"]["keep_ratio"]) == 1.0
        assert float(by["trimmed", seed, "1"]["keep_ratio"]) == pytest.approx(0.2)
        assert float(by["trimmed", seed, "1"]["kept_fraction"]) == pytest.approx(0.2)
        # paired arms: same initial weights and mini-batches, so with r = 1 at epoch 0 the trimmed
        # arm reproduces the baseline exactly; at r = 0.2 it no longer does
        first = [by[arm, seed, "0"] for arm in ("baseline", "trimmed")]
        assert [first[0][f] for f in RESULT_FIELDS[5:]] == [first[1][f] for f in RESULT_FIELDS[5:]]
        assert by["baseline", seed, "1"]["train_loss"] != by["trimmed", seed, "1"]["train_loss"]
    # the summary's paired difference is the per-seed difference of the final test errors
    final = {(r["arm"], r["seed"]): 100 * float(r["test_error"]) for r in rows if r["epoch"] == "1"}
    diffs = [final["trimmed", s] - final["baseline", s] for s in "01"]
    assert result["summary"]["diff_final"][0] == pytest.approx(sum(diffs) / 2, abs=1e-3)
    assert f"0: {diffs[0]:+.2f}, 1: {diffs[1]:+.2f}" in printed


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
    cfg = _tiny(tmp_path, dataset="digits", model="mlp", schedule=name, epochs=epochs, train_size=200)
    schedule = make_schedule(cfg, steps_per_epoch=2)
    assert 0.0 < schedule(0) <= 1.0
    rows = train_run(load_data("digits", 200), cfg, "trimmed", seed=0)
    ratios = [r["keep_ratio"] for r in rows]
    if name == "osgd":  # halved per threshold crossed by the previous epochs' training accuracy
        crossed = 0
        for row, ratio in zip(rows, ratios, strict=True):
            assert ratio == 0.5**crossed
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
