"""Native-op specifics: build and cache, torch.library registration (opcheck), torch.compile,
the fallback when nothing can be compiled, and an offline nvcc compile of the CUDA source.

The contract itself (values, gradients, ties, NaN, dtypes, shapes, bad inputs) is checked for the
native backend by tests/test_contract.py, which runs every available backend.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fused_trim import native, trimmed_cross_entropy
from fused_trim import reference as ref
from fused_trim._common import Keep, Reduction, TrimOptions

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HAS_CXX = any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "c++", "g++"))

needs_native = pytest.mark.skipif(
    not native.is_available(torch.device("cpu")),
    reason=f"native op unavailable: {native.unavailable_reason(torch.device('cpu'))}",
)


@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler on this machine")
def test_builds_where_a_compiler_exists_and_caches():
    assert native.unavailable_reason(torch.device("cpu")) is None
    assert hasattr(torch.ops.fused_trim, "trimmed_ce_fwd")
    assert hasattr(torch.ops.fused_trim, "trimmed_ce_bwd")
    t0 = time.perf_counter()
    path = native.build()
    assert path.exists()
    assert native.build() == path
    assert time.perf_counter() - t0 < 5.0, "a second build on the same machine must hit the cache"


@needs_native
def test_reports_cuda_state_honestly():
    reason = native.unavailable_reason(torch.device("cuda"))
    if not torch.cuda.is_available():
        assert reason is not None
    assert native.unavailable_reason(torch.device("meta")) is not None


def _opcheck_input(layout, dtype, gen):
    """(x, t) of the op's own input layouts: (M, C) rows, or the spatial (N, C, S)."""
    if layout == "rows":
        x = torch.randn(37, 11, generator=gen)
    elif layout == "spatial":  # a full pixel block and a partial one per image
        x = torch.randn(3, 11, 77, generator=gen)
    elif layout == "spatial-strided":  # classes sliced out of a wider map, last dim unit-stride
        x = torch.randn(2, 15, 70, generator=gen)[:, 2:13]
    else:  # spatial, last dim not unit-stride: the op makes it contiguous
        x = torch.randn(2, 19, 11, generator=gen).transpose(1, 2)
    m = x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[2]
    t = torch.randint(0, 11, (m,), generator=gen)
    t[::5] = -100
    return x.to(dtype).requires_grad_(), t


@needs_native
@pytest.mark.parametrize("layout", ["rows", "spatial", "spatial-strided", "spatial-transposed"])
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(reduction, dtype, layout):
    gen = torch.Generator().manual_seed(0)
    x, t = _opcheck_input(layout, dtype, gen)
    w = torch.rand(11, generator=gen).to(dtype)
    args = (x, t, w, 0.4, None, False, -100, 0.1, reduction)
    torch.library.opcheck(torch.ops.fused_trim.trimmed_ce_fwd.default, args)
    r = torch.ops.fused_trim.trimmed_ce_fwd(*args)
    g = torch.ones(r[0].shape, dtype=dtype)
    bwd_args = (g, x.detach(), t, w, r[5], r[6], -100, 0.1)
    torch.library.opcheck(torch.ops.fused_trim.trimmed_ce_bwd.default, bwd_args)


