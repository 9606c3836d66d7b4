"""The oracle itself: against F.cross_entropy, brute-force selection and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fused_trim import reference, trimmed_cross_entropy
from fused_trim._common import Keep, compute_k


def test_compute_k_formula():
    for n in range(0, 40):
        for r in (1e-12, 0.05, 0.1, 0.25, 0.3, 0.5, 0.7, 0.999, 1.0):
            expected = 0 if n == 0 else min(n, max(1, math.floor(r * n + 0.5)))
            assert int(compute_k(torch.tensor(n), r)) == expected
            assert int(compute_k(torch.tensor(n), torch.tensor(r, dtype=torch.float64))) == expected


def test_select_brute_force_with_ties_and_nan():
    losses = torch.tensor([1.0, float("nan"), 3.0, 1.0, float("inf"), 3.0, 0.5, 2.0, float("nan")])
    valid = torch.tensor([True, True, True, True, True, True, True, True, False])

    def kept(k, keep):
        mask, order, _ = reference.select(losses, valid, torch.tensor(k), Keep[keep.upper()])
        assert sorted(order[:k].tolist()) == mask.nonzero()[:, 0].tolist()
        return order[:k].tolist()

    assert kept(5, "hardest") == [1, 4, 2, 5, 7]  # NaN, +inf, 3 (index 2 before 5), 2
    assert kept(4, "easiest") == [6, 0, 3, 7]  # 0.5, then the tied 1.0s in index order, then 2
    assert 8 not in kept(8, "hardest")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_gradcheck(reduction, keep):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 4, -100, 0, 1, 2])
    w = torch.rand(5, dtype=torch.float64, generator=gen) + 0.5

    def fn(inp):
        return trimmed_cross_entropy(
            inp, t, 0.5, keep=keep, weight=w, label_smoothing=0.1, reduction=reduction, backend="reference"
        )

    assert torch.autograd.gradcheck(fn, (x,))


def test_mean_divides_by_kept_weights():
    x = torch.randn(6, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3, 0, 1])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    out, info = trimmed_cross_entropy(x, t, 0.5, weight=w, backend="reference", return_info=True)
    per = F.cross_entropy(x, t, weight=w, reduction="none")
    kept = info.kept
    torch.testing.assert_close(out, per[kept].sum() / w[t[kept]].sum())
