"""The multi-program select used above SINGLE_PROGRAM_MAX_ROWS, forced onto small problems so that
the interpreter can run it: it must agree exactly with the reference, ties across blocks included."""

from __future__ import annotations

import pytest
import torch

from .helpers import BACKENDS, run

pytestmark = pytest.mark.skipif(not any(b.startswith("triton") for b in BACKENDS), reason="Triton is not runnable here")
TRITON = next((b for b in BACKENDS if b.startswith("triton")), "triton")


def _tied_batch(rows: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(5, 7, generator=gen, dtype=torch.float64).to(dtype)
    which = torch.randint(0, 5, (rows,), generator=gen)
    x, t = patterns[which].clone(), which.clone()
    x[3, 2] = float("nan")  # one NaN loss: ranks above everything
    t[torch.rand(rows, generator=gen) < 0.15] = -100
    return x, t


# Every keep direction with every ratio; the dtype and the reduction rotate over those pairs, so each
# dtype meets both directions and every ratio, and each reduction both directions.
GRID_RUNS = [
    (torch.float32 if (j + k) % 2 else torch.float64, keep, ratio, ("mean", "sum", "none")[(j + k) % 3])
    for j, keep in enumerate(["hardest", "easiest"])
    for k, ratio in enumerate([0.05, 0.5, 0.97, 1.0])
]


@pytest.mark.parametrize("dtype, keep, ratio, reduction", GRID_RUNS, ids=lambda v: str(v).replace("torch.", ""))
def test_grid_select_matches_reference(grid_select, dtype, keep, ratio, reduction):
    x, t = _tied_batch(301, dtype, seed=int(ratio * 100))
    out, info, grad = run(TRITON, x, t, ratio, keep=keep, reduction=reduction)
    ref_out, ref_info, ref_grad = run("reference", x, t, ratio, keep=keep, reduction=reduction)
    assert torch.equal(info.kept, ref_info.kept)
    assert int(info.k) == int(ref_info.k)
    tol = dict(rtol=1e-5, atol=1e-6, equal_nan=True) if dtype == torch.float32 else dict(equal_nan=True)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)
    torch.testing.assert_close(info.threshold, ref_info.threshold, **tol)


def test_grid_select_tensor_ratio_count_and_all_ignored(grid_select):
    x, t = _tied_batch(200, torch.float64, seed=3)
    for ratio in (torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.3)):
        out, info, _ = run(TRITON, x, t, ratio)
        ref_out, ref_info, _ = run("reference", x, t, ratio)
        assert torch.equal(info.kept, ref_info.kept)
        torch.testing.assert_close(out, ref_out, equal_nan=True)
    from fused_trim._common import Reduction, TrimOptions
    from fused_trim.triton import trimmed_cross_entropy_2d

    _, _, kept, k, _, _ = trimmed_cross_entropy_2d(x, t, TrimOptions(torch.tensor(17), reduction=Reduction.SUM))
    assert int(k) == 17 and int(kept.sum()) == 17
    out, info, grad = run(TRITON, x, torch.full_like(t, -100), 0.5)
    assert torch.isnan(out) and int(info.k) == 0 and not info.kept.any() and torch.all(grad == 0)