@needs_native
@pytest.mark.parametrize("layout", ["rows", "spatial"])
def test_opcheck_with_head_options(layout):
    """The ops' schemas, fake kernels and outputs with logit_softcap and z_loss (the LM head's keep-all
    op returns the rows' lse last)."""
    gen = torch.Generator().manual_seed(0)
    x, t = _opcheck_input(layout, torch.float32, gen)
    args = (x, t, None, 0.4, None, False, -100, 0.1, 1, None, None, 0, 2.5, 1e-2)
    torch.library.opcheck(torch.ops.fused_trim.trimmed_ce_fwd.default, args)
    r = torch.ops.fused_trim.trimmed_ce_fwd(*args)
    bwd_args = (torch.ones(()), x.detach(), t, None, r[5], r[6], -100, 0.1, 2.5, 1e-2)
    torch.library.opcheck(torch.ops.fused_trim.trimmed_ce_bwd.default, bwd_args)
    h, w = torch.randn(13, 8, generator=gen), torch.randn(21, 8, generator=gen)
    ht = torch.randint(0, 21, (13,), generator=gen)
    ht[::4] = -100
    head = (2.5, 1e-2)
    ops = torch.ops.fused_trim
    torch.library.opcheck(ops.linear_ce_rows.default, (h, w, None, ht, None, -100, 0.0, 4, *head))
    keep_all = (h, w, None, ht, None, False, -100, 0.0, 1, 4, 3, *head)
    torch.library.opcheck(ops.linear_ce_keep_all.default, keep_all)
    lse = ops.linear_ce_keep_all(*keep_all)[-1]
    torch.testing.assert_close(lse, ops.linear_ce_rows(h, w, None, ht, None, -100, 0.0, 4, *head)[1])
    kept = ht != -100
    bwd = (torch.ones(()), h, w, None, ht, None, lse, kept, kept.float(), -100, 0.0, 4, 3, *head)
    torch.library.opcheck(ops.linear_ce_bwd.default, bwd)


@needs_native
def test_keep_ratio_tensor_goes_to_the_op():
    x = torch.randn(50, 7)
    t = torch.randint(0, 7, (50,))
    a = native.trimmed_cross_entropy_2d(x, t, TrimOptions(torch.tensor(0.3)))
    b = native.trimmed_cross_entropy_2d(x, t, TrimOptions(0.3))
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 10))

    def forward(self, x, t, keep_ratio):
        logits = self.body(x)
        out, _losses, kept, k, _thr, _ = native.trimmed_cross_entropy_2d(
            logits, t, TrimOptions(keep_ratio, label_smoothing=0.05)
        )
        return out, kept, k


