"""``trimmed_linear_cross_entropy`` on every backend against the unfused oracle.

The oracle is ``trimmed_cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` on
the reference backend in float64 (itself held against ``F.cross_entropy`` in test_contract.py), and
with ``keep_ratio=1`` torch's own ``F.linear_cross_entropy``. Every case compares the value, the
per-row losses, the kept set, ``k``, the threshold and the gradients of ``input``, ``linear_weight``
and ``linear_bias`` under a random upstream gradient, and checks that the ``input`` gradient is
exactly zero on rows outside the kept set.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_trim
from benchmarks.lm_head import allocator_peak_bytes
from fused_trim import trimmed_cross_entropy, trimmed_linear_cross_entropy

from .helpers import KERNEL_LM_BACKENDS, LM_BACKENDS, assert_same, leaves, make_head, run_fused, run_unfused, split

SHAPES = [(1, 1, 1), (37, 3, 7), (37, 64, 257), (20, 5, 1003), (64, 1, 13)]
OPTIONS = [
    dict(),
    dict(ignore_frac=0.3),
    dict(label_smoothing=0.1),
    dict(weight=True, ignore_frac=0.2),
    dict(weight=True, label_smoothing=0.2),
    dict(bias=False),
]
REDUCTIONS = ("mean", "sum", "none")


def _case(n, d, v, opts, seed=0):
    opts = dict(opts)
    x, w, b, t = make_head(n, d, v, seed=seed, ignore_frac=opts.pop("ignore_frac", 0.0), bias=opts.pop("bias", True))
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(v, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.1
    return x, w, b, t, opts


# A pairwise covering set, not the full product: every shape meets every option set, and the
# reduction rotates with (shape + option) index, so each reduction also meets every shape and every
# option set. Each case runs both keep directions and two chunk sizes. Triton (in its interpreter
# here, seconds a case) takes the diagonal: every option set once, the shapes and the three
# reductions in turn; the shape x option product is the other backends' (its kernels see the
# shapes again in tests/test_triton_linear_ce.py and tests/test_triton_head_edges.py).
UNFUSED_CASES = [
    (backend, shape, opts, REDUCTIONS[(i + j) % len(REDUCTIONS)])
    for backend in LM_BACKENDS
    for i, shape in enumerate(SHAPES)
    for j, opts in enumerate(OPTIONS)
    if split(backend)[0] != "triton" or i == j % len(SHAPES)
]


@pytest.mark.parametrize(
    "backend, shape, opts, reduction",
    UNFUSED_CASES,
    ids=["x".join(map(str, s)) + "-" + ("-".join(o) or "plain") + f"-{r}-{b}" for b, s, o, r in UNFUSED_CASES],
)
def test_matches_unfused_float64(backend, shape, opts, reduction):
    x, w, b, t, kw = _case(*shape, opts)
    for keep, ratio in (("hardest", 0.3), ("easiest", 0.6)):
        for chunk in (None, 8):
            fused = run_fused(backend, x, w, b, t, ratio, keep=keep, reduction=reduction, chunk_size=chunk, **kw)
            assert_same(fused, run_unfused(x, w, b, t, ratio, keep=keep, reduction=reduction, **kw))


# Every backend runs every option set; the reduction rotates with (backend + option) index, so
# each backend and each option set meets every reduction.
KEEP_ALL_RUNS = [
    (backend, opts, REDUCTIONS[(b + j) % len(REDUCTIONS)])
    for b, backend in enumerate(LM_BACKENDS)
    for j, opts in enumerate(OPTIONS)
]


@pytest.mark.parametrize(
    "backend, opts, reduction",
    KEEP_ALL_RUNS,
    ids=[f"{b}-{'-'.join(o) or 'plain'}-{r}" for b, o, r in KEEP_ALL_RUNS],
)
def test_keep_all_equals_torch_linear_cross_entropy(backend, opts, reduction):
    """keep_ratio=1 is F.linear_cross_entropy (torch 2.13's, the unchunked reference path)."""
    x, w, b, t, kw = _case(29, 6, 11, opts, seed=3)
    out, info, grads = run_fused(backend, x, w, b, t, 1.0, reduction=reduction, chunk_size=7, **kw)
    cpu_leaves = leaves(x, w, b, device=torch.device("cpu"))
    ref = F.linear_cross_entropy(
        cpu_leaves[0],
        cpu_leaves[1],
        t,
        linear_bias=cpu_leaves[2],
        weight=kw.get("weight"),
        reduction=reduction,
        ignore_index=-100,
        label_smoothing=kw.get("label_smoothing", 0.0),
    )
    gen = torch.Generator().manual_seed(0)
    upstream = torch.randn(ref.shape, generator=gen).to(torch.bfloat16).to(ref.dtype)
    ref_grads = torch.autograd.grad(ref, [p for p in cpu_leaves if p is not None], upstream)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-9, atol=1e-11)
    for g, r in zip([g for g in grads if g is not None], ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    assert bool(info.kept.eq(t != -100).all())


@pytest.mark.parametrize("backend", LM_BACKENDS)
def test_batched_input_ties_and_tensor_ratio(backend):
    """(B, T, D) hidden states, duplicated rows (exact ties go to the lower index), a tensor ratio."""
    x, w, b, t = make_head(9, 4, 17, lead=(3,), seed=5, ignore_frac=0.1)
    x[1, 2:6] = x[0, 0]
    t[1, 2:6] = 4
    t[0, 0] = 4
    for ratio in (0.4, torch.tensor(0.4, dtype=torch.float64)):
        fused = run_fused(backend, x, w, b, t, ratio, chunk_size=5)
        assert fused[0].shape == ()
        assert_same(fused, run_unfused(x, w, b, t, 0.4))
        fused = run_fused(backend, x, w, b, t, ratio, reduction="none", keep="easiest")
        assert fused[0].shape == (3, 9)
        assert_same(fused, run_unfused(x, w, b, t, 0.4, reduction="none", keep="easiest"))


@pytest.mark.parametrize("backend", LM_BACKENDS)
def test_all_ignored_and_nan(backend):
    x, w, b, t = make_head(12, 4, 9, seed=2)
    ignored = torch.full_like(t, -100)
    out, info, grads = run_fused(backend, x, w, b, ignored, 0.5)
    assert torch.isnan(out) and int(info.k) == 0 and not info.kept.any()
    assert all(torch.all(g == 0) for g in grads)
    x[4, 1] = float("nan")  # row 4's logits are all NaN: its loss is NaN and ranks first
    fused = run_fused(backend, x, w, b, t, 0.25)
    assert bool(fused[1].kept[4]) and torch.isnan(fused[0])
    assert_same(fused, run_unfused(x, w, b, t, 0.25))


@pytest.mark.parametrize("backend", LM_BACKENDS)
def test_small_losses_at_large_logits_keep_their_precision(backend):
    """``keep="easiest"`` ranks tiny losses: they must be formed relative to the row max."""
    w = torch.eye(2, dtype=torch.float32)  # the logits are exactly the hidden states
    x = torch.tensor([[1000.0, 990.0], [0.0, -9.9], [100.0, 85.0]], dtype=torch.float32)
    t = torch.tensor([0, 0, 0])
    exact = F.cross_entropy(x.double(), t, reduction="none")  # 4.54e-5, 5.02e-5, 3.06e-7
    expect = F.cross_entropy(x, t, reduction="none")  # fp32: log(1 + 3.06e-7) is 2.98e-7 in fp32
    out, info, _ = run_fused(backend, x, w, None, t, 0.67, keep="easiest", reduction="none")
    # No worse than F.cross_entropy's own fp32 (a log1p of s - 1, as the Triton kernels form it, is exact).
    err, torch_err = ((v.double() - exact).abs() / exact for v in (info.losses, expect))
    assert torch.all(err <= torch_err + 1e-4), f"relative errors {err.tolist()}, F.cross_entropy's {torch_err.tolist()}"
    torch.testing.assert_close(info.losses[:2].double(), exact[:2], rtol=1e-3, atol=0)  # lse - x_t: 34%
    assert info.kept.tolist() == [True, False, True]


def _unfused_bf16_error(x, w, b, t, **kw):
    xb, wb, bb = (None if p is None else p.to(torch.bfloat16) for p in (x, w, b))
    out, _, grads = run_unfused(xb, wb, bb, t, **kw)
    ref_out, _, ref_grads = run_unfused(x, w, b, t, **kw)
    return out, grads, ref_out, ref_grads


@pytest.mark.parametrize("backend", LM_BACKENDS)
def test_bf16_no_worse_than_unfused_bf16(backend):
    """bf16 hidden states and head: the error against float64 (from the same bf16-rounded inputs) is
    at most that of the unfused bf16 path ``F.linear`` -> ``trimmed_cross_entropy``."""
    x, w, b, t = make_head(48, 32, 300, seed=7, scale=4.0)
    x, w, b = (p.to(torch.bfloat16).double() for p in (x, w, b))  # exact in bf16
    for ratio in (1.0, 0.5):
        fused = run_fused(backend, x.bfloat16(), w.bfloat16(), b.bfloat16(), t, ratio)
        unfused = run_unfused(x.bfloat16(), w.bfloat16(), b.bfloat16(), t, ratio)
        exact = run_unfused(x, w, b, t, ratio)
        pairs = zip([fused[0], *fused[2]], [unfused[0], *unfused[2]], [exact[0], *exact[2]], strict=True)
        for ours, theirs, truth in pairs:
            err = (ours.double() - truth).abs().max()
            base = (theirs.double() - truth).abs().max()
            scale = truth.abs().max()
            assert err <= base * 1.25 + 1e-3 * scale, f"fused error {err} vs unfused bf16 {base}"


@pytest.mark.parametrize("backend", KERNEL_LM_BACKENDS)
def test_repeatable_bitwise(backend):
    x, w, b, t = make_head(40, 16, 70, dtype=torch.float32, seed=11)
    first = run_fused(backend, x, w, b, t, 0.5, chunk_size=8)
    again = run_fused(backend, x, w, b, t, 0.5, chunk_size=8)
    assert torch.equal(first[0], again[0])
    for g, h in zip(first[2], again[2], strict=True):
        assert torch.equal(g, h)


def test_gradcheck_reference():
    x, w, b, t = make_head(7, 3, 5, seed=1, ignore_frac=0.2)
    x, w, b = leaves(x, w, b, device=torch.device("cpu"))
    for reduction in ("mean", "none"):

        def fn(x, w, b, reduction=reduction):
            return trimmed_linear_cross_entropy(
                x,
                w,
                t,
                0.5,
                linear_bias=b,
                reduction=reduction,
                label_smoothing=0.1,
                backend="reference",
                chunk_size=3,
            )

        assert torch.autograd.gradcheck(fn, (x, w, b))


# Fewer examples than the profile's: each runs every LM-head backend, Triton in its interpreter.
@settings(max_examples=15)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 9),
    v=st.integers(1, 40),
    ratio=st.floats(0.01, 1.0),
    keep=st.sampled_from(["hardest", "easiest"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    chunk=st.integers(1, 50),
    seed=st.integers(0, 2**16),
    smoothing=st.sampled_from([0.0, 0.15]),
)
def test_hypothesis_against_unfused(n, d, v, ratio, keep, reduction, chunk, seed, smoothing):
    x, w, b, t = make_head(n, d, v, seed=seed, ignore_frac=0.2)
    kw = dict(keep=keep, reduction=reduction, label_smoothing=smoothing)
    unfused = run_unfused(x, w, b, t, ratio, **kw)
    for backend in LM_BACKENDS:
        assert_same(run_fused(backend, x, w, b, t, ratio, chunk_size=chunk, **kw), unfused)


BAD_INPUTS = [
    (lambda x, w, b, t: (x[:, :2], w, b, t), ValueError, "D = 2"),
    (lambda x, w, b, t: (x, w, b[:3], t), ValueError, "linear_bias must have shape"),
    (lambda x, w, b, t: (x, w, b, t[:4]), ValueError, "target shape"),
    (lambda x, w, b, t: (x, w.float(), b, t), TypeError, "linear_weight has dtype"),
    (lambda x, w, b, t: (x, w, b, t.double()), TypeError, "target must hold integer"),
    (lambda x, w, b, t: (x, w[0], b, t), ValueError, r"linear_weight must have shape \(V, D\)"),
    (lambda x, w, b, t: (x, w, b, torch.full_like(t, 9)), ValueError, "outside"),
]


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_names_argument(case):
    make, exc, match = BAD_INPUTS[case]
    x, w, b, t = make(*make_head(6, 3, 5))
    with pytest.raises(exc, match=match):
        trimmed_linear_cross_entropy(x, w, t, 0.5, linear_bias=b)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(chunk_size=0), ValueError, "chunk_size must be >= 1, got 0"),
        (dict(chunk_size=2.5), TypeError, "chunk_size"),
        (dict(keep="most"), ValueError, "keep must be one of"),
        (dict(weight=torch.ones(3)), ValueError, "weight must be a 1-D tensor of length C = 5"),
    ],
)
def test_bad_options(kw, exc, match):
    x, w, b, t = make_head(6, 3, 5)
    with pytest.raises(exc, match=match):
        trimmed_linear_cross_entropy(x, w, t, 0.5, linear_bias=b, **kw)


