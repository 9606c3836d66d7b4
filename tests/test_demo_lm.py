"""The LM task of the demo (``python -m fused_trim demo --task lm``) on a small fake standard library:
the module split, reproducibility, every arm, the noise injection."""

from __future__ import annotations

import argparse
import io
import math
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("scipy")
pytest.importorskip("matplotlib")

from fused_trim.__main__ import main  # noqa: E402
from fused_trim.demo import run_demo  # noqa: E402
from fused_trim.demo.lm import LMConfig, add_arguments, run_lm_demo, train_lm_run, train_reference  # noqa: E402
from fused_trim.demo.lm_data import corrupt_sequences, load_lm_data, split_of, stdlib_modules  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

WORDS = "def class return import self value index items yield lambda while for if else None True".split()


def _module_text(name: str, lines: int = 40) -> str:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    body = [f"# module {name}: marker_{name.replace('/', '_').replace('.', '_')}"]
    for _ in range(lines):
        picks = torch.randint(len(WORDS), (6,), generator=g).tolist()
        body.append("    " + " ".join(WORDS[i] for i in picks) + "()")
    return "\n".join(body) + "\n"


@pytest.fixture(scope="module")
def fake_stdlib(tmp_path_factory):
    """A standard-library-like tree: modules in packages, plus what must be left out (tests,
    installed packages, the platform's config folder, non-Python files)."""
    root = tmp_path_factory.mktemp("stdlib")
    names = [f"mod{i}.py" for i in range(24)] + [f"pkg{i % 3}/sub{i}.py" for i in range(12)]
    excluded = [
        "test/test_x.py",
        "pkg0/tests/test_y.py",
        "idlelib/idle_test/z.py",
        "site-packages/foo.py",
        "config-3.11-x86_64-linux-gnu/python-config.py",
    ]
    for name in names + excluded:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_module_text(name), encoding="utf-8")
    (root / "README.txt").write_text("not a module", encoding="utf-8")
    return root


def _cfg(root, tmp_path, **kwargs) -> LMConfig:
    settings = dict(
        seeds=1,
        steps=4,
        batch_size=4,
        seq_len=16,
        vocab_size=300,
        d_model=16,
        layers=1,
        heads=2,
        val_sequences=8,
        reference_steps=2,
        eval_every=2,
        stdlib=root,
        out=tmp_path,
        progress=False,
    )
    settings.update(kwargs)
    return LMConfig(**settings)


def test_stdlib_modules_leave_out_tests_and_packages(fake_stdlib):
    modules = stdlib_modules(fake_stdlib)
    assert len(modules) == 36
    assert not any(
        m.startswith(("test/", "site-packages/", "config-")) or "/tests/" in m or "idle_test" in m for m in modules
    )


def test_split_by_module_never_trains_on_validation_text(fake_stdlib):
    data = load_lm_data(300, 16, fake_stdlib)
    train, validation, reference = (set(data.modules[k]) for k in ("train", "validation", "reference"))
    assert train and validation and reference, "the fake tree must exercise every split"
    assert not train & validation
    assert reference <= train
    assert train | validation == set(stdlib_modules(fake_stdlib))
    assert all(split_of(m) == "validation" for m in validation)
    # The tokenised streams hold exactly their split's modules (up to the cut last sequence).
    train_text = data.tokenizer.decode(data.train.flatten().tolist())
    val_text = data.tokenizer.decode(data.validation.flatten().tolist())
    for name in validation:
        marker = f"marker_{name.replace('/', '_').replace('.', '_')}"
        assert marker not in train_text
    for name in list(train)[:-1]:
        assert f"marker_{name.replace('/', '_').replace('.', '_')}" not in val_text


