"""The Triton LM-head kernels (``fused_trim/triton/linear_ce.py``) where tests/test_linear_ce.py does
not reach: the chunked forward against float64 (N not a multiple of the chunk),
fp32 and strided operands, NaN logits, out-of-range and narrow-dtype targets, tiny losses at large
logits, the keep-all path, the fixed-size gather of the backward, and the fake shapes
``torch.compile`` traces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fused_trim import reference, trimmed_cross_entropy, trimmed_linear_cross_entropy

from .triton_targets import TRITON_TARGETS, any_target, needs_interpreter, target_device

pytestmark = any_target


def head(n, d, v, dtype=torch.float64, seed=0, ignore_frac=0.0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, d, generator=gen, dtype=torch.float64) * scale / d**0.5).to(dtype)
    b = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.randint(0, v, (n,), generator=gen)
    if ignore_frac:
        t[torch.rand(n, generator=gen) < ignore_frac] = -100
    return x, w, b, t


def rows_op(x, w, b, t, weight=None, ignore_index=-100, label_smoothing=0.0, chunk_size=16, backend="triton"):
    """The rows op on the backend's device (operands moved with their strides), results on the CPU."""
    from fused_trim.triton.linear_ce import linear_ce_rows

    dev = target_device(backend)
    x, w, b, t, weight = (None if p is None else _to(p, dev) for p in (x, w, b, t, weight))
    return [r.cpu() for r in linear_ce_rows(x, w, b, t, weight, ignore_index, label_smoothing, chunk_size)]


def _to(p, dev):
    """``p`` on ``dev`` with the same strides (a view stays a view of a copied base)."""
    if p.device == dev:
        return p
    return torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=dev).copy_(p)


def expected_rows(x, w, b, t, weight=None, ignore_index=-100, label_smoothing=0.0):
    """Float64 ``(loss, w_y, row max, log s)`` of ``F.linear`` (0 on ignored rows)."""
    logits = F.linear(x.double(), w.double(), None if b is None else b.double())
    wd = None if weight is None else weight.double()
    loss, w_y, _ = reference.per_sample_loss(logits, t, wd, ignore_index, label_smoothing)
    valid = t != ignore_index
    m = logits.max(1).values
    log_s = torch.log(torch.exp(logits - m[:, None]).sum(1))
    zero = torch.zeros(())
    return loss, w_y, torch.where(valid, m, zero), torch.where(valid, log_s, zero)


def check_rows(got, want, rtol, atol):
    loss, w_y, stats = got
    for a, e in zip((loss, w_y, stats[0], stats[1]), want, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol, equal_nan=True)