# CPU backends; Triton runs in its interpreter here, whose numpy buffers are not the GPU kernels' memory.
@pytest.mark.parametrize("backend", [b for b in LM_BACKENDS if b in ("reference", "native")])
def test_peak_memory_does_not_grow_with_logits(backend):
    """Peak memory of one step at V = 2000 and V = 8000 (N = 4096, D = 32): the (N, V) fp32 logits
    would add 94 MiB between the two (the unfused path grows from 94 to 375 MiB); what must grow
    with V (the head's gradient, the chunk buffers) adds a few MiB."""
    peaks, unfused = [], []
    name = split(backend)[0]
    for v in (2000, 8000):
        x, w, _, t = make_head(4096, 32, v, dtype=torch.float32, bias=False)
        x, w = leaves(x, w, device=torch.device("cpu"))
        peaks.append(
            allocator_peak_bytes(
                lambda x=x, w=w, t=t: trimmed_linear_cross_entropy(x, w, t, 0.5, backend=name, chunk_size=64).backward()
            )
        )
        unfused.append(allocator_peak_bytes(lambda x=x, w=w, t=t: F.cross_entropy(F.linear(x, w), t).backward()))
    logits_growth = 4096 * 6000 * 4
    assert unfused[1] - unfused[0] > logits_growth  # the measurement sees the logits where they exist
    assert peaks[1] - peaks[0] < logits_growth / 8, f"peak grew by {(peaks[1] - peaks[0]) / 2**20:.1f} MiB"