def test_real_stdlib_split_is_disjoint_and_about_a_tenth():
    modules = stdlib_modules()
    assert len(modules) > 100 and "os.py" in modules and not any(m.startswith("test/") for m in modules)
    validation = [m for m in modules if split_of(m) == "validation"]
    assert 0.05 < len(validation) / len(modules) < 0.15
    assert split_of("os.py") == split_of("os.py")


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.55])
def test_noise_corrupts_the_asked_fraction_of_sequences(fraction):
    g = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, 4096, (203, 17), generator=g)
    noisy_seqs, noisy = corrupt_sequences(sequences, fraction, seed=3)
    assert int(noisy.sum()) == round(fraction * 203)
    assert torch.equal(noisy_seqs[~noisy], sequences[~noisy])
    # corrupted rows hold the same tokens in another order
    assert torch.equal(noisy_seqs[noisy].sort(1).values, sequences[noisy].sort(1).values)
    assert bool((noisy_seqs[noisy] != sequences[noisy]).any(1).all())
    again, mask = corrupt_sequences(sequences, fraction, seed=3)
    assert torch.equal(again, noisy_seqs) and torch.equal(mask, noisy)
    if fraction > 0:
        assert not torch.equal(corrupt_sequences(sequences, fraction, seed=4)[1], noisy)


@given(count=st.integers(1, 300), fraction=st.floats(0.0, 0.99))
def test_noise_count_is_round_fraction(count, fraction):
    _, noisy = corrupt_sequences(torch.arange(count * 5).view(count, 5), fraction, seed=0)
    assert int(noisy.sum()) == round(fraction * count)


def test_noise_rejects_bad_fraction():
    with pytest.raises(ValueError, match="--noise must be in"):
        corrupt_sequences(torch.zeros(4, 4, dtype=torch.long), 1.0, seed=0)


@pytest.mark.parametrize("arm", ["baseline", "token-hardest", "token-easiest", "rho1"])
@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_each_arm_runs_and_keeps_what_it_should(fake_stdlib, tmp_path, arm, noise):
    cfg = _cfg(fake_stdlib, tmp_path, compare=(arm,) if arm != "baseline" else (), noise=noise)
    data = load_lm_data(cfg.vocab_size, cfg.seq_len, fake_stdlib)
    reference = train_reference(data, cfg, 0) if arm == "rho1" else None
    rows = train_lm_run(data, cfg, arm, 0, reference)
    assert [r["step"] for r in rows] == [2, 4]
    assert all(math.isfinite(r["val_loss"]) and r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in rows)
    tokens = cfg.batch_size * cfg.seq_len
    expected_last = {"baseline": 1.0, "token-hardest": 0.2, "token-easiest": 1 - noise if noise else 0.8, "rho1": 0.6}[
        arm
    ]
    # the mean over steps 3 and 4 of the kept fraction: k = round(ratio * tokens) per step
    schedule = cfg.schedule(arm)
    kept = [max(1, math.floor(schedule(0, s) * tokens + 0.5)) / tokens for s in (2, 3)]
    assert schedule(0, cfg.steps - 1) == pytest.approx(expected_last)
    assert rows[-1]["kept_fraction"] == pytest.approx(sum(kept) / 2)
    if noise:
        assert 0 < rows[-1]["noisy_in_batch"] < 1


def test_rho1_needs_its_reference(fake_stdlib, tmp_path):
    cfg = _cfg(fake_stdlib, tmp_path, compare=("rho1",))
    with pytest.raises(ValueError, match="reference"):
        train_lm_run(load_lm_data(300, 16, fake_stdlib), cfg, "rho1", 0)