def test_chunk_rows_are_balanced_and_whole_tiles_on_cuda():
    """Chunks hold at most about ``chunk_size`` rows, differ by less than one chunk's worth only in
    the last one (no small tail re-reading all of W), and on CUDA are whole 256-row GEMM tiles."""
    from fused_trim.triton.linear_ce import chunk_rows

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert chunk_rows(45, 7, cpu) == 7 and chunk_rows(16400, 8192, cpu) == 5467 and chunk_rows(0, 8, cpu) == 1
    assert chunk_rows(16400, 8192, cuda) == 5632 and chunk_rows(100, 8192, cuda) == 100
    for n in (1, 17, 255, 256, 1000, 16400, 65537):
        for size in (1, 3, 256, 1000, 8192, 1 << 20):
            for dev in (cpu, cuda):
                rows = chunk_rows(n, size, dev)
                chunks = -(-n // rows)
                assert 1 <= rows <= n and chunks <= -(-n // size)
                if dev.type == "cuda":
                    assert rows == n or rows % 256 == 0
                else:
                    assert n - (chunks - 1) * rows >= rows - chunks  # the tail is nearly full


@pytest.mark.parametrize("backend", TRITON_TARGETS)
# 37 rows in chunks of 16: a partial last chunk.
@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(label_smoothing=0.1),
        dict(weight=True, label_smoothing=0.25),
        dict(weight=True),
        dict(ignore_index=3),
    ],
    ids=str,
)
def test_rows_against_float64_with_tails(backend, opts):
    opts = dict(opts)
    x, w, b, t = head(37, 45, 70, seed=1, ignore_frac=0.2)
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(70, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.1
    if "ignore_index" in opts:
        t = torch.where(t == -100, opts["ignore_index"], t)  # class 3 is ignored wherever it is the target
    check_rows(rows_op(x, w, b, t, **opts, backend=backend), expected_rows(x, w, b, t, **opts), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", TRITON_TARGETS)
def test_rows_fp32_tails_and_strided_operands(backend):
    """fp32 (64x64x32 blocks): N = 70, V = 130, D = 40; the input a column slice of a wider
    matrix and the weight a transposed (D, V) buffer, both read in place with their strides."""
    x, w, b, t = head(70, 40, 130, dtype=torch.float32, seed=2, ignore_frac=0.1)
    wide = torch.zeros(70, 50)
    wide[:, 5:45] = x
    w_t = w.t().contiguous().t()
    assert wide[:, 5:45].stride() == (50, 1) and w_t.stride() == (1, 130)
    want = expected_rows(x, w, b, t, label_smoothing=0.05)
    check_rows(rows_op(wide[:, 5:45], w_t, b, t, label_smoothing=0.05, backend=backend), want, rtol=2e-5, atol=2e-5)
    check_rows(rows_op(x, w, None, t, backend=backend), expected_rows(x, w, None, t), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", TRITON_TARGETS)
def test_nan_propagates_to_the_loss(backend):
    x, w, b, t = head(20, 8, 40, seed=3)
    x[4, 2] = float("nan")  # one row's logits all NaN
    w2 = w.clone()
    w2[33, 0] = float("nan")  # one class's logit NaN in every row
    loss, _, _ = rows_op(x, w, b, t, backend=backend)
    assert torch.isnan(loss[4]) and torch.isfinite(torch.cat([loss[:4], loss[5:]])).all()
    loss, _, _ = rows_op(x, w2, b, t, label_smoothing=0.1, backend=backend)
    assert torch.isnan(loss).all()


@pytest.mark.parametrize("backend", TRITON_TARGETS)
def test_out_of_range_target_gives_nan_and_narrow_targets_match(backend):
    """A target outside [0, V) (the public API rejects it; the kernel must not read out of bounds
    or invent a loss) gives NaN; int8/int16/int32 targets equal int64 ones, ignore_index included."""
    x, w, b, t = head(33, 6, 17, seed=4, ignore_frac=0.3)
    bad = t.clone()
    bad[[1, 2]] = torch.tensor([17, -5])
    loss, w_y, _ = rows_op(x, w, b, bad, backend=backend)
    assert torch.isnan(loss[[1, 2]]).all() and torch.isfinite(loss[3:]).all()
    ref = rows_op(x, w, b, t, label_smoothing=0.1, backend=backend)
    for dtype in (torch.int8, torch.int16, torch.int32):
        got = rows_op(x, w, b, t.to(dtype), label_smoothing=0.1, backend=backend)
        for a, e in zip(got, ref, strict=True):
            assert torch.equal(a, e)


@pytest.mark.parametrize("backend", TRITON_TARGETS)
def test_tiny_losses_at_large_logits_keep_relative_precision(backend):
    """fp32 logits near 1000 whose losses are 1e-5 .. 1e-9: formed relative to the row max and
    ``log1p`` of ``s - 1``, by the rows op and by the keep-all path alike."""
    gaps = torch.tensor([10.0, 12.0, 15.0, 18.0, 20.0, 8.0])
    x = torch.stack([torch.full_like(gaps, 1000.0), 1000.0 - gaps], 1)  # (6, 2): the logits themselves
    x = torch.cat([x, x[:, 1:] - 1.0], 1)  # a third class, one below the second
    w = torch.eye(3)
    t = torch.zeros(6, dtype=torch.int64)
    expect = F.cross_entropy(x.double(), t, reduction="none")
    assert expect.max() < 1e-3 and expect.min() < 1e-8
    loss, _, _ = rows_op(x, w, None, t, backend=backend)
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=0)
    dev = target_device(backend)
    xg = x.to(dev).requires_grad_(True)
    _, info = trimmed_linear_cross_entropy(
        xg, w.to(dev), t.to(dev), 1.0, backend="triton", return_info=True, chunk_size=4
    )
    torch.testing.assert_close(info.losses.cpu().double(), expect, rtol=1e-5, atol=0)


def _fused_and_reference(x, w, b, t, ratio, grad_seed=0, backend="triton", **kw):
    dev = target_device(backend)
    leaves = [p.to(dev).requires_grad_(True) for p in (x, w, b)]
    dev_ratio = ratio.to(dev) if isinstance(ratio, torch.Tensor) else ratio
    out, info = trimmed_linear_cross_entropy(
        leaves[0], leaves[1], t.to(dev), dev_ratio, linear_bias=leaves[2], backend="triton", return_info=True, **kw
    )
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
    grads = [g.cpu() for g in torch.autograd.grad(out, leaves, up.to(dev))]
    out, info = out.detach().cpu(), type(info)(*(v.cpu() if isinstance(v, torch.Tensor) else v for v in info))
    kw.pop("chunk_size", None)
    ref_leaves = [p.double().clone().requires_grad_(True) for p in (x, w, b)]
    ref, ref_info = trimmed_cross_entropy(F.linear(*ref_leaves), t, ratio, backend="reference", return_info=True, **kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, up.double())
    return (out, info, grads), (ref, ref_info, ref_grads)


@pytest.mark.parametrize("backend", TRITON_TARGETS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ratio", [0.3, 1.0])
def test_trimmed_gradients_and_zero_rows_outside_k(backend, reduction, ratio):
    """Against float64 ``trimmed_cross_entropy(F.linear(...))``: 30% ignored rows make the gathered
    rows (a host bound on k) include rows outside K, whose gradient must stay exactly zero; chunks
    of 7 do not divide the 45 rows. Ratio 1 with a scalar reduction takes the keep-all path."""
    x, w, b, t = head(45, 9, 37, seed=6, ignore_frac=0.3)
    weight = torch.rand(37, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.2
    kw = dict(reduction=reduction, weight=weight, label_smoothing=0.1, chunk_size=7)
    (out, info, grads), (ref, ref_info, ref_grads) = _fused_and_reference(x, w, b, t, ratio, backend=backend, **kw)
    assert torch.equal(info.kept, ref_info.kept)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert torch.all(grads[0][~info.kept] == 0)
    assert torch.all(grads[0][info.kept].abs().sum(1) > 0)


@needs_interpreter
def test_tensor_ratio_exact_count_and_share():
    """A device ratio tensor and an exact int64 count gather all N rows; ``share`` is called once
    with ``(losses, valid)`` and its count replaces the ratio."""
    from fused_trim._common import Keep, Reduction, TrimOptions
    from fused_trim.triton import trimmed_linear_cross_entropy_2d

    x, w, b, t = head(30, 5, 23, seed=7, ignore_frac=0.2)
    (out, info, grads), (ref, ref_info, ref_grads) = _fused_and_reference(x, w, b, t, torch.tensor(0.4))
    assert torch.equal(info.kept, ref_info.kept)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-10, atol=1e-12)

    calls = []

    def share(losses, valid):
        calls.append((losses.clone(), valid.clone()))
        return torch.tensor(5)

    xg = x.clone().requires_grad_(True)
    opts = TrimOptions(keep_ratio=torch.tensor(5), keep=Keep.EASIEST, reduction=Reduction.SUM, chunk_size=8)
    out, losses, kept, k, *_ = trimmed_linear_cross_entropy_2d(xg, w, b, t, opts._replace(keep_ratio=0.9), share=share)
    assert len(calls) == 1 and torch.equal(calls[0][1], t != -100) and torch.equal(calls[0][0], losses)
    assert int(k) == 5 and int(kept.sum()) == 5
    order = torch.sort(torch.where(t != -100, losses, float("inf")), stable=True).indices[:5]
    assert set(order.tolist()) == set(kept.nonzero()[:, 0].tolist())
    torch.testing.assert_close(out, losses[kept].sum())
    exact, *_ = trimmed_linear_cross_entropy_2d(x, w, b, t, opts)
    assert torch.equal(exact, out.detach())


@pytest.mark.parametrize("backend", TRITON_TARGETS)
def test_all_ignored(backend):
    x, w, b, t = head(12, 4, 9, seed=8)
    t[:] = -100
    for ratio, reduction in ((1.0, "mean"), (0.5, "sum"), (0.5, "none")):
        xg, wg, bg = (p.to(target_device(backend)).requires_grad_(True) for p in (x, w, b))
        out, info = trimmed_linear_cross_entropy(
            xg, wg, t.to(xg.device), ratio, linear_bias=bg, backend="triton", reduction=reduction, return_info=True
        )
        assert int(info.k) == 0 and not info.kept.any() and torch.all(info.losses == 0)
        assert torch.isnan(out) if reduction == "mean" else torch.all(out == 0)
        grads = torch.autograd.grad(out.sum(), (xg, wg, bg))
        assert all(torch.all(g == 0) for g in grads)  # the keep-all mean too: not 0 * (g / 0)


@pytest.mark.parametrize("backend", TRITON_TARGETS)
# Fewer examples than the profile's: each runs the interpreted kernels on every row of a random head.
@settings(max_examples=12)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 40),
    v=st.integers(1, 80),
    ratio=st.sampled_from([0.2, 0.5, 1.0]),
    smoothing=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_rows_and_gradients(backend, n, d, v, ratio, smoothing, seed):
    """Random shapes across the block edges (fp64 blocks are 32 wide) against float64."""
    x, w, b, t = head(n, d, v, seed=seed, ignore_frac=0.25)
    check_rows(
        rows_op(x, w, b, t, label_smoothing=smoothing, backend=backend),
        expected_rows(x, w, b, t, label_smoothing=smoothing),
        rtol=1e-11,
        atol=1e-11,
    )
    (out, info, grads), (ref, ref_info, ref_grads) = _fused_and_reference(
        x, w, b, t, ratio, backend=backend, reduction="sum", label_smoothing=smoothing, chunk_size=max(1, n // 3)
    )
    assert torch.equal(info.kept, ref_info.kept)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-11)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("backend", TRITON_TARGETS)
def test_low_precision_operands_go_to_the_dot_as_stored(backend):
    """bf16 and fp16 hidden states and head: per-row losses within the rounding of the fp32
    accumulation of exactly those operands (the float64 oracle sees the same rounded values)."""
    for dtype in (torch.bfloat16, torch.float16):
        x, w, b, t = head(40, 48, 90, dtype=dtype, seed=9, ignore_frac=0.1, scale=3.0)
        got = rows_op(x, w, b, t, label_smoothing=0.1, backend=backend)
        check_rows(got, expected_rows(x, w, b, t, label_smoothing=0.1), rtol=1e-5, atol=1e-5)


def test_fake_shapes_of_the_ops(monkeypatch):
    """Under FakeTensorMode (what torch.compile traces) the ops give their shapes and dtypes, with
    the kernel launches stubbed out (on the CPU ``wrap_triton`` would hand fake tensors to the
    interpreter) and ``torch.mm`` left to the fake kernels."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fused_trim.triton import launch, linear_ce

    launched = []

    class _NoLaunch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((self.kernel.fn.__name__, grid))

    monkeypatch.setattr(linear_ce, "wrap_triton", _NoLaunch)
    monkeypatch.setattr(launch, "wrap_triton", _NoLaunch)  # the shared select launcher
    with FakeTensorMode():
        x = torch.empty(100, 64, dtype=torch.float32)
        w = torch.empty(1000, 64, dtype=torch.float32)
        t = torch.empty(100, dtype=torch.int64)
        loss, w_y, stats = linear_ce.linear_ce_rows(x, w, None, t, None, -100, 0.0, 32)
        assert loss.shape == w_y.shape == (100,) and stats.shape == (2, 100)
        out, kept, k, thr, denom = linear_ce.linear_ce_trimmed(
            loss, w_y, stats, x, w, None, t, None, 0.5, None, False, -100, 0.0, 1, 50, 32
        )
        assert out.shape == k.shape == thr.shape == denom.shape == () and kept.shape == (100,)
        dx, dw, db = linear_ce.linear_ce_bwd(out, x, w, None, t, None, stats, kept, denom, 0.0, 50, 32, True, True)
        assert dx.shape == x.shape and dw.shape == w.shape and db.shape == (0,)
        outs = linear_ce.linear_ce_keep_all(x, w, None, t, None, False, -100, 0.0, 2, 32, True, True)
        assert outs[6].shape == x.shape and outs[7].shape == w.shape
    names = [name for name, _ in launched]
    # 100 rows in chunks of at most 32: four balanced chunks of 25 rows, one row-kernel program a row.
    assert launched[:4] == [("ce_forward_kernel", (25,))] * 4
    assert names.count("ce_forward_kernel") == 4 + 4  # the rows op, then the keep-all path
    assert names.count("ce_backward_kernel") == 2 + 4  # 50 rows in two chunks of 25, then 100 in four


@needs_interpreter
@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_double_backward_raises_clearly(ratio):
    """A second backward (through the recomputing backward op, or through the keep-all path's
    saved gradients, which would silently miss second-order terms) raises a named error."""
    x, w, b, t = head(10, 4, 7, seed=10)
    x.requires_grad_(True)
    message = "double backward of trimmed_linear_cross_entropy is not supported; use backend='reference'"
    out = trimmed_linear_cross_entropy(x, w, t, ratio, linear_bias=b, backend="triton")
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(")):
        (grad,) = torch.autograd.grad(out, x, create_graph=True)
        torch.autograd.grad(grad.pow(2).sum(), x)


@needs_interpreter
def test_device_guard_is_a_no_op_off_cuda(monkeypatch):
    """On the CPU (the interpreter) no op enters torch.cuda.device (it would raise without a GPU)."""

    def no_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda.device entered for a CPU tensor")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    x, w, b, t = head(10, 4, 7, seed=11)
    for ratio in (0.5, 1.0):
        xg = x.clone().requires_grad_(True)
        out = trimmed_linear_cross_entropy(xg, w, t, ratio, linear_bias=b, backend="triton")
        (grad,) = torch.autograd.grad(out, xg)
        assert torch.isfinite(grad).all()


@needs_interpreter
@pytest.mark.parametrize("ratio", [0.5, 1.0])
@pytest.mark.parametrize("frozen", ["linear_weight", "input"])
def test_a_frozen_operand_costs_no_gemm(monkeypatch, ratio, frozen):
    """A head whose weight needs no gradient (or hidden states that need none) skips that GEMM: two
    ``torch.mm`` a chunk instead of three on the recomputing backward (and the keep-all forward),
    and the gradient that is needed still matches float64."""
    from fused_trim.triton import linear_ce

    calls = []
    real_gemm = linear_ce._gemm

    def gemm(a, b, *rest, **kw):
        calls.append(a.shape)
        return real_gemm(a, b, *rest, **kw)

    monkeypatch.setattr(linear_ce, "_gemm", gemm)
    x, w, b, t = head(24, 5, 13, seed=12, ignore_frac=0.2)
    xg, wg = x.clone(), w.clone()
    (xg if frozen == "linear_weight" else wg).requires_grad_(True)
    out = trimmed_linear_cross_entropy(xg, wg, t, ratio, linear_bias=b, backend="triton", chunk_size=8)
    leaf = xg if frozen == "linear_weight" else wg
    (grad,) = torch.autograd.grad(out, leaf)
    # Keep-all: 24 rows, logits and two gradient GEMMs a chunk; recompute: the forward's logits of
    # 24 rows, then k <= round(0.5 * 24) = 12 rows in two chunks of 6, logits and one gradient GEMM.
    assert len(calls) == (2 * 3 if ratio == 1.0 else 3 + 2 * 2)
    xr, wr = x.clone(), w.clone()
    ref_leaf = xr if frozen == "linear_weight" else wr
    ref_leaf.requires_grad_(True)
    ref = trimmed_cross_entropy(F.linear(xr, wr, b), t, ratio, backend="reference")
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