COMPILE_LM_BACKENDS = [b for b in KERNEL_LM_BACKENDS if b in ("native", "triton@cuda", "native@cuda")]


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab=40, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.body = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU())
        self.lm_head = torch.nn.Linear(dim, vocab)


@pytest.mark.skipif(not COMPILE_LM_BACKENDS, reason="no compiled LM-head backend here")
@pytest.mark.parametrize("backend", COMPILE_LM_BACKENDS)
def test_module_compiles_fullgraph_and_follows_a_schedule(backend):
    """A small LM whose head is TrimmedLinearCrossEntropyLoss: torch.compile(fullgraph=True) gives
    the eager loss and gradients at every epoch of a schedule, with one compile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    name, dev = split(backend)
    torch.manual_seed(0)
    model = _TinyLM().to(dev)
    criterion = fused_trim.TrimmedLinearCrossEntropyLoss(
        model.lm_head.weight,
        fused_trim.LinearSchedule(epochs=4),
        linear_bias=model.lm_head.bias,
        backend=name,
        label_smoothing=0.05,
    )
    tokens = torch.randint(0, 40, (3, 11), device=dev)

    def step(tokens):
        hidden = model.body(model.embed(tokens[:, :-1]))
        return criterion(hidden, tokens[:, 1:])

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for epoch in range(4):
        criterion.set_epoch(epoch)
        results = []
        for fn in (compiled, step):
            model.zero_grad(set_to_none=True)
            loss = fn(tokens)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(results[0][0], results[1][0])
        for a, b in zip(results[0][1], results[1][1], strict=True):
            torch.testing.assert_close(a, b)
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for 4 keep ratios"


def test_module_holds_the_head_by_reference_and_validates():
    model = _TinyLM()
    criterion = fused_trim.TrimmedLinearCrossEntropyLoss(model.lm_head.weight, 0.5, backend="reference")
    assert list(criterion.parameters()) == []  # the head's weight stays the model's
    hidden, target = torch.randn(2, 7, 16), torch.randint(0, 40, (2, 7))
    loss = criterion(hidden, target)
    expect = trimmed_linear_cross_entropy(hidden, model.lm_head.weight, target, 0.5, backend="reference")
    torch.testing.assert_close(loss, expect)
    assert int(criterion.info.k) == 7 and criterion.info.kept.shape == (2, 7)
    with pytest.raises(ValueError, match="linear_weight is None"):
        fused_trim.TrimmedLinearCrossEntropyLoss(backend="reference")(hidden, target)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fused_trim.TrimmedLinearCrossEntropyLoss(model.lm_head.weight, chunk_size=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_trim.TrimmedLinearCrossEntropyLoss(model.lm_head.weight, backend="cuda")


def _offset_cases(t, seed):
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randn(t.shape, generator=gen, dtype=torch.float64)
    offset[..., 1] = float("nan")  # a NaN score ranks first
    offset[..., 2] = float("inf")  # -inf score: last for "hardest", first for "easiest"
    offset[..., 3:6] = offset[..., 6]  # ties in the offset
    return offset


@pytest.mark.parametrize("backend", LM_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_score_offset_matches_unfused(backend, reduction):
    """Ranking by ``l_i - score_offset_i`` (selective language modelling): the kept set, the value
    (of the plain losses), the threshold (the k-th score), ``info.scores`` and the gradients are those
    of ``trimmed_cross_entropy(F.linear(...), score_offset=...)``."""
    x, w, b, t = make_head(8, 5, 23, seed=4, ignore_frac=0.15, lead=(3,))
    x[1, 3:5] = x[0, 0]  # identical rows: ties unless the offset separates them
    t[1, 3:5] = t[0, 0]
    offset = _offset_cases(t, 9)
    for keep, ratio in (("hardest", 0.4), ("easiest", 0.6)):
        kw = dict(keep=keep, reduction=reduction, label_smoothing=0.1, score_offset=offset)
        fused = run_fused(backend, x, w, b, t, ratio, chunk_size=5, **kw)
        unfused = run_unfused(x, w, b, t, ratio, **{**kw, "score_offset": offset.reshape(-1)})
        assert_same(fused, unfused)
        expect_scores = unfused[1].scores.reshape(t.shape)
        torch.testing.assert_close(fused[1].scores.double(), expect_scores.double(), equal_nan=True)


@pytest.mark.parametrize("backend", LM_BACKENDS)
def test_zero_score_offset_is_no_offset_bitwise(backend):
    x, w, b, t = make_head(30, 6, 40, dtype=torch.float32, seed=8, ignore_frac=0.1)
    plain = run_fused(backend, x, w, b, t, 0.5)
    zero = run_fused(backend, x, w, b, t, 0.5, score_offset=torch.zeros(t.shape))
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1].kept, zero[1].kept)
    for g, h in zip(plain[2], zero[2], strict=True):
        assert torch.equal(g, h)
    assert plain[1].scores is None and torch.equal(zero[1].scores, zero[1].losses.float())


def test_score_offset_bad_input_names_it():
    x, w, b, t = make_head(6, 3, 5)
    with pytest.raises(ValueError, match="score_offset shape"):
        trimmed_linear_cross_entropy(x, w, t, 0.5, score_offset=torch.zeros(5))
    with pytest.raises(TypeError, match="score_offset must be a floating-point"):
        trimmed_linear_cross_entropy(x, w, t, 0.5, score_offset=torch.zeros(6, dtype=torch.int64))


CPU_LM_BACKENDS = [b for b in LM_BACKENDS if b in ("reference", "native")]


@pytest.mark.parametrize("backend", CPU_LM_BACKENDS)
@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
def test_infinite_logits_match_unfused(backend, keep_ratio):
    """±inf logits (from the bias, and from an infinite hidden state at D = 1): NaN where
    F.cross_entropy gives NaN (+inf logits), +inf for a -inf target logit; ranked as the oracle ranks."""
    inf = float("inf")
    x, w, b, t = make_head(9, 3, 6, seed=1)
    b[2], b[4] = inf, -inf
    t[3], t[5] = 2, 4  # a target at +inf (NaN loss) and one at -inf (+inf loss)
    x1, w1, b1, t1 = make_head(7, 1, 5, seed=2)
    x1[2, 0], x1[5, 0] = inf, -inf
    for reduction in ("mean", "sum", "none"):
        for args in ((x, w, b, t), (x1, w1, b1, t1)):
            fused = run_fused(backend, *args, keep_ratio, reduction=reduction)
            assert_same(fused, run_unfused(*args, keep_ratio, reduction=reduction))


def _bf16_ulps(g: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest error of ``g`` in units of the last place of bf16 at ``exact``."""
    exponent = torch.floor(torch.log2(exact.abs().clamp_min(1e-30)))
    return float(((g.double() - exact) / 2 ** (exponent - 7)).abs().max())