@pytest.mark.parametrize("arm", ["sequence-hardest", "sequence-easiest"])
def test_sequence_arms_keep_whole_sequences(fake_stdlib, tmp_path, arm, monkeypatch):
    """The sequence arms (mini-batch trimming per sequence, loss truncation) keep every token of a
    kept sequence and none of the others."""
    from fused_trim.demo import lm

    seen = []
    original = lm._head_losses

    def spy(model, batch, *args, **kwargs):
        out = original(model, batch, *args, **kwargs)
        if kwargs.get("return_info"):
            seen.append((kwargs["group_ids"], out[1].kept, kwargs["keep"]))
        return out

    monkeypatch.setattr(lm, "_head_losses", spy)
    cfg = _cfg(fake_stdlib, tmp_path, keep_end=0.5, compare=(arm,))
    rows = train_lm_run(load_lm_data(cfg.vocab_size, cfg.seq_len, fake_stdlib), cfg, arm, 0)
    assert rows and seen
    for ids, kept, keep in seen:
        per_row = kept.reshape(-1, cfg.seq_len)
        assert ids is not None and torch.equal(per_row.any(1), per_row.all(1))
        assert keep == ("easiest" if arm == "sequence-easiest" else "hardest")
    assert not seen[-1][1].all()  # by the last step the schedule keeps part of the batch


def test_arms_are_paired(fake_stdlib, tmp_path):
    """Same seed: the same initial weights and batches, so a trimmed arm that keeps everything is the
    baseline to the last bit, and another seed is not."""
    cfg = _cfg(fake_stdlib, tmp_path, keep_end=1.0, compare=("token-hardest",))
    data = load_lm_data(cfg.vocab_size, cfg.seq_len, fake_stdlib)
    base = train_lm_run(data, cfg, "baseline", 5)
    same = train_lm_run(data, cfg, "token-hardest", 5)
    other = train_lm_run(data, cfg, "baseline", 6)
    assert [r["val_loss"] for r in base] == [r["val_loss"] for r in same]
    assert [r["val_loss"] for r in base] != [r["val_loss"] for r in other]


def test_same_seed_same_numbers(fake_stdlib, tmp_path):
    cfg = dict(seeds=2, compare=("token-hardest", "rho1"), noise=0.3)
    first = run_lm_demo(_cfg(fake_stdlib, tmp_path / "a", **cfg), stream=io.StringIO())
    second = run_demo(_cfg(fake_stdlib, tmp_path / "b", **cfg), stream=io.StringIO())  # the demo's entry point

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]

    assert strip(first["rows"]) == strip(second["rows"])
    assert first["table"] == second["table"]
    for name in ("metrics.csv", "val_loss.png", "summary.txt"):
        assert (tmp_path / "a" / name).is_file()
    seed0 = [r["val_loss"] for r in first["rows"] if r["seed"] == 0 and r["arm"] == "baseline"]
    seed1 = [r["val_loss"] for r in first["rows"] if r["seed"] == 1 and r["arm"] == "baseline"]
    assert seed0 != seed1
    assert "nats/token" in first["table"] and "rho1 - baseline" in first["table"]


def test_command_line_runs_the_lm_task(fake_stdlib, tmp_path, capsys):
    args = ["demo", "--task", "lm", "--stdlib", str(fake_stdlib), "--seeds", "2", "--steps", "2", "--batch-size", "2"]
    args += ["--seq-len", "16", "--vocab-size", "300", "--d-model", "16", "--layers", "1", "--heads", "2"]
    args += [
        "--val-sequences",
        "4",
        "--eval-every",
        "2",
        "--compare",
        "token-hardest",
        "--noise",
        "0.25",
        "--out",
        str(tmp_path),
    ]
    assert main([*args, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "token-hardest - baseline" in out and "noise 0.25" in out and "CI " in out and "nats/token" in out
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 1 + 2 * 2  # header, 2 arms x 2 seeds x 1 eval
    with pytest.raises(SystemExit):
        main(["demo", "--task", "lm", "--compare", "sequence-middle", "--out", str(tmp_path / "x")])
    assert "arms are a comma-separated list" in capsys.readouterr().err


def test_every_lm_flag_is_documented():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {s for action in parser._actions for s in action.option_strings if s.startswith("--") and s != "--help"}
    text = (ROOT / "docs/demo.md").read_text(encoding="utf-8")
    assert flags and not {f for f in flags if f"`{f}`" not in text}
