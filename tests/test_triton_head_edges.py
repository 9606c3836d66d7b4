"""The Triton LM head and cross-entropy where an audit found wrong results: operands that are views
(strided bias, transposed weight, non-unit feature stride), every target ignored on each path,
infinite logits, non-finite hidden states on rows outside the kept set, and the select kernel's
output buffers. Each runs interpreted on the CPU and compiled on CUDA (see tests/triton_targets.py),
against float64 ``F.linear`` + the reference or ``F.cross_entropy``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_trim import trimmed_cross_entropy, trimmed_linear_cross_entropy

from .triton_targets import TRITON_TARGETS, any_target, needs_interpreter, target_device

pytestmark = any_target


def _head(n, d, v, dtype=torch.float64, seed=0, ignore_frac=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) / d**0.5
    b = torch.randn(v, generator=gen, dtype=torch.float64)
    t = torch.randint(0, v, (n,), generator=gen)
    if ignore_frac:
        t[torch.rand(n, generator=gen) < ignore_frac] = -100
    return x.to(dtype), w.to(dtype), b.to(dtype), t


def _views(x, w, b, layout: str, dev):
    """Leaves on ``dev`` (requiring gradients) and the views of them that the op is given (their
    values are x, w, b)."""
    leaves, views = _views_of(x, w, b, layout, dev)
    for p in leaves:
        p.requires_grad_(True)
    return leaves, views(leaves)


def _views_of(x, w, b, layout: str, dev):
    if layout == "bias[::2]":
        base = torch.zeros(2 * b.shape[0], dtype=b.dtype, device=dev)
        base[::2] = b.to(dev)
        leaves = [x.to(dev), w.to(dev), base]
        return leaves, lambda p: [p[0], p[1], p[2][::2]]
    if layout == "bias column":
        base = torch.zeros(b.shape[0], 3, dtype=b.dtype, device=dev)
        base[:, 1] = b.to(dev)
        leaves = [x.to(dev), w.to(dev), base]
        return leaves, lambda p: [p[0], p[1], p[2][:, 1]]
    if layout == "weight.t()":
        leaves = [x.to(dev), w.t().contiguous().to(dev), b.to(dev)]
        return leaves, lambda p: [p[0], p[1].t(), p[2]]
    if layout == "input[:, ::2]":
        base = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=dev)
        base[:, ::2] = x.to(dev)
        leaves = [base, w.to(dev), b.to(dev)]
        return leaves, lambda p: [p[0][:, ::2], p[1], p[2]]
    raise ValueError(layout)


def _reference(x, w, b, t, ratio, up, **kw):
    """Float64 ``trimmed_cross_entropy(F.linear(...))`` and its gradients under ``up``."""
    leaves = [p.double().clone().requires_grad_(True) for p in (x, w, b)]
    out, info = trimmed_cross_entropy(F.linear(*leaves), t, ratio, backend="reference", return_info=True, **kw)
    return out, info, torch.autograd.grad(out, leaves, up.double())


@pytest.mark.parametrize("backend", TRITON_TARGETS)
@pytest.mark.parametrize("layout", ["bias[::2]", "bias column", "weight.t()", "input[:, ::2]"])
@pytest.mark.parametrize("ratio", [0.4, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_strided_operands_are_read_with_their_strides(backend, layout, ratio, dtype):
    """A bias that is a slice of a larger parameter, a transposed weight and a hidden state with a
    feature stride of 2 give the losses, kept set and gradients of their contiguous copies."""
    dev = target_device(backend)
    x, w, b, t = _head(37, 11, 29, dtype=dtype, seed=1, ignore_frac=0.2)
    _, views = _views(x, w, b, layout, dev)
    out, info = trimmed_linear_cross_entropy(
        views[0],
        views[1],
        t.to(dev),
        ratio,
        linear_bias=views[2],
        backend="triton",
        return_info=True,
        reduction="sum",
        chunk_size=10,
    )
    up = torch.tensor(0.75, dtype=out.dtype)
    grads = torch.autograd.grad(out, views, up.to(dev))
    ref, ref_info, ref_grads = _reference(x, w, b, t, ratio, up, reduction="sum")
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    assert torch.equal(info.kept.cpu(), ref_info.kept)
    torch.testing.assert_close(info.losses.cpu().double(), ref_info.losses, **tol)
    torch.testing.assert_close(out.cpu().double(), ref, **tol)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.cpu().double(), r, **tol)


def _all_ignored_case(backend, op, ratio, reduction, dtype):
    dev = target_device(backend)
    x, w, b, t = _head(6, 4, 5, dtype=dtype, seed=2)
    t[:] = -100
    if isinstance(ratio, torch.Tensor):
        ratio = ratio.to(dev)
    leaves = [p.to(dev).requires_grad_(True) for p in ((x, w, b) if op == "linear" else (x @ w.t() + b,))]
    if op == "linear":
        out, info = trimmed_linear_cross_entropy(
            leaves[0],
            leaves[1],
            t.to(dev),
            ratio,
            linear_bias=leaves[2],
            backend="triton",
            reduction=reduction,
            return_info=True,
        )
    else:
        logits = leaves[0].detach().requires_grad_(True)
        leaves = [logits]
        out, info = trimmed_cross_entropy(
            logits, t.to(dev), ratio, backend="triton", reduction=reduction, return_info=True
        )
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, up.to(dev))
    return out.cpu(), info, [g.cpu() for g in grads]


@pytest.mark.parametrize("backend", TRITON_TARGETS)
@pytest.mark.parametrize("op", ["linear", "cross_entropy"])
@pytest.mark.parametrize("ratio", [0.5, 1.0, "tensor 1.0", "tensor 0.5"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_every_target_ignored(backend, op, ratio, reduction, dtype):
    """No valid row, on every path (keep 1.0 as a float takes the LM head's keep-all path, where
    the mean's divisor is 0): k = 0, the mean NaN (as ``F.cross_entropy``), the sum 0, the per-row
    losses 0, and every gradient exactly zero (``F.cross_entropy``'s), never 0 * (g / 0) = NaN."""
    if isinstance(ratio, str):
        ratio = torch.tensor(float(ratio.split()[1]))
    out, info, grads = _all_ignored_case(backend, op, ratio, reduction, dtype)
    assert int(info.k) == 0 and not info.kept.any() and torch.all(info.losses == 0)
    if reduction == "mean":
        assert torch.isnan(out)
    else:
        assert torch.all(out == 0)
    for g in grads:
        assert torch.all(g == 0), g


@pytest.mark.parametrize("backend", TRITON_TARGETS)
def test_all_ignored_mean_matches_f_cross_entropy(backend):
    """The oracle itself: ``F.cross_entropy`` gives a NaN mean and zero gradients here."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.full((4,), -100)
    out = F.cross_entropy(x, t)
    (g,) = torch.autograd.grad(out, x)
    assert torch.isnan(out) and torch.all(g == 0)
    got, _, grads = _all_ignored_case(backend, "linear", 1.0, "mean", torch.float64)
    assert torch.isnan(got) and all(torch.all(g == 0) for g in grads)


def _inf_head(dtype):
    """Row 3's logit of class 4 overflows to +inf in the GEMM (a large hidden state against a large
    weight; its other logits and its target's stay finite), and class 2 has a bias of -inf, so rows
    with target 2 (row 1) have a target logit of -inf."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    big = 1e30 if dtype == torch.float32 else 1e200  # big * big overflows the dtype, big * 1 does not
    x[:, 0] = 0.0
    x[3, 0] = big
    w[4, 0] = big
    b[2] = float("-inf")
    t = torch.tensor([0, 2, 1, 1, 3, 4, 5, 0, 1, 3])
    return x.to(dtype), w.to(dtype), b.to(dtype), t


@pytest.mark.parametrize("backend", TRITON_TARGETS)
@pytest.mark.parametrize("op", ["linear", "cross_entropy"])
@pytest.mark.parametrize("ratio", [0.5, 1.0])
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinite_logits_match_f_cross_entropy(backend, op, ratio, keep, dtype):
    """A row with a +inf logit has a NaN loss (``F.cross_entropy``: inf - inf), a row whose target
    logit is -inf an +inf loss; NaN ranks above +inf, so the kept set depends on which it is."""
    x, w, b, t = _inf_head(dtype)
    logits = F.linear(x, w, b)  # in the dtype: class 4 of row 3 is +inf there
    expect = F.cross_entropy(logits.double(), t, reduction="none")
    assert torch.isnan(expect[3]) and torch.isinf(expect[1]) and torch.isfinite(expect[[0, 2, 4]]).all()
    _, ref_info = trimmed_cross_entropy(logits, t, ratio, keep=keep, backend="reference", return_info=True)
    dev = target_device(backend)
    x, w, b, t = (p.to(dev) for p in (x, w, b, t))
    if op == "linear":
        out, info = trimmed_linear_cross_entropy(
            x, w, t, ratio, linear_bias=b, keep=keep, backend="triton", reduction="none", return_info=True, chunk_size=4
        )
    else:
        out, info = trimmed_cross_entropy(
            F.linear(x, w, b), t, ratio, keep=keep, backend="triton", reduction="none", return_info=True
        )
    torch.testing.assert_close(info.losses.cpu().double(), expect, rtol=2e-5, atol=2e-5, equal_nan=True)
    assert torch.equal(info.kept.cpu(), ref_info.kept)


@pytest.mark.parametrize("backend", TRITON_TARGETS)
@pytest.mark.parametrize("ratio", [0.5, "tensor 0.5", 1.0])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_non_finite_rows_outside_k_contribute_nothing(backend, ratio, value, dtype):
    """A NaN/inf hidden state on an ignored row (a padding token), and on a row that
    ``keep="easiest"`` trims away (its loss is NaN or inf), reaches no gradient: ``d W`` and ``d b``
    are those of the kept rows alone, ``d input`` is exactly zero outside K. Rows 0 and 1 come
    first among the rows outside K, so the recomputing backward gathers them (the host bound on k
    counts the ignored rows) and must zero them rather than multiply them by 0."""
    dev = target_device(backend)
    x, w, b, t = _head(20, 6, 9, dtype=torch.float64, seed=5)
    x[0] = value
    t[0] = -100  # ignored
    if ratio != 1.0:  # (keep 1.0 keeps every valid row, a NaN loss included)
        x[1, 2] = value  # valid, its loss NaN or inf: trimmed away under "easiest"
    t[[4, 9]] = -100
    if isinstance(ratio, str):
        ratio = torch.tensor(float(ratio.split()[1]), device=dev)
    leaves = [p.to(dtype).to(dev).requires_grad_(True) for p in (x, w, b)]
    out, info = trimmed_linear_cross_entropy(
        leaves[0],
        leaves[1],
        t.to(dev),
        ratio,
        linear_bias=leaves[2],
        keep="easiest",
        backend="triton",
        reduction="sum",
        return_info=True,
        chunk_size=8,
    )
    grads = [g.cpu().double() for g in torch.autograd.grad(out, leaves)]
    kept = info.kept.cpu()
    assert not kept[[0, 4, 9]].any() and int(info.k) == (17 if ratio == 1.0 else 9)  # 17 valid rows
    assert ratio == 1.0 or not kept[1]
    # The oracle: float64 F.cross_entropy summed over the kept rows only.
    ref_leaves = [p.detach().cpu().double().requires_grad_(True) for p in leaves]
    ref = F.cross_entropy(F.linear(ref_leaves[0][kept], *ref_leaves[1:]), t[kept], reduction="sum")
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    assert torch.isfinite(grads[1]).all() and torch.isfinite(grads[2]).all()
    assert torch.all(grads[0][~kept] == 0)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **tol)


@needs_interpreter
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_select_kernel_gets_distinct_output_buffers(monkeypatch, reduction):
    """The per-row output and the scalar result are two buffers, so that no mutation analysis
    (torch.compile's, of ``wrap_triton``) has to decide which of two aliases a kernel wrote."""
    from fused_trim.triton import launch

    seen = []
    real = launch.wrap_triton

    class _Spy:
        def __init__(self, kernel):
            self.kernel, self.launcher = kernel, real(kernel)

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                if self.kernel is launch.select_kernel:
                    seen.append((args[4], args[5]))
                return self.launcher[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(launch, "wrap_triton", _Spy)
    x = torch.randn(12, 5, dtype=torch.float64)
    t = torch.randint(0, 5, (12,))
    out = trimmed_cross_entropy(x, t, 0.5, reduction=reduction, backend="triton")
    assert len(seen) == 1
    per_row, result = seen[0]
    assert per_row.data_ptr() != result.data_ptr()
    assert (per_row if reduction == "none" else result).data_ptr() == out.data_ptr()