@pytest.mark.parametrize("backend", CPU_LM_BACKENDS)
@pytest.mark.parametrize("keep_ratio", [1.0, 0.6])
def test_bf16_head_gradient_rounded_once_whatever_the_chunk_size(backend, keep_ratio):
    """d linear_weight and d linear_bias are summed over the chunks in fp32 and rounded once: at
    chunk sizes 1, 7 and the default they are the float64 gradient correctly rounded (≤ 1 ulp)."""
    x, w, b, t = make_head(64, 16, 40, seed=3, ignore_frac=0.1)
    xs = [v.to(torch.bfloat16) for v in (x, w, b)]
    _, _, exact = run_fused("reference", *[v.double() for v in xs], t, keep_ratio)
    for chunk_size in (1, 7, None):
        _, _, grads = run_fused(backend, *xs, t, keep_ratio, chunk_size=chunk_size)
        for name, g, e in zip(("linear_weight", "linear_bias"), grads[1:], exact[1:], strict=True):
            assert _bf16_ulps(g, e) <= 1.0, f"{name} at chunk_size={chunk_size}: {_bf16_ulps(g, e):.1f} ulp"


@pytest.mark.parametrize("backend", LM_BACKENDS)
def test_equal_rows_tie_across_chunk_boundaries(backend):
    """Bitwise equal rows with equal targets get bitwise equal losses wherever the chunks split
    them, so ties go to the lower index: N = 3, chunk_size = 2, rows 1 and 2 equal; then random
    placements of duplicates among random rows at random chunk sizes."""
    gen = torch.Generator().manual_seed(5)
    few, many = (20, 10) if backend in CPU_LM_BACKENDS else (6, 4)  # interpreted Triton is slow
    for draw in range(few):
        x, w, b, t = make_head(3, 24, 50, dtype=torch.float32, seed=draw)
        x[2], t[2], t[0] = x[1], t[1], -100
        _, info, _ = run_fused(backend, x, w, b, t, 0.5, chunk_size=2)
        assert info.losses[1] == info.losses[2], f"draw {draw}: {info.losses.tolist()}"
        assert info.kept.tolist() == [False, True, False], f"draw {draw}"
    for draw in range(many):
        n = int(torch.randint(8, 40, (), generator=gen))
        x, w, b, t = make_head(n, 24, 50, dtype=torch.float32, seed=100 + draw)
        src = torch.randint(0, n, (3,), generator=gen)
        for s in src.tolist():
            dst = torch.randint(0, n, (3,), generator=gen)
            x[dst], t[dst] = x[s].clone(), t[s].clone()
        chunk = int(torch.randint(1, n, (), generator=gen))
        for keep in ("hardest", "easiest"):
            _, info, _ = run_fused(backend, x, w, b, t, 0.5, chunk_size=chunk, keep=keep)
            for i in range(n):
                for j in range(i + 1, n):
                    if torch.equal(x[i], x[j]) and t[i] == t[j]:
                        assert info.losses[i] == info.losses[j], f"draw {draw}: rows {i}, {j}, chunk {chunk}"
                        assert info.kept[i] or not info.kept[j], f"draw {draw}: row {j} kept before {i}"


