"""Edge cases found by audits of the Triton kernels (issues 11 and 13), held against the
reference, the native op and ``F.cross_entropy`` (float64 where it matters): narrow integer
targets, out-of-range targets, signed zeros in the ranking key, small losses at large logits,
round-to-nearest-even outputs, double backward and the device guard."""

from __future__ import annotations

import pytest
import torch

from .helpers import BACKENDS, CPU_BACKENDS, run

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="Triton's interpreter is not runnable here")


@pytest.fixture
def grid_select(monkeypatch):
    """Force the multi-program select onto small problems."""
    from fused_trim.triton import function

    monkeypatch.setattr(function, "SINGLE_PROGRAM_MAX_ROWS", 0)
    monkeypatch.setattr(function, "GRID_BLOCK", 64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("ignore_index", [-100, 11])
def test_narrow_integer_targets_match_int64(backend, dtype, ignore_index):
    """Padding lanes of the select are never valid samples: a uint8 target once turned
    ``other=-100`` into 156 and counted 64 rows instead of 20 (k = 64, loss ~8e-32)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(20, 12, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 12, (20,), generator=gen)
    for reduction in ("mean", "none"):
        ref = run(backend, x, t, 0.5, reduction=reduction, ignore_index=ignore_index)
        out, info, grad = run(backend, x, t.to(dtype), 0.5, reduction=reduction, ignore_index=ignore_index)
        n = int((t != ignore_index).sum())
        assert int(info.k) == int(ref[1].k) == round(0.5 * n)
        assert torch.equal(info.kept, ref[1].kept)
        torch.testing.assert_close(out, ref[0], rtol=0, atol=0)
        torch.testing.assert_close(grad, ref[2], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_integer_targets_grid_select(grid_select, dtype):
    """The same through the multi-program select (blocks of 64 rows: 200 rows leave 56 padding lanes)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(200, 7, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 7, (200,), generator=gen)
    ref_out, ref_info, ref_grad = run("reference", x, t, 0.3)
    out, info, grad = run("triton", x, t.to(dtype), 0.3)
    assert int(info.k) == int(ref_info.k) == 60
    assert torch.equal(info.kept, ref_info.kept)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_signed_zeros_are_one_key(dtype, keep):
    """A negative class weight makes a loss of -0.0 beside +0.0: one value, so the tie goes to the
    lower index (issue 11: x = [[100, 0], [0, 100]], t = [0, 1], weight = [-1, 1])."""
    x = torch.tensor([[100.0, 0.0], [0.0, 100.0]], dtype=dtype)
    t = torch.tensor([0, 1])
    weight = torch.tensor([-1.0, 1.0], dtype=dtype)
    for backend in CPU_BACKENDS:
        out, info, _ = run(backend, x, t, 0.5, keep=keep, weight=weight, reduction="sum")
        assert info.kept.tolist() == [True, False], backend
        assert int(info.k) == 1
    losses = run("triton", x, t, 1.0, weight=weight, reduction="none")[0]
    assert losses[0].item() == 0.0 and losses[1].item() == 0.0


@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_signed_zeros_grid_select(grid_select, keep):
    """Signed zeros interleaved over several blocks: the grid select keeps the lowest indices."""
    x = torch.tensor([[100.0, 0.0], [0.0, 100.0]], dtype=torch.float64).repeat(100, 1)
    t = torch.tensor([0, 1]).repeat(100)
    weight = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    _, ref_info, _ = run("reference", x, t, 0.3, keep=keep, weight=weight, reduction="sum")
    _, info, _ = run("triton", x, t, 0.3, keep=keep, weight=weight, reduction="sum")
    assert torch.equal(info.kept, ref_info.kept)
    assert info.kept.nonzero().squeeze(1).tolist() == list(range(60))
