"""The native op's few-class paths. On the CPU (C up to its threshold of 32): rows transposed into
vector lanes in the forward, the gradient formed in the rows' flat layout (fp32, C <= 16) or
through the tile, targets' logits gathered per vector of rows. On CUDA (where a GPU is present):
groups of 4 lanes per row up to C = 16, 8 up to 32, a warp above. Held against the float64
reference and F.cross_entropy, around every size where the code changes path: C = 16 / 17 (one
vector of classes; 4 -> 8 lanes), 32 / 33 (the CPU threshold; 8 lanes -> a warp), row counts that
leave a partial vector of rows, strided rows, and thread counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fused_trim import native, trimmed_cross_entropy

from .helpers import BACKENDS, assert_close, f_cross_entropy, run, split

pytestmark = pytest.mark.skipif(
    not native.is_available(torch.device("cpu")),
    reason=f"native op unavailable: {native.unavailable_reason(torch.device('cpu'))}",
)

SMALL_C = [1, 2, 9, 10, 11, 16, 17, 31, 32, 33]
NATIVE = [b for b in BACKENDS if split(b)[0] == "native"]  # the CPU op, and its CUDA kernels on a GPU
REDUCTIONS = ["mean", "sum", "none"]


def _batch(m: int, c: int, dtype: torch.dtype, seed: int, special: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """m rows of c classes: ties (repeated rows), ignored rows and, with ``special``, NaN and +-inf."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, c, generator=gen, dtype=torch.float64).mul(3)
    t = torch.randint(0, c, (m,), generator=gen)
    x[5] = x[2]  # a tie: same row, same target
    t[5] = t[2]
    x[m - 1] = x[2]
    t[m - 1] = t[2]
    t[7] = -100
    t[16] = -100
    x[16] = float("nan")  # ignored, and NaN: must not leak into anything
    if special:
        x[3, 0] = float("nan")
        x[9] = float("-inf")
        x[9, c - 1] = 0.0  # -inf classes around one finite one
        x[11, c // 2] = float("inf")
        x[20] = float("-inf")  # every class -inf
    return x.to(dtype), t


def _check(x, t, dtype, keep_ratio, backend="native", **kw):
    out_n, info_n, g_n = run(backend, x, t, keep_ratio, **kw)
    kw_r = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out_r, info_r, g_r = run("reference", x.double(), t, keep_ratio, **kw_r)
    assert torch.equal(info_n.kept, info_r.kept)
    assert_close(info_n.losses, info_r.losses, dtype)
    assert_close(out_n, out_r, dtype)
    assert_close(g_n, g_r, dtype)
    # Rows outside the kept set (ignored, trimmed) have a gradient of exactly +0.
    rows = g_n.movedim(1, -1)[~info_n.kept]  # (samples outside K, C), rows or pixels
    assert torch.equal(rows, torch.zeros_like(rows))
    assert not torch.signbit(rows).any()


@pytest.mark.parametrize("c", SMALL_C)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", NATIVE)
def test_matches_reference(backend, c, dtype, keep, reduction):
    x, t = _batch(53, c, dtype, seed=c, special=False)
    _check(x, t, dtype, 0.6, backend, keep=keep, reduction=reduction)


@pytest.mark.parametrize("c", SMALL_C)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", NATIVE)
def test_weights_and_label_smoothing(backend, c, dtype):
    x, t = _batch(70, c, dtype, seed=100 + c, special=False)
    w = torch.rand(c, generator=torch.Generator().manual_seed(c), dtype=torch.float64).add(0.2).to(dtype)
    _check(x, t, dtype, 0.5, backend, weight=w, label_smoothing=0.15)
    _check(x, t, dtype, 0.5, backend, keep="easiest", weight=w, reduction="none")


@pytest.mark.parametrize("c", SMALL_C)
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
@pytest.mark.parametrize("backend", NATIVE)
def test_nan_and_inf_rows(backend, c, keep):
    x, t = _batch(48, c, torch.float64, seed=200 + c, special=True)
    _check(x, t, torch.float64, 0.5, backend, keep=keep)
    _check(x.float(), t, torch.float32, 0.5, backend, keep=keep, reduction="none")


@pytest.mark.parametrize("c", SMALL_C)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", NATIVE)
def test_keep_all_is_cross_entropy(backend, c, reduction):
    x, t = _batch(37, c, torch.float64, seed=300 + c, special=False)
    x[16] = 0.0  # F.cross_entropy leaks an ignored row's NaN into its gradient
    w = torch.rand(c, generator=torch.Generator().manual_seed(7), dtype=torch.float64).add(0.5)
    for kw in ({}, {"weight": w, "label_smoothing": 0.1}):
        out_n, _, g_n = run(backend, x, t, 1.0, reduction=reduction, **kw)
        out_f, g_f = f_cross_entropy(x, t, reduction, **kw)
        assert_close(out_n, out_f)
        assert_close(g_n, g_f)


@pytest.mark.parametrize("c", [1, 10, 16, 17, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("backend", NATIVE)
def test_identical_rows_identical_results(backend, c, dtype):
    # Every row the same: each sits in a different lane (and the last vector is partial), yet all
    # get bitwise one loss, and the kept ones one gradient row.
    row = torch.randn(c, generator=torch.Generator().manual_seed(c), dtype=torch.float64).to(dtype)
    x = row.expand(45, c).contiguous()
    t = torch.full((45,), c // 2)
    _, info, g = run(backend, x, t, 0.5)
    assert torch.equal(info.losses, info.losses[:1].expand_as(info.losses))
    kept = g[info.kept]
    assert kept.shape[0] == 23
    assert torch.equal(kept, kept[:1].expand_as(kept))
    assert info.kept[:23].all()  # ties go to the lower index


@pytest.mark.parametrize(
    ("c", "m"),
    [(2, 4099), (10, 4099), (17, 4099), (10, 40009)],  # 40009: the histogram select as well
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bitwise_repeatable_across_thread_counts(c, m, dtype):
    # Enough rows for several chunks of the thread pool.
    x, t = _batch(m, c, dtype, seed=400 + c, special=True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append(run("native", x, t, 0.5, reduction="sum"))
    finally:
        torch.set_num_threads(before)
    for out, info, g in results[1:]:
        assert torch.equal(out, results[0][0]) or (out.isnan().all() and results[0][0].isnan().all())
        assert torch.equal(info.losses.nan_to_num(), results[0][1].losses.nan_to_num())
        assert torch.equal(info.kept, results[0][1].kept)
        assert torch.equal(g.nan_to_num(), results[0][2].nan_to_num())
        assert torch.equal(g.isnan(), results[0][2].isnan())


@pytest.mark.parametrize("c", SMALL_C)
@pytest.mark.parametrize("backend", NATIVE)
def test_strided_rows(backend, c):
    # Rows further apart than C (a column slice of a wider tensor): the target's logit and the
    # gradient's inputs are gathered with the row stride.
    gen = torch.Generator().manual_seed(500 + c)
    wide = torch.randn(37, c + 5, generator=gen, dtype=torch.float64).mul(3)
    wide[6] = wide[1]  # a tie
    t = torch.randint(0, c, (37,), generator=gen)
    t[4] = -100
    t[6] = t[1]
    for dtype in (torch.float64, torch.float32):
        x = wide.to(dtype)[:, 2 : 2 + c]
        assert x.stride(0) == c + 5
        _check(x, t, dtype, 0.5, backend, reduction="none")
        _check(x, t, dtype, 0.5, backend, keep="easiest", label_smoothing=0.1)


@pytest.mark.parametrize("shape", [(53, 10), (2, 19, 40)])
def test_op_rejects_a_target_outside_the_classes(shape):
    # Below the public API's check: the op's own forward (vectors of rows or of pixels) raises.
    x = torch.randn(shape)
    m = shape[0] if len(shape) == 2 else shape[0] * shape[2]
    for bad_row in (0, m - 1):
        t = torch.randint(0, shape[1], (m,))
        t[bad_row] = shape[1]
        with pytest.raises(ValueError, match=f"target holds {shape[1]}, outside"):
            torch.ops.fused_trim.trimmed_ce_fwd.default(
                x, t, None, 0.5, None, False, -100, 0.0, 1, None, None, 0, 0.0, 0.0
            )


@pytest.mark.parametrize("c", [1, 10, 19])
def test_spatial_layout(c):
    gen = torch.Generator().manual_seed(c)
    x = torch.randn(2, c, 9, 13, generator=gen, dtype=torch.float64).mul(3)
    t = torch.randint(0, c, (2, 9, 13), generator=gen)
    t[0, 0, :5] = -100
    x[1, :, 2, 2] = x[1, :, 2, 3]  # a tie
    t[1, 2, 2] = t[1, 2, 3]
    x[0, 0, 4, 4] = float("nan")
    for keep in ("hardest", "easiest"):
        _check(x, t, torch.float64, 0.4, keep=keep, label_smoothing=0.05)
        _check(x.float(), t, torch.float32, 0.4, keep=keep, reduction="none")


@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_spatial_streamed_gradient(keep):
    # A map whose gradient (4 MiB) goes out with non-temporal stores: the kept pixels' gradient is
    # F.cross_entropy's (float64), every other pixel's exactly +0.
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 256, 256, generator=gen).mul(3)
    t = torch.randint(0, 8, (2, 256, 256), generator=gen)
    t[0, :3] = -100
    xg = x.clone().requires_grad_(True)
    out, info = trimmed_cross_entropy(xg, t, 0.5, keep=keep, reduction="sum", backend="native", return_info=True)
    out.backward()
    x64 = torch.where(info.kept[:, None], x.double(), 0.0).requires_grad_(True)
    per_pixel = torch.nn.functional.cross_entropy(x64, t, reduction="none")
    torch.where(info.kept, per_pixel, 0.0).sum().backward()
    assert_close(xg.grad, x64.grad, torch.float32)
    outside = xg.grad.movedim(1, -1)[~info.kept]
    assert torch.equal(outside, torch.zeros_like(outside)) and not torch.signbit(outside).any()


@pytest.mark.parametrize("shape", [(45, 10), (45, 17), (45, 32), (2, 19, 9, 31)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_options_fp32_vector_paths(shape, dtype):
    # The fp32 (and bf16) vector code of rows and pixels with every loss option at once: class
    # weights, label smoothing, a soft cap and z_loss, ignored samples and a NaN logit.
    gen = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64).mul(3)
    t = torch.randint(0, c, (shape[0], *shape[2:]), generator=gen)
    t.view(-1)[::7] = -100
    x.movedim(1, -1).reshape(-1, c)[3, 1] = float("nan")
    w = torch.rand(c, generator=gen, dtype=torch.float64).add(0.3)
    for keep, reduction in (("hardest", "mean"), ("easiest", "none")):
        kw = dict(keep=keep, reduction=reduction, weight=w.to(dtype), label_smoothing=0.1)
        _check(x.to(dtype), t, dtype, 0.5, logit_softcap=2.5, z_loss=1e-2, **kw)
        _check(x.to(dtype), t, dtype, 0.5, **kw)


@given(
    m=st.integers(1, 40),
    c=st.integers(1, 34),
    keep_ratio=st.floats(0.05, 1.0),
    easiest=st.booleans(),
    smoothing=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(m, c, keep_ratio, easiest, smoothing, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, c, generator=gen, dtype=torch.float64).mul(4)
    t = torch.randint(0, c, (m,), generator=gen)
    t[torch.rand(m, generator=gen) < 0.2] = -100
    for dtype in (torch.float64, torch.float32):
        kw = dict(keep="easiest" if easiest else "hardest", label_smoothing=smoothing, reduction="sum")
        _check(x.to(dtype), t, dtype, keep_ratio, **kw)