@pytest.mark.parametrize("block_elems", [1, 7, 64, 1 << 22])
def test_first_equal_rows_in_blocks(block_elems):
    """Every row maps to the lowest index of its bitwise-equal duplicates (equal target too),
    whatever the block size of the hash and the comparison: against a Python double loop, on a
    strided view with -0.0/+0.0 rows (bitwise unequal) and duplicates with different targets."""
    from fused_trim._common import first_equal_rows

    gen = torch.Generator().manual_seed(0)
    base = torch.randint(-2, 3, (37, 5), generator=gen).float()
    base[3] = -0.0
    base[4] = 0.0
    x = torch.empty(37, 12)[:, ::2][:, :5]
    x.copy_(base[torch.randint(0, 9, (37,), generator=gen)])
    t = torch.randint(0, 2, (37,), generator=gen)
    expect = [
        next(j for j in range(i + 1) if torch.equal(x[j].view(torch.int32), x[i].view(torch.int32)) and t[j] == t[i])
        for i in range(37)
    ]
    got = first_equal_rows(x, t, block_elems=block_elems)
    assert got.tolist() == expect
    assert sum(e != i for i, e in enumerate(expect)) > 10  # the draw has duplicates to find


def _kept_oracle(x, w, b, t, kept, reduction, grad_seed=0, **kw):
    """The float64 loss and gradients of the rows in ``kept`` alone (``F.linear`` +
    ``F.cross_entropy``), under the upstream gradient :func:`run_fused` draws."""
    x, w, b = leaves(x, w, b, device=torch.device("cpu"))
    idx = kept.nonzero()[:, 0]
    losses = F.cross_entropy(F.linear(x[idx], w, b), t[idx], reduction="none", **kw)
    if reduction == "none":
        out = torch.zeros(t.shape, dtype=losses.dtype).index_put((idx,), losses)
    elif reduction == "sum":
        out = losses.sum()
    else:
        out = losses.sum() / (idx.numel() if kw.get("weight") is None else kw["weight"][t[idx]].sum())
    gen = torch.Generator().manual_seed(grad_seed)
    upstream = torch.randn(out.shape, generator=gen).to(torch.bfloat16).to(out.dtype)
    return list(torch.autograd.grad(out, [x, w, b], upstream))