@needs_native
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(64, 12)
    t = torch.randint(0, 10, (64,))
    t[::9] = -100
    ratio = torch.tensor(0.4)

    def step(model):
        model.zero_grad(set_to_none=True)
        out, kept, k = model(x, t, ratio)
        out.backward()
        return out.detach(), kept, k, [p.grad.clone() for p in model.parameters()]

    eager = step(net)
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    got = step(compiled)
    torch.testing.assert_close(got[0], eager[0])
    assert torch.equal(got[1], eager[1]) and int(got[2]) == int(eager[2])
    for a, b in zip(got[3], eager[3], strict=True):
        torch.testing.assert_close(a, b)
    # Inductor too (a different keep ratio: the tensor argument must not force a recompile).
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True)
    got = step(compiled)
    torch.testing.assert_close(got[0], eager[0])
    for a, b in zip(got[3], eager[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    ratio.fill_(0.7)
    eager = step(net)
    got = step(compiled)
    torch.testing.assert_close(got[0], eager[0])


@needs_native
def test_torch_compile_fullgraph_spatial():
    """A segmentation head under torch.compile(fullgraph=True): the (N, C, S) input goes through
    the fake implementations (shapes of the N * S per-pixel outputs) and the C++ autograd."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 7, 3, padding=1)
    x = torch.randn(2, 3, 9, 10)
    t = torch.randint(0, 7, (2, 9, 10))
    t[:, ::4] = -100
    ratio = torch.tensor(0.4)

    def step(fn):
        conv.zero_grad(set_to_none=True)
        out, info = fn(x, t, ratio)
        out.backward()
        return out.detach(), info.kept, [p.grad.clone() for p in conv.parameters()]

    def loss(x, t, ratio):
        return trimmed_cross_entropy(conv(x), t, ratio, backend="native", label_smoothing=0.05, return_info=True)

    eager = step(loss)
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        got = step(torch.compile(loss, fullgraph=True, backend=backend))
        torch.testing.assert_close(got[0], eager[0])
        assert torch.equal(got[1], eager[1])
        for a, b in zip(got[2], eager[2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@needs_native
def test_non_kept_rows_get_exact_zero_even_with_nan_logits():
    # Under keep="easiest" a NaN loss ranks last, so NaN rows are left out: their gradient must be
    # exactly zero (the backward never reads them), not NaN.
    x = torch.randn(40, 9)
    x[3, 2] = float("nan")
    x[17] = float("nan")
    x.requires_grad_()
    t = torch.randint(0, 9, (40,))
    out, info = trimmed_cross_entropy(x, t, 0.5, keep="easiest", backend="native", return_info=True)
    out.backward()
    assert not info.kept[3] and not info.kept[17]
    assert torch.isfinite(out)
    assert torch.equal(x.grad[~info.kept], torch.zeros_like(x.grad[~info.kept]))
    assert torch.isfinite(x.grad).all()


@needs_native
@pytest.mark.parametrize("shape", [(4096, 3), (300, 2500), (64, 70000)])
def test_block_and_tile_paths_against_reference(shape):
    # The few-class tile path, the blocked path with several blocks, and a row over 64k classes.
    m, c = shape
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(m, c, generator=gen) * 4).requires_grad_()
    t = torch.randint(0, c, (m,), generator=gen)
    t[::11] = -100
    w = torch.rand(c, generator=gen)
    kw = dict(weight=w, label_smoothing=0.2, reduction="sum")
    out_n, info_n = trimmed_cross_entropy(x, t, 0.3, backend="native", return_info=True, **kw)
    (g_n,) = torch.autograd.grad(out_n, x)
    out_r, info_r = trimmed_cross_entropy(x, t, 0.3, backend="reference", return_info=True, **kw)
    (g_r,) = torch.autograd.grad(out_r, x)
    assert torch.equal(info_n.kept, info_r.kept)
    torch.testing.assert_close(out_n, out_r, rtol=2e-5, atol=1e-4)
    torch.testing.assert_close(g_n, g_r, rtol=2e-5, atol=2e-6)


@needs_native
@pytest.mark.parametrize(
    "shape",
    [(12, 8, 2500), (24, 171, 10), (6, 19, 24, 24)],
    ids=["rows", "few-classes", "spatial"],
)
def test_kept_groups_backward_is_split_over_threads(shape):
    # A group rule keeps contiguous runs of rows: the backward deals row blocks to the threads in
    # turn. Many blocks per thread here; every block must be written once, whatever the threads.
    gen = torch.Generator().manual_seed(5)
    if len(shape) == 3:  # (sequences, tokens, classes): rows (B*T, C), one group per sequence
        b, tok, c = shape
        x = torch.randn(b * tok, c, generator=gen, dtype=torch.float64) * 3
        t = torch.randint(0, c, (b * tok,), generator=gen)
        groups = torch.arange(b).repeat_interleave(tok)
    else:  # (N, C, H, W): one group per image
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
        t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
        groups = "rows"
    up = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    grads = []
    before = torch.get_num_threads()
    try:
        for backend, threads in (("reference", 1), ("native", 1), ("native", 2)):
            torch.set_num_threads(threads)
            xb = x.clone().requires_grad_()
            out, info = trimmed_cross_entropy(xb, t, 0.5, backend=backend, group_ids=groups, return_info=True)
            (g,) = torch.autograd.grad(out * up, xb)
            grads.append((g, info.kept))
    finally:
        torch.set_num_threads(before)
    (g_ref, kept), (g1, kept1), (g2, kept2) = grads
    assert torch.equal(kept, kept1) and torch.equal(kept, kept2)
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(g1, g_ref, rtol=1e-12, atol=1e-14)
    assert torch.equal(g1, g2)
    rows_last = g2 if len(shape) == 3 else g2.movedim(1, -1)  # (samples..., C)
    assert (rows_last[~kept] == 0).all()


def _spatial_grad_pair(x, t, ratio, **kw):
    """(out, info, grad) of the native op and of the reference on the same spatial input."""
    res = []
    for backend in ("native", "reference"):
        xb = x.detach().clone().requires_grad_()
        out, info = trimmed_cross_entropy(xb, t, ratio, backend=backend, return_info=True, **kw)
        gen = torch.Generator().manual_seed(3)
        up = torch.randn(out.shape, generator=gen).to(out.dtype)
        (g,) = torch.autograd.grad(out, xb, up)
        res.append((out, info, g))
    return res


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 19, 64), (2, 19, 130), (2, 150, 7, 11), (1, 1, 70)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_spatial_blocks_and_class_chunks(dtype, shape, reduction):
    """The spatial CPU kernels: whole and partial pixel blocks, several class chunks (C > 64, the
    later chunks raising the running max, so the exp-sum is rescaled), every dtype, weights,
    label smoothing, a scalar and a per-pixel upstream gradient."""
    gen = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    x = x + torch.linspace(0, 8, c, dtype=torch.float64).view(1, c, *([1] * (len(shape) - 2)))
    x = x.to(dtype)
    t = torch.randint(0, c, (shape[0], *shape[2:]), generator=gen)
    t[torch.rand(t.shape, generator=gen) < 0.15] = -100
    w = torch.rand(c, generator=gen, dtype=torch.float64).add(0.5).to(dtype)
    kw = dict(weight=w, label_smoothing=0.1, reduction=reduction)
    (out_n, info_n, g_n), (out_r, info_r, g_r) = _spatial_grad_pair(x, t, 0.4, **kw)
    assert torch.equal(info_n.kept, info_r.kept)
    tol = {
        torch.float64: dict(rtol=1e-10, atol=1e-12),
        torch.float32: dict(rtol=2e-5, atol=2e-6),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
    }[dtype]
    torch.testing.assert_close(info_n.losses, info_r.losses, **tol)
    torch.testing.assert_close(out_n, out_r, **tol)
    torch.testing.assert_close(g_n, g_r, **tol)
    assert g_n.dtype == dtype and g_n.shape == x.shape
    assert torch.all(g_n.movedim(1, -1)[~info_n.kept] == 0)


@needs_native
def test_spatial_nan_and_inf_pixels():
    """NaN pixels beside kept ones in the same block: exactly 0 where not kept (keep="easiest"
    leaves NaN losses out), NaN where kept (keep="hardest"); -inf logits in the first class chunk
    with finite ones in a later chunk."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 70, 50, generator=gen)
    x[0, :64, 3] = float("-inf")  # the first chunk all -inf, the second finite
    x[1, 5, 7] = float("nan")
    x[0, :, 20] = float("nan")
    t = torch.randint(64, 70, (2, 50), generator=gen)
    for keep in ("easiest", "hardest"):
        (out_n, info_n, g_n), (out_r, info_r, g_r) = _spatial_grad_pair(x, t, 0.5, keep=keep)
        assert torch.equal(info_n.kept, info_r.kept)
        torch.testing.assert_close(info_n.losses, info_r.losses, equal_nan=True)
        torch.testing.assert_close(g_n, g_r, equal_nan=True)
        assert torch.all(g_n.movedim(1, -1)[~info_n.kept] == 0)
        if keep == "easiest":
            assert torch.isfinite(out_n) and torch.isfinite(g_n).all()


@needs_native
def test_spatial_bad_target_raises():
    x = torch.randn(2, 5, 9, 9)
    t = torch.randint(0, 5, (2, 9, 9))
    t[1, 4, 4] = 5
    with pytest.raises(ValueError, match="outside"):
        trimmed_cross_entropy(x, t, 0.5, backend="native")


@needs_native
def test_spatial_input_is_not_copied_into_rows(monkeypatch):
    """CPU spatial inputs go to the op as (N, C, S) views: as_rows is never called, and the
    gradient comes back in the input's layout."""
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    t = torch.randint(0, 4, (2, 6, 5))
    want = torch.autograd.grad(trimmed_cross_entropy(x, t, 0.5, backend="reference"), x)[0]

    def fail(_input):
        raise AssertionError("as_rows called for a CPU tensor")

    monkeypatch.setattr(native, "as_rows", fail)
    trimmed_cross_entropy(x, t, 0.5, backend="native").backward()
    torch.testing.assert_close(x.grad, want)


@needs_native
def test_spatial_streamed_gradient():
    """A gradient over 32 MiB (written with streaming stores) with a partial last pixel block.
    Integer logits: a few distinct losses, each bit-identical wherever it occurs, so the kept set
    (ties by index) cannot differ from the reference's by a rounding at the threshold."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randint(-4, 5, (1, 3, (1 << 23) // 3 + 5), generator=gen).float()
    t = torch.randint(0, 3, (1, x.shape[2]), generator=gen)
    (out_n, info_n, g_n), (out_r, info_r, g_r) = _spatial_grad_pair(x, t, 0.3)
    assert torch.equal(info_n.kept, info_r.kept)
    torch.testing.assert_close(out_n, out_r)
    torch.testing.assert_close(g_n, g_r)


@needs_native
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
@pytest.mark.parametrize("ratio", [1e-6, 0.3, 0.985, 1.0, "count"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_histogram_select_many_rows(keep, ratio, dtype):
    """From 2^15 rows on, the selection first bins the ranking keys (csrc: kRadixSelectMin):
    heavy exact ties, NaN and +-inf losses, ignored rows, k = 1, k = n and an exact count (the
    distributed path), in both the row and the spatial layout, against the reference."""
    gen = torch.Generator().manual_seed(31)
    m = 40000
    patterns = torch.randn(6, 5, generator=gen)
    patterns[4, 1] = float("nan")
    patterns[5, 2] = float("-inf")  # target 2 below: an infinite loss
    which = torch.randint(0, 6, (m,), generator=gen)
    x, t = patterns[which].to(dtype), which.clamp(max=4).clone()
    t[which == 5] = 2
    t[torch.rand(m, generator=gen) < 0.1] = -100
    r = torch.tensor(12345) if ratio == "count" else ratio
    for layout in ("rows", "spatial"):
        xl = x if layout == "rows" else x.view(2, m // 2, 5).transpose(1, 2)
        opts = TrimOptions(r, Keep[keep.upper()], reduction=Reduction.SUM)
        got = native.trimmed_cross_entropy_2d(xl, t, opts)
        want = ref.trimmed_cross_entropy_2d(x, t, opts)
        assert torch.equal(got[2], want[2]), layout
        assert int(got[3]) == int(want[3])
        torch.testing.assert_close(got[4], want[4], equal_nan=True)
        torch.testing.assert_close(got[0], want[0], equal_nan=True)


def _expected_selection(scores, valid, easiest, k):
    """The contract's kept set over ``scores``: the k valid ones ranked first (NaN above +inf),
    ties to the lower index, by a stable sort."""
    idx = torch.nonzero(valid).flatten()
    order = torch.sort(scores[idx], descending=not easiest, stable=True).indices
    kept = torch.zeros_like(valid)
    kept[idx[order[:k]]] = True
    return kept, (idx[order[k - 1]] if k > 0 else None)


@needs_native
@pytest.mark.parametrize(
    ("m", "rule", "keep", "reduction", "extra"),
    [
        (40009, "ratio", "hardest", "none", "nan"),
        (40009, "ratio", "easiest", "mean", "weight"),
        (65551, "threshold", "hardest", "sum", ""),
        (65551, "threshold", "easiest", "mean", "offset"),
        (40009, "count", "hardest", "mean", "offset"),
        (32768, "ratio", "hardest", "sum", "weight"),
    ],
)
def test_histogram_select_outputs(m, rule, keep, reduction, extra):
    """The histogram select (2^15 rows and more, fp32) writes kept / rowscale / out itself: many
    distinct losses plus exact ties, ignored rows, a row count off the vector width, each keep rule,
    weights, score_offset; the kept set, k and the threshold against a stable sort of the op's own
    scores, the result and the gradient against F.cross_entropy over that set in float64."""
    gen = torch.Generator().manual_seed(m + len(rule) + len(extra))
    c = 7
    x = torch.randn(m, c, generator=gen).mul(3)
    t = torch.randint(0, c, (m,), generator=gen)
    x[m // 2 : m // 2 + 500] = x[:500]  # exact ties, both sides of the threshold
    t[m // 2 : m // 2 + 500] = t[:500]
    t[torch.rand(m, generator=gen) < 0.1] = -100
    if extra == "nan":
        x[[3, 77, m - 1], 0] = float("nan")
    w = torch.rand(c, generator=gen).add(0.3) if extra == "weight" else None
    offset = torch.randn(m, generator=gen) if extra == "offset" else None
    valid = t != -100
    kw = dict(keep=keep, reduction=reduction, weight=w, score_offset=offset)
    ratio = 0.37
    if rule == "count":
        kw["keep_count"] = 12345
    elif rule == "threshold":
        kw["keep_threshold"], kw["min_kept"] = (2.5 if keep == "hardest" else 0.4), 1000
    xg = x.clone().requires_grad_(True)
    r = ratio if rule == "ratio" else None
    out, info = trimmed_cross_entropy(xg, t, r, backend="native", return_info=True, **kw)
    losses = info.losses
    scores = losses if offset is None else losses - offset  # (fp32, as the op forms them)
    easiest = keep == "easiest"
    n = int(valid.sum())
    if rule == "ratio":
        k = min(n, max(1, int(ratio * n + 0.5)))
    elif rule == "count":
        k = min(n, 12345)
    else:
        thr = torch.tensor(kw["keep_threshold"], dtype=torch.float64)
        s64 = scores.double()
        past = (s64 < thr) if easiest else ((s64 > thr) | s64.isnan())
        k = max(int((past & valid).sum()), min(n, 1000))
    kept, thr_idx = _expected_selection(scores, valid, easiest, k)
    assert int(info.k) == k
    assert torch.equal(info.kept, kept)
    assert torch.equal(info.threshold, scores[thr_idx])
    # The oracle: F.cross_entropy per row in float64, reduced over the kept set.
    x64 = x.double().requires_grad_(True)
    x_kept = torch.where(kept[:, None], x64, 0.0)  # (F.cross_entropy leaks an ignored row's NaN)
    per_row = F.cross_entropy(x_kept, t, weight=None if w is None else w.double(), reduction="none")
    per_row = torch.where(kept, per_row, 0.0)
    if reduction == "none":
        want = per_row
    elif reduction == "sum":
        want = per_row.sum()
    else:
        want = per_row.sum() / (w.double()[t[kept]].sum() if w is not None else k)
    assert_close = torch.testing.assert_close
    assert_close(out.double(), want.detach(), rtol=2e-6, atol=1e-6, equal_nan=True)
    upstream = torch.randn(out.shape, generator=gen)
    (g,) = torch.autograd.grad(out, xg, upstream)
    (g_want,) = torch.autograd.grad(want, x64, upstream.double())
    if extra == "nan":
        g_want = torch.where(kept[:, None] & x64.isnan().any(1, keepdim=True), float("nan"), g_want)
    assert_close(g.double(), g_want, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.equal(g[~kept], torch.zeros_like(g[~kept]))


@needs_native
def test_big_logits_losses_close_to_float64():
    # Shifting the logits by a large constant must not cost precision (no lse - x_y cancellation
    # beyond the input's own rounding, no sum-of-logits cancellation with label smoothing).
    x = torch.randn(64, 1000, dtype=torch.float64) + 1e3
    t = torch.randint(0, 1000, (64,))
    for ls in (0.0, 0.3):
        _, info = trimmed_cross_entropy(x.float(), t, 1.0, label_smoothing=ls, backend="native", return_info=True)
        want = F.cross_entropy(x.float().double(), t, reduction="none", label_smoothing=ls)
        torch.testing.assert_close(info.losses.double(), want, rtol=2e-5, atol=1e-5)


@needs_native
def test_auto_uses_native_on_cpu():
    x = torch.randn(20, 5)
    t = torch.randint(0, 5, (20,))
    a = trimmed_cross_entropy(x, t, 0.5)
    b = trimmed_cross_entropy(x, t, 0.5, backend="native")
    assert torch.equal(a, b)
    want, *_ = ref.trimmed_cross_entropy_2d(x, t, TrimOptions(0.5))
    torch.testing.assert_close(a, want)


def test_missing_compiler_warns_once_and_falls_back(tmp_path):
    """No compiler and no cached build: import is silent, auto falls back with one warning, and
    backend='native' raises naming the reason."""
    script = textwrap.dedent(
        """
        import warnings
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fused_trim
            assert not caught, [str(w.message) for w in caught]
            from fused_trim import trimmed_cross_entropy
            x = torch.randn(8, 4)
            t = torch.randint(0, 4, (8,))
            a = trimmed_cross_entropy(x, t, 0.5)
            b = trimmed_cross_entropy(x, t, 0.5, backend="reference")
            assert torch.equal(a, b)
            trimmed_cross_entropy(x, t, 0.5)
        msgs = [str(w.message) for w in caught if "fused_trim" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "compiler" in msgs[0], msgs[0]
        try:
            trimmed_cross_entropy(x, t, 0.5, backend="native")
        except RuntimeError as exc:
            assert "native" in str(exc) and "compiler" in str(exc), str(exc)
        else:
            raise AssertionError("backend='native' must raise without a build")
        print("OK")
        """
    )
    env = dict(os.environ)
    env.update(CXX=str(tmp_path / "no-such-c++"), FUSED_TRIM_CACHE_DIR=str(tmp_path / "cache"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.path.exists(cand) else shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    """`nvcc -c` of csrc/trimmed_ce_cuda.cu for sm_90 against the installed torch's headers, with
    register/spill counts. A CPU-only torch wheel lacks one generated header
    (c10/cuda/impl/cuda_cmake_macros.h, a single #define); it is stubbed in a temporary include dir."""
    from torch.utils.cpp_extension import include_paths

    incs = list(include_paths())
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(p) / macros).exists() for p in incs):
        stub = tmp_path / "stub" / macros
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs.append(str(tmp_path / "stub"))
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    cmd = [
        _nvcc(),
        "-c",
        str(CSRC / "trimmed_ce_cuda.cu"),
        "-o",
        str(tmp_path / "trimmed_ce_cuda.o"),
        "-std=c++20",
        # -O0 applies to the host code only (ATen's headers: most of the compile time); the device
        # code still goes through ptxas at its default -O3, so the register and spill counts below
        # are those of the real build.
        "-O0",
        "-gencode=arch=compute_90,code=sm_90",
        "--expt-relaxed-constexpr",
        "-Xcompiler",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-Xptxas",
        "-v",
        *[f"-I{p}" for p in incs],
        f"-I{CSRC}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert (tmp_path / "trimmed_ce_cuda.o").stat().st_size > 0
    log = proc.stdout + proc.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", log)
    assert any("ce_forward_kernel" in k for k in kernels) and any("select_kernel" in k for k in kernels)
    # Every group size the launch picks from C (4 and 8 lanes for a few classes, a warp, the block)
    # is built for both kernels: the mangled names carry G as `Li<G>E`.
    for name in ("ce_forward_kernel", "ce_backward_kernel"):
        sizes = {int(g) for k in kernels if name in k for g in re.findall(r"Li(\d+)E", k)}
        assert {4, 8, 32, 256} <= sizes, (name, sorted(sizes))
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills and max(spills) == 0, "a kernel spills registers:\n" + log[-4000:]


@needs_native
@pytest.mark.parametrize("layout", ["rows", "spatial"])
def test_double_backward_raises_clearly(layout):
    """A first-order gradient with create_graph=True still works (a gradient penalty elsewhere in
    the model); differentiating it again raises, rather than silently giving no gradient."""
    gen = torch.Generator().manual_seed(4)
    shape = (12, 5) if layout == "rows" else (2, 5, 3, 4)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (shape[0], *shape[2:]), generator=gen)
    (g,) = torch.autograd.grad(trimmed_cross_entropy(x, t, 0.5, backend="native"), x, create_graph=True)
    (want,) = torch.autograd.grad(trimmed_cross_entropy(x, t, 0.5, backend="reference"), x)
    torch.testing.assert_close(g.detach(), want)
    msg = "double backward of trimmed_cross_entropy is not supported; use backend='reference'"
    with pytest.raises(RuntimeError, match=msg):
        g.pow(2).sum().backward()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), x)


