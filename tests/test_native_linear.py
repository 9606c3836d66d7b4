"""The native CPU LM head (``csrc/linear_ce_cpu.cpp``) beyond what tests/test_linear_ce.py checks on
every backend: shapes that cut the GEMMs into several class tiles and d input into several class
blocks, bitwise repeatability across thread counts, fp16, partial gradients, ``retain_graph`` and
``torch.compile``. Cases with ``keep_ratio=1.0`` run both ways of forming the gradient: recomputed in
the backward and in the forward (``linear_ce_keep_all``, the default there)."""

from __future__ import annotations

import functools

import pytest
import torch

from fused_trim import native, trimmed_linear_cross_entropy

from .helpers import assert_same, make_head, run_fused, run_unfused

pytestmark = pytest.mark.skipif(not native.is_available(torch.device("cpu")), reason="native op not built")

# V = 5000 classes: 5 GEMM tiles of 1024 classes, d input summed over 4 class blocks (D = 3),
# so every tile/block boundary and the block-order sum are exercised.
TILED = (37, 3, 5000)


@pytest.fixture(params=[False, True], ids=["recompute", "keep-all"])
def keep_all(request, monkeypatch):
    """Whether keep_ratio=1.0 may form the gradient in the forward: the dispatch calls the entry
    point bound to ``gradient_in_forward=False`` for the recomputing path."""
    if not request.param:
        entry = functools.partial(native.trimmed_linear_cross_entropy_2d, gradient_in_forward=False)
        monkeypatch.setattr(native, "trimmed_linear_cross_entropy_2d", entry)
    return request.param


