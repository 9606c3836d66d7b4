"""``TrimmedCrossEntropyLoss`` against the functional API and ``nn.CrossEntropyLoss``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fused_trim import LinearSchedule, LinearStepSchedule, TrimmedCrossEntropyLoss, trimmed_cross_entropy


def _batch(n=32, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_module_equals_functional(reduction, keep):
    x, y = _batch()
    y[3] = -1
    weight = torch.rand(7, dtype=torch.float64) + 0.5
    kwargs = dict(keep=keep, weight=weight, ignore_index=-1, label_smoothing=0.1, reduction=reduction)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    out1 = TrimmedCrossEntropyLoss(0.3, **kwargs)(x1, y)
    out2 = trimmed_cross_entropy(x2, y, 0.3, **kwargs)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    out1.sum().backward()
    out2.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    assert int((x1.grad != 0).any(1).sum()) == round(0.3 * 31)


def test_ratio_one_is_cross_entropy_loss():
    x, y = _batch()
    weight = torch.rand(7, dtype=torch.float64) + 0.5
    ours = TrimmedCrossEntropyLoss(1.0, weight=weight, label_smoothing=0.2)(x, y)
    theirs = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.2)(x, y)
    torch.testing.assert_close(ours, theirs)


def test_schedule_follows_set_epoch_and_info_is_the_last_batch():
    x, y = _batch(n=50)
    crit = TrimmedCrossEntropyLoss(LinearSchedule(epochs=5))
    ks = []
    for epoch in range(5):
        crit.set_epoch(epoch)
        for _ in range(3):
            loss = crit(x, y)
            crit.step()
            ks.append(int(crit.info.k))
        expected_r = 1.0 + (0.2 - 1.0) * epoch / 4
        assert crit.last_keep_ratio == pytest.approx(expected_r)
        ref, info = trimmed_cross_entropy(x, y, expected_r, return_info=True)
        torch.testing.assert_close(loss, ref)
        assert torch.equal(crit.info.kept, info.kept)
    assert ks == [50] * 3 + [40] * 3 + [30] * 3 + [20] * 3 + [10] * 3


def test_per_step_schedule_uses_step():
    x, y = _batch(n=100)
    crit = TrimmedCrossEntropyLoss(LinearStepSchedule(epochs=1, steps_per_epoch=5, end=0.2))
    crit.set_epoch(0)
    ks = []
    for _ in range(5):
        crit(x, y)
        ks.append(int(crit.info.k))
        crit.step()
    assert ks == [100, 80, 60, 40, 20]
    crit.set_epoch(0)  # a new epoch restarts the in-epoch step count
    assert crit.keep_ratio == 1.0


def test_batch_of_one_sample_and_one_epoch():
    crit = TrimmedCrossEntropyLoss(LinearSchedule(epochs=1))
    x = torch.randn(1, 4, requires_grad=True)
    y = torch.tensor([2])
    loss = crit(x, y)
    loss.backward()
    assert int(crit.info.k) == 1
    torch.testing.assert_close(loss, nn.functional.cross_entropy(x, y))
    crit2 = TrimmedCrossEntropyLoss(LinearSchedule(epochs=3))
    crit2.set_epoch(2)  # r = 0.2 of one sample still keeps it
    torch.testing.assert_close(crit2(x, y), nn.functional.cross_entropy(x, y))
    assert int(crit2.info.k) == 1


def test_plain_callable_schedule_and_validation():
    x, y = _batch(n=10)
    crit = TrimmedCrossEntropyLoss(lambda epoch, step: 0.5)
    crit(x, y)
    assert int(crit.info.k) == 5
    with pytest.raises(ValueError, match=r"keep ratio of schedule .* must be in \(0, 1\], got 1.5"):
        TrimmedCrossEntropyLoss(lambda epoch, step: 1.5)  # read at construction already
    turns_bad = TrimmedCrossEntropyLoss(lambda epoch, step: 0.5 if epoch == 0 else float("nan"))
    turns_bad(x, y)
    with pytest.raises(ValueError, match=r"keep ratio of schedule .* must be in \(0, 1\], got nan"):
        turns_bad.set_epoch(1)
    with pytest.raises(ValueError):
        TrimmedCrossEntropyLoss(0.0)
    with pytest.raises(ValueError):
        TrimmedCrossEntropyLoss(0.5, keep="middle")
    with pytest.raises(ValueError):
        TrimmedCrossEntropyLoss(0.5, reduction="avg")
    with pytest.raises(ValueError):
        crit.set_epoch(-1)


def test_weight_is_a_buffer_and_repr():
    w = torch.ones(3)
    crit = TrimmedCrossEntropyLoss(LinearSchedule(4), weight=w)
    assert "weight" in dict(crit.named_buffers())
    assert "LinearSchedule(epochs=4, start=1.0, end=0.2)" in repr(crit)
    assert "keep='hardest'" in repr(crit)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(backend="cuda"), ValueError, r"backend must be one of .* got 'cuda'"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\], got 1.5"),
        (dict(label_smoothing=float("nan")), ValueError, r"label_smoothing .* got nan"),
        (dict(label_smoothing="0.1"), TypeError, r"label_smoothing must be a float .* got '0.1'"),
        (dict(keep="middle"), ValueError, r"keep must be one of 'hardest', 'easiest', got 'middle'"),
        (dict(reduction="avg"), ValueError, r"reduction must be one of .* got 'avg'"),
        (dict(ignore_index=1.0), TypeError, r"ignore_index must be an int, got 1.0"),
        (dict(ignore_index=True), TypeError, r"ignore_index must be an int, got True"),
        (dict(weight=torch.ones(3, 1)), ValueError, r"weight must be a 1-D tensor, got \(3, 1\)"),
        (dict(weight=[1.0, 2.0]), ValueError, r"weight must be a 1-D tensor, got list"),
        (dict(weight=torch.ones(3, dtype=torch.long)), TypeError, r"weight must be floating point, .* torch.int64"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, exc, match):
    """Like the schedule, the module's options are checked when it is built, not at the first
    forward, with the functional API's own checks (so the same message)."""
    with pytest.raises(exc, match=match) as at_construction:
        TrimmedCrossEntropyLoss(0.5, **kwargs)
    if "weight" in kwargs:
        return  # (the functional API also names the length C it expects)
    x, y = _batch(n=6, c=3)
    with pytest.raises(exc) as at_call:
        trimmed_cross_entropy(x, y, 0.5, **kwargs)
    assert str(at_construction.value) == str(at_call.value)


def test_weight_length_is_checked_at_the_forward():
    crit = TrimmedCrossEntropyLoss(0.5, weight=torch.ones(4, dtype=torch.float64))
    x, y = _batch(n=6, c=3)
    with pytest.raises(ValueError, match=r"weight must be a 1-D tensor of length C = 3, got \(4,\)"):
        crit(x, y)


def test_last_keep_ratio_is_the_last_forwards():
    x, y = _batch(n=20)
    crit = TrimmedCrossEntropyLoss(LinearSchedule(epochs=3))
    crit.set_epoch(1)
    loss = crit(x, y)
    assert crit.last_keep_ratio == 0.6 and int(crit.info.k) == 12
    torch.testing.assert_close(loss, trimmed_cross_entropy(x, y, 0.6), rtol=0, atol=0)
    crit.set_epoch(2)
    assert crit.last_keep_ratio == 0.6  # the last forward's ratio, not the next one's