@pytest.mark.parametrize("backend", CPU_LM_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rows_outside_the_kept_set_reach_no_gradient(backend, reduction, bad):
    """A NaN/inf hidden state on an ignored row (keep 1.0: the forward forms the gradient; 0.5)
    and on a row trimmed away (``keep="easiest"`` drops its NaN loss) adds exactly nothing to
    ``linear_weight.grad`` and ``linear_bias.grad``."""
    x, w, b, t = make_head(11, 5, 13, seed=7)
    weight = torch.rand(13, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) + 0.1
    x[3] = bad
    t[3] = -100  # ignored
    x[6, 2] = bad  # valid: its loss is NaN, dropped by "easiest"
    for keep_ratio, keep in ((1.0, "hardest"), (0.5, "hardest"), (0.5, "easiest"), (1.0, "easiest")):
        trimmed = keep == "easiest" and keep_ratio < 1.0
        row6 = t.clone()
        if not trimmed:
            row6[6] = -100  # only the trimming case keeps row 6 valid
        _, info, grads = run_fused(backend, x, w, b, row6, keep_ratio, keep=keep, reduction=reduction, weight=weight)
        assert not info.kept[3] and not info.kept[6]
        expected = _kept_oracle(x, w, b, row6, info.kept, reduction, weight=weight)
        for name, g, e in zip(("input", "linear_weight", "linear_bias"), grads, expected, strict=True):
            assert torch.isfinite(g).all(), f"{name}.grad holds {g[~torch.isfinite(g)][:3].tolist()}"
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=name)


