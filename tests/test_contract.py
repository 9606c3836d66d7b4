"""The contract of docs/design.md, held for every backend against F.cross_entropy and the reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from .helpers import (
    BACKENDS,
    KERNEL_BACKENDS,
    assert_close,
    call,
    f_cross_entropy,
    make_batch,
    run,
    split,
)

REDUCTIONS = ["mean", "sum", "none"]


# --- keep_ratio = 1 is F.cross_entropy -------------------------------------------------------

F_CASES = [
    # (N, C, ignore_frac, weighted, label_smoothing)
    (1, 1, 0.0, False, 0.0),
    (2, 1, 0.0, True, 0.3),
    (37, 7, 0.3, False, 0.0),
    (37, 7, 0.3, True, 0.1),
    (5, 257, 0.2, True, 0.0),
    (3, 1030, 0.0, False, 0.25),
    (4, 1030, 0.5, True, 0.05),
]


# Every backend runs every case, and the reduction rotates with (backend + case) index: each
# backend meets every reduction, and each case meets every reduction across the backends.
F_RUNS = [
    (backend, case, REDUCTIONS[(b + i) % len(REDUCTIONS)])
    for b, backend in enumerate(BACKENDS)
    for i, case in enumerate(F_CASES)
]


@pytest.mark.parametrize(
    "backend, case, reduction",
    F_RUNS,
    ids=["{}-N{}-C{}-ign{}-w{}-ls{}-{}".format(b, *c, r) for b, c, r in F_RUNS],
)
def test_ratio_one_equals_f_cross_entropy(backend, case, reduction):
    n, c, ign, weighted, ls = case
    x, t = make_batch(n, c, ignore_frac=ign, seed=n * c)
    weight = torch.rand(c, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.1
    kw = dict(label_smoothing=ls, weight=weight if weighted else None)
    out, info, grad = run(backend, x, t, 1.0, reduction=reduction, **kw)
    ref_out, ref_grad = f_cross_entropy(x, t, reduction, **kw)
    assert_close(out, ref_out)
    assert_close(grad, ref_grad)
    assert_close(info.losses, F.cross_entropy(x, t, reduction="none", **kw))
    assert torch.equal(info.kept, t != -100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ratio_one_float32_large_vocab(backend):
    x, t = make_batch(6, 5003, dtype=torch.float32, ignore_frac=0.2, seed=3)
    out, _, grad = run(backend, x, t, 1.0)
    ref_out, ref_grad = f_cross_entropy(x, t, "mean")
    assert_close(out, ref_out, torch.float32)
    assert_close(grad, ref_grad, torch.float32)


# --- trimming against the reference ----------------------------------------------------------


# Every ratio meets every reduction in both keep directions; the options alternate over that
# product, so each option set also meets every ratio, reduction and keep direction.
REFERENCE_RUNS = [
    (keep, ratio, reduction, ("plain", "weight+smoothing")[(i + j + k) % 2])
    for i, ratio in enumerate([0.2, 0.5, 0.77])
    for j, reduction in enumerate(REDUCTIONS)
    for k, keep in enumerate(["hardest", "easiest"])
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("keep, ratio, reduction, options", REFERENCE_RUNS, ids=lambda v: str(v))
def test_matches_reference(backend, keep, ratio, reduction, options):
    x, t = make_batch(41, 13, ignore_frac=0.25, seed=int(ratio * 100))
    kw = {}
    if options != "plain":
        kw = dict(weight=torch.linspace(0.2, 2.0, 13, dtype=torch.float64), label_smoothing=0.15)
    out, info, grad = run(backend, x, t, ratio, keep=keep, reduction=reduction, **kw)
    ref_out, ref_info, ref_grad = run("reference", x, t, ratio, keep=keep, reduction=reduction, **kw)
    assert torch.equal(info.kept, ref_info.kept)
    assert int(info.k) == int(ref_info.k) == int(info.kept.sum())
    assert_close(out, ref_out)
    assert_close(grad, ref_grad)
    assert_close(info.losses, ref_info.losses)
    assert_close(info.threshold, ref_info.threshold)
    # Exactly zero gradient outside the kept set; nonzero rows inside it.
    assert torch.all(grad[~info.kept] == 0)
    assert torch.all(grad[info.kept].abs().sum(1) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_kept_set_is_the_extreme_losses(backend, keep):
    """Independent of the reference: the kept losses are the k largest (smallest) valid ones."""
    x, t = make_batch(50, 9, ignore_frac=0.2, seed=7)
    out, info, _ = run(backend, x, t, 0.3, keep=keep, reduction="sum")
    losses = F.cross_entropy(x, t, reduction="none")
    valid = t != -100
    n = int(valid.sum())
    k = min(n, max(1, math.floor(0.3 * n + 0.5)))
    ordered = sorted(losses[valid].tolist(), reverse=keep == "hardest")
    assert int(info.k) == k
    assert sorted(losses[info.kept].tolist(), reverse=keep == "hardest") == pytest.approx(ordered[:k])
    assert not info.kept[~valid].any()
    assert_close(out, torch.tensor(sum(ordered[:k]), dtype=torch.float64))
    assert_close(info.threshold, torch.tensor(ordered[k - 1], dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_formula(backend):
    """k = min(n, max(1, floor(r n + 0.5))), float64, including exact halves and tiny ratios."""
    c = 3
    for n, r in itertools.product([1, 2, 3, 5, 8, 10, 33], [1e-9, 0.1, 0.125, 0.25, 0.5, 0.7, 0.9999, 1.0]):
        x, t = make_batch(n + 2, c, seed=n)
        t[:2] = -100  # two ignored rows do not count in n
        _, info = call(backend, x.to(split(backend)[1]), t, r, return_info=True)
        assert int(info.k) == min(n, max(1, math.floor(r * n + 0.5))), (n, r)
        assert int(info.kept.sum()) == int(info.k)


# --- ties, NaN, inf, extremes -----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_ties_go_to_lower_index(backend, keep):
    row = torch.randn(6, dtype=torch.float64)
    x = row.repeat(20, 1)
    t = torch.full((20,), 2)
    t[3] = -100
    _, info, grad = run(backend, x, t, 0.4, keep=keep)
    expected = torch.zeros(20, dtype=torch.bool)
    expected[[0, 1, 2, 4, 5, 6, 7, 8]] = True  # k = round(0.4 * 19) = 8, skipping ignored row 3
    assert torch.equal(info.kept, expected)
    assert torch.all(grad[~expected] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_ties_at_the_threshold(backend):
    """Two loss levels; the threshold level is split between kept and dropped by index."""
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = torch.stack([a, b, a, b, a, b, a, b])
    t = torch.zeros(8, dtype=torch.long)
    la, lb = (F.cross_entropy(v[None], t[:1]).item() for v in (a, b))
    hi = 0 if la > lb else 1  # rows of the higher loss: hi, hi+2, hi+4, hi+6
    _, info, _ = run(backend, x, t, 6 / 8)
    lo_rows = [i for i in range(8) if i % 2 != hi]
    expected = torch.zeros(8, dtype=torch.bool)
    expected[[hi, hi + 2, hi + 4, hi + 6, lo_rows[0], lo_rows[1]]] = True
    assert torch.equal(info.kept, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_nan_and_inf_logits(backend, keep):
    x, t = make_batch(12, 5, seed=11)
    x[1, 3] = float("nan")
    x[4, :] = float("nan")
    x[6, 2] = float("inf")
    x[8, 0] = float("-inf")
    x[9, :] = float("-inf")
    out, info, grad = run(backend, x, t, 0.5, keep=keep)
    ref_out, ref_info, ref_grad = run("reference", x, t, 0.5, keep=keep)
    assert torch.equal(info.kept, ref_info.kept)
    assert_close(out, ref_out)
    assert_close(grad, ref_grad)
    nan_rows = torch.isnan(F.cross_entropy(x, t, reduction="none"))
    if keep == "hardest":
        assert info.kept[nan_rows].all()  # NaN ranks above +inf: kept, and shows in the loss
        assert torch.isnan(out)
    else:
        assert not info.kept[nan_rows].any()
        assert torch.isfinite(out)
    assert torch.all(grad[~info.kept] == 0)  # exact zeros, even on NaN rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits(backend):
    x, t = make_batch(16, 11, dtype=torch.float32, seed=5)
    x = x * 5e3  # |x| up to ~1e4
    out, info, grad = run(backend, x, t, 0.5)
    ref_out, ref_info, ref_grad = run("reference", x.double(), t, 0.5)
    assert torch.isfinite(out)
    assert torch.equal(info.kept, ref_info.kept)
    assert_close(out, ref_out, torch.float32)
    assert_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(backend, reduction):
    x, _ = make_batch(5, 4, seed=2)
    t = torch.full((5,), -100)
    out, info, grad = run(backend, x, t, 0.5, reduction=reduction)
    ref = F.cross_entropy(x, t, reduction=reduction)
    assert_close(out, ref)  # NaN for mean, 0 for sum, zeros for none
    assert int(info.k) == 0 and not info.kept.any()
    assert torch.isnan(info.threshold)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    x, t = make_batch(20, 6, seed=4)
    t[::3] = 5  # class 5 is ignored
    out, info, grad = run(backend, x, t, 1.0, ignore_index=5)
    ref_out, ref_grad = f_cross_entropy(x, t, "mean", ignore_index=5)
    assert_close(out, ref_out)
    assert_close(grad, ref_grad)
    assert not info.kept[t == 5].any()


# --- dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_low_precision_against_float64(backend, dtype, reduction):
    """Half inputs accumulate in fp32; the result is within one rounding of the float64 value of
    the same inputs. The gradient's true-class term is formed before rounding (Liger PR #1329)."""
    x, t = make_batch(64, 33, dtype=dtype, ignore_frac=0.1, seed=9)
    out, info, grad = run(backend, x, t, 0.5, reduction=reduction)
    ref_out, ref_info, ref_grad = run("reference", x.double(), t, 0.5, reduction=reduction)
    assert out.dtype == dtype and grad.dtype == dtype and info.losses.dtype == dtype
    assert torch.equal(info.kept, ref_info.kept)
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32 and backend.endswith("@cuda"):
        # fp32 exp is not correctly rounded on a GPU: Triton's tl.exp is ex2.approx.f32 after a
        # multiply by log2(e), i.e. CUDA's __expf, documented to at most 2 + floor(1.173 |x|) ulp
        # (CUDA C Programming Guide, intrinsic functions). Over a row, s = sum_c exp(x_c - m) is
        # then within (2 + 1.173 * sum_c p_c |x_c - m|) <= (2 + 1.173 log C) ulp, ~6 at C = 33:
        # five times the interpreter's (numpy's correctly rounded exp) bounds below.
        eps *= 5
    torch.testing.assert_close(out.double(), ref_out.to(dtype).double(), rtol=2 * eps, atol=2 * eps)
    # Each gradient entry within ~one rounding of the exact value, relative to the row's scale.
    row_scale = ref_grad.abs().amax(1, keepdim=True).clamp_min(1e-30)
    assert ((grad.double() - ref_grad).abs() / row_scale).max() <= 2 * eps
    true_class = grad.double().gather(1, t.clamp_min(0)[:, None])[info.kept]
    ref_true_class = ref_grad.gather(1, t.clamp_min(0)[:, None])[info.kept]
    assert ((true_class - ref_true_class).abs() <= eps * ref_true_class.abs() + 1e-6).all()