def test_cli_build_prints_the_library(capsys):
    """`python -m fused_trim build`: the cached library's path on stdout, exit 0 (cheap: the
    library is cached by the time this runs, or is built here once)."""
    from fused_trim.__main__ import main

    if not HAS_CXX:
        pytest.skip("no C++ compiler on this machine")
    assert main(["build"]) == 0
    out = capsys.readouterr().out.strip()
    assert Path(out).is_file() and out == str(native.build())


def test_cli_build_fails_with_the_reason(tmp_path, monkeypatch, capsys):
    """No compiler and an empty cache: a non-zero exit and the reason on stderr."""
    from fused_trim.__main__ import main

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("FUSED_TRIM_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["build"]) == 1
    err = capsys.readouterr().err
    assert "could not be built" in err and "compiler" in err
    assert "compiling the native CPU op (once per machine" in err


@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler on this machine")
def test_cuda_online_softmax_merge_keeps_nan(tmp_path):
    """The CUDA forward's lane and warp merges (ms_add/ms_merge, csrc/trimmed_ce_common.h) run on
    the host in the kernel's order (tests/native_host/ms_merge_check.cpp): a NaN in any lane
    position, C = 1..40 and wider, with -inf and +inf entries, gives a NaN logsumexp, and rows
    without one match a float64 logsumexp. (A lane that saw only NaN holds m = -inf, s = NaN; the
    merge used to replace that s by 0 and drop the NaN.)"""
    cxx = next(c for c in (os.environ.get("CXX") or "c++", "c++", "g++") if shutil.which(c))
    exe = tmp_path / "ms_merge_check"
    src = ROOT / "tests" / "native_host" / "ms_merge_check.cpp"
    build = subprocess.run(
        [cxx, "-std=c++20", "-O1", f"-I{CSRC}", str(src), "-o", str(exe)], capture_output=True, text=True, timeout=300
    )
    assert build.returncode == 0, build.stderr[-4000:]
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stdout[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_native
@pytest.mark.parametrize("ratio", [0.3, 7], ids=["ratio", "count"])
def test_cuda_cpu_keep_ratio_tensor_does_not_synchronise(ratio):
    """A CPU keep_ratio tensor (or exact count) with CUDA inputs is read on the host, not copied to
    the device (a synchronising copy from pageable memory, illegal in graph capture)."""
    if not native.is_available(torch.device("cuda")):
        pytest.skip(native.unavailable_reason(torch.device("cuda")))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 10, generator=gen).cuda().requires_grad_()
    t = torch.randint(0, 10, (300,), generator=gen).cuda()
    r_cpu = torch.tensor(ratio)
    want = native.trimmed_cross_entropy_2d(x, t, TrimOptions(r_cpu.cuda()))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = native.trimmed_cross_entropy_2d(x, t, TrimOptions(r_cpu))
        (g,) = torch.autograd.grad(got[0], x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    (g_want,) = torch.autograd.grad(want[0], x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(g, g_want, rtol=0, atol=0)