def _grads_of_views(backend, bases, views, t, keep_ratio, unfused=False, **kw):
    """Loss, info and the gradients of the *storage* tensors ``bases`` of a call on ``views(*bases)``
    (strided input, head and bias as the op receives them); ``unfused``: the oracle on the same views."""
    leaves = [v.clone().requires_grad_(True) for v in bases]
    x, w, b = views(*leaves)
    if unfused:
        out, info = trimmed_cross_entropy(F.linear(x, w, b), t, keep_ratio, backend="reference", return_info=True, **kw)
    else:
        out, info = trimmed_linear_cross_entropy(
            x, w, t, keep_ratio, linear_bias=b, backend=backend, return_info=True, **kw
        )
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return out.detach(), info, torch.autograd.grad(out, leaves, upstream)


_N, _D, _V = 13, 6, 11
STRIDED = {
    "bias-every-second": (
        lambda g: (
            torch.randn(_N, _D, generator=g),
            torch.randn(_V, _D, generator=g) / 3,
            torch.randn(2 * _V, generator=g),
        ),
        lambda x, w, b: (x, w, b[::2]),
    ),
    "bias-column-of-matrix": (
        lambda g: (
            torch.randn(_N, _D, generator=g),
            torch.randn(_V, _D, generator=g) / 3,
            torch.randn(_V, 3, generator=g),
        ),
        lambda x, w, b: (x, w, b[:, 1]),
    ),
    "weight-transposed-storage": (
        lambda g: (
            torch.randn(_N, _D, generator=g),
            torch.randn(_D, _V, generator=g) / 3,
            torch.randn(_V, generator=g),
        ),
        lambda x, w, b: (x, w.t(), b),
    ),
    "weight-slice": (
        lambda g: (
            torch.randn(_N, _D, generator=g),
            torch.randn(_V + 3, 2 * _D, generator=g) / 3,
            torch.randn(_V, generator=g),
        ),
        lambda x, w, b: (x, w[2 : _V + 2, ::2], b),
    ),
    "input-non-contiguous": (
        lambda g: (
            torch.randn(_D, 2 * _N, generator=g),
            torch.randn(_V, _D, generator=g) / 3,
            torch.randn(_V, generator=g),
        ),
        lambda x, w, b: (x.t()[::2], w, b),
    ),
}