# --- shapes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_spatial_input(backend, reduction):
    x, t = make_batch(2, 5, ignore_frac=0.2, seed=6, spatial=(3, 4))
    out, info, grad = run(backend, x, t, 1.0, reduction=reduction, label_smoothing=0.1)
    ref_out, ref_grad = f_cross_entropy(x, t, reduction, label_smoothing=0.1)
    assert_close(out, ref_out)
    assert_close(grad, ref_grad)
    assert info.kept.shape == t.shape and info.losses.shape == t.shape
    # Trimming over pixels: kept set as the reference picks it, in the target's flat order.
    out, info, grad = run(backend, x, t, 0.3, reduction=reduction)
    ref_out, ref_info, ref_grad = run("reference", x, t, 0.3, reduction=reduction)
    assert torch.equal(info.kept, ref_info.kept)
    assert_close(out, ref_out)
    assert_close(grad, ref_grad)
    assert torch.all(grad.movedim(1, -1)[~info.kept] == 0)


def _spatial_case(layout):
    """(x, t) for one layout of a spatial input; x's strides are what the backends must read."""
    if layout == "3d":
        return make_batch(3, 7, ignore_frac=0.2, seed=11, spatial=(13,))
    if layout == "5d":
        return make_batch(2, 4, ignore_frac=0.2, seed=12, spatial=(3, 2, 5))
    if layout == "c1":
        return make_batch(2, 1, ignore_frac=0.2, seed=13, spatial=(4, 3))
    if layout == "channels-last":
        x, t = make_batch(2, 6, ignore_frac=0.2, seed=14, spatial=(5, 3))
        return x.contiguous(memory_format=torch.channels_last), t
    if layout == "sliced":  # neither contiguous nor channels-last
        x, t = make_batch(2, 6, ignore_frac=0.2, seed=15, spatial=(4, 10))
        return x[:, :, :, ::2], t[:, :, ::2]
    if layout == "padded":  # 3-D, unit stride along the pixels, rows of a wider buffer: read in place
        x, t = make_batch(3, 5, ignore_frac=0.2, seed=18, spatial=(40,))
        return x[:, :, :33], t[:, :33]
    if layout == "257-classes":
        return make_batch(2, 257, ignore_frac=0.1, seed=16, spatial=(3, 3))
    raise AssertionError(layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["3d", "5d", "c1", "channels-last", "sliced", "padded", "257-classes"])
