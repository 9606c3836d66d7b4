"""Keep-ratio schedules against the author's formula and their documented shapes."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fused_trim.schedules import (
    ConstantSchedule,
    CosineSchedule,
    KeepRatioSchedule,
    LinearSchedule,
    LinearStepSchedule,
    OrderedSGDSchedule,
    StepSchedule,
    WarmupSchedule,
)

ratios = st.floats(min_value=0.01, max_value=1.0)


def author(epoch: int, epochs: int, start: float = 1.0, end: float = 0.2) -> float:
    """The paper's rule, written out as the author's code has it."""
    return start + (end - start) * epoch / (epochs - 1)


def test_paper_defaults_at_given_epochs():
    s = LinearSchedule(epochs=11)
    assert s(0) == 1.0
    assert s(5) == pytest.approx(0.6)
    assert s(10) == 0.2
    assert [s(e) for e in range(11)] == pytest.approx([1.0 - 0.08 * e for e in range(11)])


@given(epochs=st.integers(2, 500), data=st.data(), start=ratios, end=ratios)
def test_linear_matches_author_formula(epochs, data, start, end):
    epoch = data.draw(st.integers(0, epochs - 1))
    s = LinearSchedule(epochs, start=start, end=end)
    assert s(epoch) == pytest.approx(author(epoch, epochs, start, end), rel=1e-12, abs=1e-15)
    assert s(epochs - 1) == end  # the last epoch is exactly `end`
    assert s(0) == start


@given(start=ratios, end=ratios, epoch=st.integers(0, 100))
def test_linear_one_epoch_is_start_without_division_by_zero(start, end, epoch):
    assert LinearSchedule(1, start=start, end=end)(epoch) == start


@given(epochs=st.integers(1, 50), extra=st.integers(1, 100), step=st.integers(0, 1000))
def test_linear_holds_end_after_last_epoch_and_ignores_step(epochs, extra, step):
    s = LinearSchedule(epochs, start=0.9, end=0.3)
    expected = 0.9 if epochs == 1 else 0.3
    assert s(epochs - 1 + extra, step) == expected
    assert s(0, step) == s(0)


@given(epochs=st.integers(1, 30), spe=st.integers(1, 30), start=ratios, end=ratios, data=st.data())
def test_linear_step_ramps_over_all_minibatches(epochs, spe, start, end, data):
    s = LinearStepSchedule(epochs, spe, start=start, end=end)
    epoch = data.draw(st.integers(0, epochs - 1))
    step = data.draw(st.integers(0, spe - 1))
    total = epochs * spe
    expected = start if total == 1 else start + (end - start) * (epoch * spe + step) / (total - 1)
    assert s(epoch, step) == pytest.approx(expected, rel=1e-12)
    assert s(0, 0) == start
    if total > 1:
        assert s(epochs - 1, spe - 1) == end
    assert min(start, end) - 1e-12 <= s(epoch, step) <= max(start, end) + 1e-12


def test_linear_step_changes_within_an_epoch():
    s = LinearStepSchedule(epochs=2, steps_per_epoch=5)
    values = [s(0, i) for i in range(5)]
    assert values == sorted(values, reverse=True) and len(set(values)) == 5


@given(warmup=st.integers(0, 10), epochs=st.integers(1, 20), data=st.data())
def test_warmup_is_one_then_the_shifted_schedule(warmup, epochs, data):
    inner = LinearSchedule(epochs, start=0.8, end=0.2)
    s = WarmupSchedule(inner, warmup_epochs=warmup)
    epoch = data.draw(st.integers(0, warmup + epochs + 3))
    expected = 1.0 if epoch < warmup else inner(epoch - warmup)
    assert s(epoch) == expected


def test_warmup_accepts_a_fixed_ratio():
    s = WarmupSchedule(0.5, warmup_epochs=2)
    assert [s(e) for e in range(4)] == [1.0, 1.0, 0.5, 0.5]


@given(epochs=st.integers(2, 200), start=ratios, end=ratios, data=st.data())
def test_cosine_formula_and_ends(epochs, start, end, data):
    s = CosineSchedule(epochs, start=start, end=end)
    epoch = data.draw(st.integers(0, epochs - 1))
    expected = end + 0.5 * (start - end) * (1 + math.cos(math.pi * epoch / (epochs - 1)))
    assert s(epoch) == pytest.approx(expected, rel=1e-12)
    assert s(0) == start and s(epochs - 1) == end
    assert s(epochs + 5) == end
    assert CosineSchedule(1, start=start, end=end)(0) == start


def test_cosine_first_epoch_is_exactly_start():
    """The plain formula gives 0.9000000000000001 at epoch 0 for these end points."""
    s = CosineSchedule(5, 0.9, 0.3)
    assert s(0) == 0.9
    assert s(4) == 0.3


@example(epochs=5, spe=1, start=0.9, end=0.3)
@example(epochs=4, spe=1, start=0.2, end=1.0)
@example(epochs=38, spe=3, start=0.2, end=1.0)
@given(epochs=st.integers(2, 300), spe=st.integers(1, 50), start=ratios, end=ratios)
def test_every_schedule_starts_and_ends_exactly(epochs, spe, start, end):
    """First and last values are the documented end points, compared with ==."""
    last = epochs - 1
    for s in (LinearSchedule(epochs, start, end), CosineSchedule(epochs, start, end)):
        assert s(0) == start and s(0, spe) == start
        assert s(last) == end and s(last, spe) == end and s(last + 7) == end
    s = LinearStepSchedule(epochs, spe, start, end)
    assert s(0, 0) == start
    assert s(last, spe - 1) == end and s(last + 1, 0) == end
    s = WarmupSchedule(CosineSchedule(epochs, start, end), warmup_epochs=3)
    assert s(0) == 1.0 and s(2) == 1.0
    assert s(3) == start and s(3 + last) == end
    s = StepSchedule([2, 5], gamma=end, start=start)
    assert s(0) == start and s(1) == start
    assert s(5) == start * end**2 and s(5 + epochs) == start * end**2
    assert ConstantSchedule(start)(0) == start and ConstantSchedule(start)(last, spe) == start
    s = OrderedSGDSchedule(start=start, thresholds=(0.5, 0.7), factor=end)
    assert s(0) == start
    s.update(1.0)
    assert s(last, spe) == start * end**2


@example(epochs=38, start=0.2, end=1.0)
@example(epochs=5, start=0.9, end=0.3)
@given(epochs=st.integers(2, 300), start=ratios, end=ratios)
def test_ranged_schedules_never_leave_their_range(epochs, start, end):
    """No rounding error takes a value past an end point (past 1.0 it would be rejected)."""
    lo, hi = min(start, end), max(start, end)
    for s in (
        LinearSchedule(epochs, start, end),
        CosineSchedule(epochs, start, end),
        LinearStepSchedule(epochs, 3, start, end),
    ):
        for epoch in range(epochs + 1):
            assert lo <= s(epoch) <= hi and lo <= s(epoch, 2) <= hi


def test_step_schedule():
    s = StepSchedule([3, 6], gamma=0.5, start=0.8)
    assert [s(e) for e in range(8)] == [0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.2, 0.2]
    with pytest.raises(ValueError, match="increasing"):
        StepSchedule([5, 3])


@given(r=ratios, epoch=st.integers(0, 10**6), step=st.integers(0, 10**6))
def test_constant(r, epoch, step):
    assert ConstantSchedule(r)(epoch, step) == r


def test_ordered_sgd_halves_at_default_thresholds():
    s = OrderedSGDSchedule()
    assert s.thresholds == (0.8, 0.9, 0.95, 0.995)
    assert s(0) == 1.0
    assert s.update(0.5) == 1.0
    assert s.update(0.8) == 0.5
    assert s.update(0.93) == 0.25
    assert s.update(0.7) == 0.25  # a crossed threshold stays crossed
    assert s.update(0.96) == 0.125
    assert s.update(1.0) == 0.0625
    assert s(42, 7) == 0.0625
    with pytest.raises(ValueError, match="fraction"):
        s.update(95.0)  # a percentage is a mistake, not silently accepted


@pytest.mark.parametrize(
    "schedule, text",
    [
        (LinearSchedule(10), "LinearSchedule(epochs=10, start=1.0, end=0.2)"),
        (
            LinearStepSchedule(3, 40, end=0.5),
            "LinearStepSchedule(epochs=3, steps_per_epoch=40, start=1.0, end=0.5)",
        ),
        (
            WarmupSchedule(ConstantSchedule(0.5), 2),
            "WarmupSchedule(schedule=ConstantSchedule(ratio=0.5), warmup_epochs=2)",
        ),
        (CosineSchedule(4, end=0.3), "CosineSchedule(epochs=4, start=1.0, end=0.3)"),
        (StepSchedule([2]), "StepSchedule(milestones=(2,), gamma=0.5, start=1.0)"),
        (
            OrderedSGDSchedule(),
            "OrderedSGDSchedule(start=1.0, thresholds=(0.8, 0.9, 0.95, 0.995), factor=0.5, crossed=0)",
        ),
    ],
)
def test_repr_says_what_it_is(schedule, text):
    assert repr(schedule) == text


@pytest.mark.parametrize(
    "make",
    [
        lambda: LinearSchedule(0),
        lambda: LinearSchedule(5, start=0.0),
        lambda: LinearSchedule(5, end=1.5),
        lambda: LinearSchedule(5, end=float("nan")),
        lambda: CosineSchedule(3, start=-0.1),
        lambda: ConstantSchedule(0.0),
        lambda: WarmupSchedule(ConstantSchedule(0.5), -1),
        lambda: OrderedSGDSchedule(thresholds=(80.0,)),
    ],
)
def test_bad_arguments_raise(make):
    with pytest.raises((ValueError, TypeError)):
        make()


def test_bad_progress_raises():
    with pytest.raises(ValueError, match="epoch"):
        LinearSchedule(5)(-1)
    with pytest.raises(ValueError, match="step"):
        LinearSchedule(5)(0, -2)


def test_schedules_are_dataclasses_and_a_subclass_can_be_one():
    """The fields are the constructor's arguments (and OrderedSGD's progress); a user's dataclass
    subclass gets the same repr; schedules compare by identity, as any callable."""
    assert [f.name for f in dataclasses.fields(OrderedSGDSchedule)] == [
        "start",
        "thresholds",
        "factor",
        "start_count",
        "crossed",
    ]
    assert [f.name for f in dataclasses.fields(StepSchedule)] == ["milestones", "gamma", "start"]

    @dataclasses.dataclass(eq=False)
    class Halving(KeepRatioSchedule):
        start: float = 0.8

        def value(self, epoch: int, step: int) -> float:
            return self.start / 2**epoch

    assert repr(Halving()).endswith(".Halving(start=0.8)") and Halving()(1) == 0.4
    assert LinearSchedule(3) != LinearSchedule(3) and len({LinearSchedule(3), LinearSchedule(3)}) == 2