@pytest.mark.parametrize("backend", CPU_LM_BACKENDS)
@pytest.mark.parametrize("case", sorted(STRIDED))
@pytest.mark.parametrize("keep_ratio", [1.0, 0.4])
def test_strided_head_bias_and_input(backend, case, keep_ratio):
    """Views as the op's operands (a bias ``b[::2]`` or a matrix column, a weight stored transposed
    or sliced, a non-contiguous input) give the unfused result on the same views, in float64."""
    make, views = STRIDED[case]
    bases = [v.double() for v in make(torch.Generator().manual_seed(11))]
    t = torch.randint(0, _V, (_N,), generator=torch.Generator().manual_seed(12))
    t[4] = -100
    for reduction in ("mean", "none"):
        out, info, grads = _grads_of_views(backend, bases, views, t, keep_ratio, reduction=reduction)
        r_out, r_info, r_grads = _grads_of_views(backend, bases, views, t, keep_ratio, True, reduction=reduction)
        assert torch.equal(info.kept, r_info.kept)
        torch.testing.assert_close(out, r_out, rtol=1e-9, atol=1e-11)
        for g, r in zip(grads, r_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", CPU_LM_BACKENDS)
@pytest.mark.parametrize("op", ["ce", "linear_ce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_ignored_gives_zero_gradients(backend, op, dtype):
    """Every target ignored, at every ratio (1.0 included: the LM head then forms its gradient in
    the forward) and reduction: the loss is what F.cross_entropy gives (NaN mean, 0 sum, zeros),
    and every gradient is exactly zero."""
    x, w, b, t = make_head(10, 4, 7, dtype=dtype, seed=4)
    t[:] = -100
    for keep_ratio in (1.0, 0.5, torch.tensor(0.3)):
        for reduction in ("mean", "sum", "none"):
            xs, ws, bs = leaves(x, w, b, device=torch.device("cpu"))
            if op == "ce":
                out = trimmed_cross_entropy(F.linear(xs, ws, bs), t, keep_ratio, reduction=reduction, backend=backend)
            else:
                out = trimmed_linear_cross_entropy(
                    xs, ws, t, keep_ratio, linear_bias=bs, reduction=reduction, backend=backend
                )
            expected = F.cross_entropy(F.linear(x, w, b).float(), t, reduction=reduction).to(dtype)
            torch.testing.assert_close(out, expected, equal_nan=True)
            assert out.dtype == dtype
            for p, g in zip((xs, ws, bs), torch.autograd.grad(out, (xs, ws, bs), torch.ones_like(out)), strict=True):
                assert g.dtype == p.dtype and torch.all(g == 0), f"ratio {keep_ratio}, {reduction}"