def test_spatial_layouts(backend, layout):
    """Every memory layout of ``(N, C, d...)`` against F.cross_entropy and the reference, with
    weights, label smoothing and a custom ignore_index; zero gradient outside the kept set."""
    x, t = _spatial_case(layout)
    assert layout not in ("sliced", "padded") or not x.is_contiguous()
    c = x.shape[1]
    t = torch.where(t == -100, torch.full_like(t, 3), t) if c > 3 else t
    ignore = 3 if c > 3 else -100
    weight = torch.linspace(0.5, 2.0, c, dtype=x.dtype)
    kw = dict(weight=weight, ignore_index=ignore, label_smoothing=0.05)
    for reduction in REDUCTIONS:
        out, info, grad = run(backend, x, t, 1.0, reduction=reduction, **kw)
        ref_out, ref_grad = f_cross_entropy(x, t, reduction, **kw)
        assert_close(out, ref_out)
        assert_close(grad, ref_grad)
        for keep in ("hardest", "easiest"):
            out, info, grad = run(backend, x, t, 0.35, reduction=reduction, keep=keep, **kw)
            ref_out, ref_info, ref_grad = run("reference", x, t, 0.35, reduction=reduction, keep=keep, **kw)
            assert torch.equal(info.kept, ref_info.kept)
            assert int(info.k) == int(ref_info.k)
            assert_close(info.losses, ref_info.losses)
            assert_close(out, ref_out)
            assert_close(grad, ref_grad)
            assert torch.all(grad.movedim(1, -1)[~info.kept] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spatial_ties_keep_the_lowest_flat_indices(backend):
    """Identical pixels over 2048 rows (more than one select chunk): exactly k kept, lowest first."""
    x = torch.randn(3, 1, 1, dtype=torch.float32).expand(2, 3, 32, 32).contiguous()
    t = torch.ones(2, 32, 32, dtype=torch.long)
    out, info, grad = run(backend, x, t, 0.3)
    k = math.floor(0.3 * 2048 + 0.5)
    assert int(info.k) == k
    flat = info.kept.reshape(-1)
    assert torch.equal(flat, torch.arange(2048) < k)
    assert torch.all(grad.movedim(1, -1)[~info.kept] == 0)
    assert torch.all(grad.movedim(1, -1)[info.kept] != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spatial_bf16(backend):
    x, t = make_batch(2, 19, dtype=torch.bfloat16, ignore_frac=0.1, seed=17, spatial=(6, 5))
    out, info, grad = run(backend, x, t, 0.5)
    ref_out, ref_info, ref_grad = run("reference", x, t, 0.5)
    assert torch.equal(info.kept, ref_info.kept)
    assert_close(out, ref_out, torch.bfloat16)
    assert_close(grad, ref_grad, torch.bfloat16)
    assert grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_sample_input(backend):
    x = torch.randn(7, dtype=torch.float64)
    t = torch.tensor(3)
    for r in (0.01, 1.0):
        out, info, grad = run(backend, x, t, r)
        ref_out, ref_grad = f_cross_entropy(x, t, "mean")
        assert_close(out, ref_out)
        assert_close(grad, ref_grad)
        assert info.kept.shape == () and bool(info.kept)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input_and_int32_target(backend):
    base = torch.randn(30, 20, dtype=torch.float64)
    x = base[::2, 3:14]  # row stride 40, non-contiguous
    t = torch.randint(0, 11, (15,), dtype=torch.int32)
    out, info, grad = run(backend, x, t, 0.6, reduction="sum")
    ref_out, ref_info, ref_grad = run("reference", x.contiguous(), t.long(), 0.6, reduction="sum")
    assert torch.equal(info.kept, ref_info.kept)
    assert_close(out, ref_out)
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_ratio_tensor_equals_float(backend):
    x, t = make_batch(23, 8, ignore_frac=0.1, seed=8)
    a_out, a_info, a_grad = run(backend, x, t, torch.tensor(0.35, dtype=torch.float64))
    b_out, b_info, b_grad = run(backend, x, t, 0.35)
    assert torch.equal(a_info.kept, b_info.kept)
    assert_close(a_out, b_out)
    assert_close(a_grad, b_grad)
    c_out, _, _ = run(backend, x, t, torch.tensor(0.35, dtype=torch.float32))
    assert torch.isfinite(c_out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_to_ratio(backend):
    """(A weight that requires grad raises, as in F.cross_entropy: see test_validation.)"""
    x, t = make_batch(10, 4, seed=12)
    w = torch.rand(4, dtype=torch.float64)
    r = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    x = x.to(split(backend)[1]).requires_grad_(True)
    call(backend, x, t, r, weight=w, label_smoothing=0.1).backward()
    assert r.grad is None and x.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 5, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    out, info = call(backend, x.to(split(backend)[1]), t, 0.5, return_info=True)
    assert torch.isnan(out) and int(info.k) == 0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
# A covering pair: each direction once, each ratio once (the cut in the first chunk and in the second).
@pytest.mark.parametrize("keep, ratio", [("hardest", 0.985), ("easiest", 0.3)])
def test_many_rows_with_ties_across_select_chunks(backend, keep, ratio, monkeypatch):
    """More rows than one select chunk: tie ranks must carry across chunks (at 0.985 the cut
    through the tied threshold rows falls in the last chunk). 2100 rows > 2048; Triton's single
    select program takes its chunk size from ``launch.select_block``, made 128 here so that 300 rows
    span three chunks (the interpreter's time grows with the rows, not the chunk size)."""
    rows = 2100
    if backend.startswith("triton"):
        from fused_trim.triton import launch

        monkeypatch.setattr(launch, "select_block", lambda num_rows: 128)
        rows = 300
    gen = torch.Generator().manual_seed(21)
    patterns = torch.randn(4, 5, generator=gen)  # four exact (row, target) pairs: heavy exact ties
    which = torch.randint(0, 4, (rows,), generator=gen)
    x, t = patterns[which], which.clone()
    t[torch.rand(rows, generator=gen) < 0.1] = -100
    out, info, grad = run(backend, x, t, ratio, keep=keep)
    ref_out, ref_info, ref_grad = run("reference", x, t, ratio, keep=keep)
    assert torch.equal(info.kept, ref_info.kept)
    assert_close(out, ref_out, torch.float32)
    assert_close(grad, ref_grad, torch.float32)