@pytest.mark.parametrize("chunk", [1, 10, 37, 64])
@pytest.mark.parametrize("ratio", [0.3, 1.0])
@pytest.mark.parametrize(
    "opts",
    [dict(), dict(ignore_frac=0.3, weight=True, label_smoothing=0.1), dict(bias=False, reduction="none")],
    ids=["plain", "weight-smoothing-ignore", "nobias-none"],
)
def test_tiled_shapes_match_unfused_float64(chunk, ratio, opts, keep_all):
    opts = dict(opts)
    x, w, b, t = make_head(*TILED, seed=3, ignore_frac=opts.pop("ignore_frac", 0.0), bias=opts.pop("bias", True))
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(TILED[2], generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.1
    for keep in ("hardest", "easiest"):
        fused = run_fused("native", x, w, b, t, ratio, keep=keep, chunk_size=chunk, **opts)
        assert_same(fused, run_unfused(x, w, b, t, ratio, keep=keep, **opts))


@pytest.mark.parametrize("n, d, v", [(1, 1, 1), (1, 64, 7), (37, 1, 2049), (5, 64, 1)])
def test_odd_shapes_every_path(n, d, v, keep_all):
    """Single rows, single features, a single class, a class count one past two tiles."""
    x, w, b, t = make_head(n, d, v, seed=n + d + v)
    for ratio in (0.5, 1.0):
        for reduction in ("mean", "sum", "none"):
            fused = run_fused("native", x, w, b, t, ratio, reduction=reduction, chunk_size=4)
            assert_same(fused, run_unfused(x, w, b, t, ratio, reduction=reduction))


@pytest.mark.parametrize("ratio", [0.4, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bitwise_repeatable_across_thread_counts(ratio, reduction, keep_all):
    """The GEMMs run as fixed tiles (one single-threaded BLAS call each) and d input adds a fixed
    number of class blocks in order: the same bits with 1, 2 or 3 threads and on every run."""
    x, w, b, t = make_head(53, 24, 4100, dtype=torch.float32, seed=9, ignore_frac=0.1)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 2):
            torch.set_num_threads(threads)
            results.append(
                run_fused("native", x, w, b, t, ratio, reduction=reduction, chunk_size=16, label_smoothing=0.05)
            )
    finally:
        torch.set_num_threads(before)
    first_out, first_info, first_grads = results[0]
    for out, info, grads in results[1:]:
        assert torch.equal(out, first_out)
        assert torch.equal(info.losses, first_info.losses) and torch.equal(info.kept, first_info.kept)
        for g, h in zip(grads, first_grads, strict=True):
            assert torch.equal(g, h)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_half_inputs_no_worse_than_unfused(dtype, ratio, keep_all):
    """fp16/bf16 head (converted to fp32 a chunk at a time, never a half-precision GEMM): the error
    against float64 from the same rounded inputs is at most that of F.linear -> trimmed_cross_entropy
    in that dtype, for the value and every gradient."""
    x, w, b, t = make_head(40, 32, 1500, seed=5, scale=4.0, ignore_frac=0.1)
    x, w, b = (p.to(dtype).double() for p in (x, w, b))  # exactly representable
    fused = run_fused("native", x.to(dtype), w.to(dtype), b.to(dtype), t, ratio, chunk_size=16)
    unfused = run_unfused(x.to(dtype), w.to(dtype), b.to(dtype), t, ratio)
    exact = run_unfused(x, w, b, t, ratio)
    assert fused[0].dtype == dtype and all(g.dtype == dtype for g in fused[2])
    assert torch.equal(fused[1].kept, exact[1].kept)
    for ours, theirs, truth in zip(
        [fused[0], *fused[2]], [unfused[0], *unfused[2]], [exact[0], *exact[2]], strict=True
    ):
        err = (ours.double() - truth).abs().max()
        base = (theirs.double() - truth).abs().max()
        assert err <= base * 1.25 + 1e-3 * truth.abs().max(), f"fused error {err} vs unfused {base}"
    dx = fused[2][0]
    assert torch.all(dx[~fused[1].kept] == 0)


@pytest.mark.parametrize("ratio", [0.5, 1.0])
@pytest.mark.parametrize("wanted", ["input", "weight", "bias", "weight+bias"])
def test_partial_gradients(ratio, wanted, keep_all):
    """Only some of input / linear_weight / linear_bias require grad (a frozen head, frozen hidden
    states): those gradients equal the unfused ones and the others stay None."""
    x, w, b, t = make_head(21, 5, 300, seed=2, ignore_frac=0.2)
    leaves = {
        name: p.clone().requires_grad_(name in wanted)
        for name, p in zip(("input", "weight", "bias"), (x, w, b), strict=True)
    }
    out = trimmed_linear_cross_entropy(
        leaves["input"], leaves["weight"], t, ratio, linear_bias=leaves["bias"], backend="native", chunk_size=6
    )
    out.backward()
    ref_leaves = {
        name: p.clone().requires_grad_(True) for name, p in zip(("input", "weight", "bias"), (x, w, b), strict=True)
    }
    ref = trimmed_linear_cross_entropy(
        ref_leaves["input"],
        ref_leaves["weight"],
        t,
        ratio,
        linear_bias=ref_leaves["bias"],
        backend="reference",
        chunk_size=6,
    )
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    for name in ("input", "weight", "bias"):
        if name in wanted:
            torch.testing.assert_close(leaves[name].grad, ref_leaves[name].grad, rtol=1e-9, atol=1e-11)
        else:
            assert leaves[name].grad is None


def test_backward_twice_with_retain_graph(keep_all):
    """A second backward gives the same result (the keep-all path keeps its unscaled gradient)."""
    x, w, b, t = make_head(30, 6, 200, seed=8)
    x, w, b = (p.clone().requires_grad_(True) for p in (x, w, b))
    out = trimmed_linear_cross_entropy(x, w, t, 1.0, linear_bias=b, backend="native", chunk_size=7)
    first = torch.autograd.grad(out, (x, w, b), torch.tensor(0.5, dtype=out.dtype), retain_graph=True)
    second = torch.autograd.grad(out, (x, w, b), torch.tensor(0.5, dtype=out.dtype))
    for g, h in zip(first, second, strict=True):
        assert torch.equal(g, h)


@pytest.mark.parametrize("ratio", [0.3, 1.0])
def test_compile_fullgraph_matches_eager(ratio, keep_all):
    """torch.compile(fullgraph=True) traces both paths (rows/trimmed/bwd ops and the keep-all op)."""
    x, w, b, t = make_head(19, 8, 50, dtype=torch.float32, seed=4, ignore_frac=0.2)

    def step(x, w, b):
        return trimmed_linear_cross_entropy(
            x, w, t, ratio, linear_bias=b, backend="native", chunk_size=5, label_smoothing=0.1
        )

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        leaves = [p.clone().requires_grad_(True) for p in (x, w, b)]
        out = fn(*leaves)
        out.backward()
        results.append((out.detach(), [p.grad for p in leaves]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for g, h in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(g, h)


def _ops_run(ratio, reduction, grad=True):
    """The fused_trim ops that one forward + backward runs by default (no monkeypatching)."""
    x, w, b, t = make_head(24, 5, 300, dtype=torch.float32, seed=9, ignore_frac=0.2)
    x, w = (p.clone().requires_grad_(grad) for p in (x, w))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = trimmed_linear_cross_entropy(
            x, w, t, ratio, linear_bias=b, backend="native", chunk_size=7, reduction=reduction
        )
        if grad:
            out.sum().backward()
    return {e.key for e in prof.key_averages() if e.key.startswith("fused_trim::")}


@pytest.mark.parametrize(
    "ratio, reduction, grad, keep_all_op",
    [
        (1.0, "mean", True, True),
        (1.0, "sum", True, True),
        (1.0, "none", True, False),
        (0.9, "mean", True, False),
        (1.0, "mean", False, False),
    ],
    ids=["1.0-mean", "1.0-sum", "1.0-none", "0.9", "1.0-no-grad"],
)
def test_default_path(ratio, reduction, grad, keep_all_op):
    """By default a Python float keep_ratio of 1.0 with mean/sum and a gradient forms the gradient in
    the forward (linear_ce_keep_all, no recomputing backward); everything else runs the rows op and
    recomputes the kept rows in the backward (as the docstrings say)."""
    ops = _ops_run(ratio, reduction, grad)
    if keep_all_op:
        assert "fused_trim::linear_ce_keep_all" in ops and "fused_trim::linear_ce_bwd" not in ops, ops
    else:
        assert "fused_trim::linear_ce_keep_all" not in ops and "fused_trim::linear_ce_rows" in ops, ops
        assert ("fused_trim::linear_ce_bwd" in ops) == grad, ops


def test_keep_all_peak_memory_does_not_grow_with_logits():
    """The keep-all path at keep_ratio=1.0 holds chunk_size x V logits, never (N, V): its peak grows
    from V = 2000 to V = 8000 (N = 4096, D = 32) by far less than the 94 MiB the logits would add."""
    from benchmarks.lm_head import allocator_peak_bytes

    peaks = []
    for v in (2000, 8000):
        x, w, _, t = make_head(4096, 32, v, dtype=torch.float32, bias=False)
        x, w = (p.clone().requires_grad_(True) for p in (x, w))

        def step(x=x, w=w, t=t):
            trimmed_linear_cross_entropy(x, w, t, 1.0, backend="native", chunk_size=64).backward()

        peaks.append(allocator_peak_bytes(step))
    assert peaks[1] - peaks[0] < 4096 * 6000 * 4 / 8, f"peak grew by {(peaks[1] - peaks[0]) / 2**20:.1f} MiB"
