"""``score_offset``: rank by ``l_i - score_offset_i`` (Rho-1's excess loss), reduce and differentiate
the plain ``l_i`` over the kept set. Every backend against a float64 oracle that ranks with a stable
sort (ties to the lower index, NaN first as ``torch.sort`` orders it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fused_trim import TrimmedCrossEntropyLoss, trimmed_cross_entropy

from .helpers import BACKENDS, assert_close, call, make_batch, run, split

TRITON = [b for b in BACKENDS if b.startswith("triton")]


def oracle(
    x,
    t,
    offset,
    keep_ratio,
    keep="hardest",
    reduction="mean",
    weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    scores=None,
):
    """float64: ``(out, grad, kept, k, threshold)`` under :func:`helpers.run`'s upstream gradient.

    Ranks ``scores`` when given (the values a backend ranked, for low-precision inputs), else
    ``F.cross_entropy(x.double()) - offset.double()``.
    """
    x = x.detach().double().requires_grad_(True)
    w = None if weight is None else weight.double()
    losses = F.cross_entropy(
        x, t, w, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    ).reshape(-1)
    if scores is None:
        scores = losses.detach() - offset.double().reshape(-1)
    scores = scores.double().reshape(-1)
    flat_t = t.reshape(-1)
    valid = flat_t != ignore_index
    n = int(valid.sum())
    r = float(keep_ratio)
    k = 0 if n == 0 else min(n, max(1, int(torch.floor(torch.tensor(r * n + 0.5, dtype=torch.float64)))))
    cand = valid.nonzero()[:, 0]
    order = torch.sort(scores[cand], descending=keep == "hardest", stable=True).indices
    idx = cand[order[:k]]
    kept = torch.zeros_like(valid)
    kept[idx] = True
    threshold = scores[idx[-1]] if k else torch.tensor(float("nan"), dtype=torch.float64)
    if reduction == "none":
        out = torch.zeros_like(losses).index_put((idx,), losses[idx]).reshape(t.shape)
    elif reduction == "sum":
        out = losses[idx].sum()
    else:
        w_y = torch.ones_like(losses) if w is None else w[flat_t.clamp(min=0)]
        out = losses[idx].sum() / w_y[idx].sum()
    gen = torch.Generator().manual_seed(0)
    upstream = torch.randn(out.shape, generator=gen).to(torch.bfloat16).to(out.dtype)
    (grad,) = torch.autograd.grad(out, x, upstream)
    return out.detach(), grad, kept.reshape(t.shape), k, threshold


def check(backend, x, t, offset, keep_ratio=0.4, dtype=torch.float64, **kw):
    """One backend against the oracle: kept set, k, threshold, scores, loss and gradient."""
    out, info, grad = run(backend, x, t, keep_ratio, score_offset=offset, **kw)
    exact = dtype == torch.float64
    ref_out, ref_grad, ref_kept, ref_k, ref_thr = oracle(
        x, t, offset, keep_ratio, scores=None if exact else info.scores, **kw
    )
    assert torch.equal(info.kept, ref_kept), (info.kept.nonzero()[:, 0], ref_kept.nonzero()[:, 0])
    assert int(info.k) == ref_k
    assert info.scores is not None and info.scores.shape == t.shape
    fresh = F.cross_entropy(
        x.double(),
        t,
        None if kw.get("weight") is None else kw["weight"].double(),
        ignore_index=kw.get("ignore_index", -100),
        label_smoothing=kw.get("label_smoothing", 0.0),
        reduction="none",
    )
    valid = t != kw.get("ignore_index", -100)
    assert_close(info.scores[valid], (fresh - offset.double())[valid], dtype)
    assert_close(info.threshold, ref_thr, dtype)
    assert_close(out, ref_out, dtype)
    assert_close(grad, ref_grad, dtype)
    # Exactly zero gradient outside the kept set (rows, or pixels of a map).
    outside = ~info.kept.unsqueeze(1).expand_as(grad) if grad.dim() > 1 else ~info.kept.expand_as(grad)
    assert torch.all(grad[outside] == 0)
    return out, info, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_oracle(backend, keep, reduction):
    x, t = make_batch(40, 9, ignore_frac=0.25, seed=1)
    offset = torch.randn(40, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    offset[t == -100] = float("-inf")  # ranked first if an ignored sample could be kept: it never is
    _, info, _ = check(backend, x, t, offset, 0.35, keep=keep, reduction=reduction)
    assert not info.kept[t == -100].any()
    # The offset changes the kept set here (else the test would not show it is used).
    plain = trimmed_cross_entropy(x, t, 0.35, keep=keep, backend="reference", return_info=True)[1]
    assert not torch.equal(plain.kept, info.kept)
    assert plain.scores is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_weight_and_label_smoothing(backend, keep):
    x, t = make_batch(33, 6, ignore_frac=0.2, seed=5)
    weight = torch.rand(6, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 0.2
    offset = torch.randn(33, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    check(backend, x, t, offset, 0.5, keep=keep, weight=weight, label_smoothing=0.15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_ties_from_identical_rows_and_offsets_go_to_the_lower_index(backend, keep):
    gen = torch.Generator().manual_seed(3)
    patterns = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    which = torch.randint(0, 3, (48,), generator=gen)
    x, t = patterns[which].clone(), which.clone()
    offset = torch.tensor([0.0, 0.5, -0.25], dtype=torch.float64)[which]  # equal rows, equal offsets
    offset[::7] = -0.0  # -0.0 and +0.0 are one value
    for ratio in (0.1, 0.5, 0.9):
        check(backend, x, t, offset, ratio, keep=keep, reduction="sum")
    # Every score tied (the offset is each sample's own loss): the first k valid samples by index.
    name, dev = split(backend)
    losses = call(backend, x, t, 1.0, reduction="none", return_info=True)[1].losses.to(dev)
    out, info = call(backend, x, t, 0.25, keep=keep, score_offset=losses, return_info=True)
    assert torch.all(info.scores == 0)
    assert info.kept.cpu().nonzero()[:, 0].tolist() == list(range(12))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_nan_and_infinite_offsets(backend, keep):
    x, t = make_batch(30, 4, ignore_frac=0.1, seed=8)
    offset = torch.randn(30, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    offset[[2, 11, 19]] = float("nan")  # NaN scores: first under "hardest", last under "easiest"
    offset[[4, 5]] = float("inf")  # score -inf
    offset[[7, 23]] = float("-inf")  # score +inf
    for ratio in (0.1, 0.5, 0.95):
        out, info, grad = check(backend, x, t, offset, ratio, keep=keep)
        assert torch.isfinite(out) and torch.isfinite(grad).all()  # reduced: the plain losses


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_segmentation_map_with_an_offset_map(backend, keep):
    x, t = make_batch(2, 5, ignore_frac=0.2, seed=10, spatial=(6, 7))
    offset = torch.randn(2, 6, 7, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    for reduction in ("mean", "none"):
        check(backend, x, t, offset, 0.3, keep=keep, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_keep_ratio(backend):
    x, t = make_batch(37, 8, ignore_frac=0.1, seed=12)
    offset = torch.randn(37, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    check(backend, x, t, offset, torch.tensor(0.45, dtype=torch.float64), keep="easiest")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset_dtype", [torch.float16, torch.float64])
def test_low_precision_ranks_scores_in_fp32(backend, dtype, offset_dtype):
    x, t = make_batch(64, 11, dtype=dtype, ignore_frac=0.1, seed=14)
    offset = torch.randn(64, generator=torch.Generator().manual_seed(15)).to(offset_dtype)
    _, info, _ = check(backend, x, t, offset, 0.4, dtype=dtype)
    assert info.scores.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_zero_offset_is_bitwise_no_offset(backend, keep, reduction):
    x, t = make_batch(50, 7, dtype=torch.float32, ignore_frac=0.2, seed=16)
    x[3] = x[9]  # a tie
    t[3] = t[9]
    plain = run(backend, x, t, 0.3, keep=keep, reduction=reduction)
    zero = run(backend, x, t, 0.3, keep=keep, reduction=reduction, score_offset=torch.zeros(50))
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[2], zero[2])
    assert torch.equal(plain[1].kept, zero[1].kept)
    assert torch.equal(plain[1].threshold, zero[1].threshold) and torch.equal(plain[1].losses, zero[1].losses)
    assert plain[1].scores is None and torch.equal(zero[1].scores, plain[1].losses)


@pytest.mark.parametrize("backend", [*TRITON])
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_triton_grid_select(backend, keep, monkeypatch):
    """The multi-program select (forced onto a small problem) ranks the scores as one program does."""
    from fused_trim.triton import launch

    monkeypatch.setattr(launch, "SINGLE_PROGRAM_MAX_ROWS", 0)
    monkeypatch.setattr(launch, "GRID_BLOCK", 64)
    gen = torch.Generator().manual_seed(17)
    patterns = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    which = torch.randint(0, 4, (250,), generator=gen)
    x, t = patterns[which].clone(), which.clone()
    t[torch.rand(250, generator=gen) < 0.15] = -100
    offset = torch.tensor([0.0, 1.0, -1.0, 0.5], dtype=torch.float64)[which]
    offset[[5, 100, 200]] = float("nan")
    # A covering set: every ratio, each reduction and dtype at least once per direction.
    for ratio, reduction, dtype in (
        (0.05, "mean", torch.float64),
        (0.5, "none", torch.float64),
        (1.0, "mean", torch.float32),
    ):
        check(backend, x.to(dtype), t, offset.to(dtype), ratio, dtype=dtype, keep=keep, reduction=reduction)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.startswith("native")])
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_native_histogram_select_of_many_rows(backend, keep):
    """From 2**15 rows the native CPU select starts with a histogram of the keys: scores there too."""
    rows = 40000
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(rows, 2, generator=gen)
    x[rows // 2 :] = x[: rows // 2]  # every loss tied with another
    t = torch.randint(0, 2, (rows,), generator=gen)
    t[rows // 2 :] = t[: rows // 2]
    t[torch.rand(rows, generator=gen) < 0.1] = -100
    offset = torch.randint(-2, 3, (rows,), generator=gen).float() / 4
    offset[::997] = float("nan")
    for ratio in (0.01, 0.6):
        check(backend, x, t, offset, ratio, dtype=torch.float32, keep=keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_all_ignored(backend):
    x, t = make_batch(6, 3, seed=18)
    t[:] = -100
    out, info, grad = run(backend, x, t, 0.5, score_offset=torch.zeros(6, dtype=torch.float64))
    assert torch.isnan(out) and int(info.k) == 0 and torch.isnan(info.threshold) and torch.all(grad == 0)
    name, dev = split(backend)
    empty = torch.zeros(0, 3, device=dev), torch.zeros(0, dtype=torch.long, device=dev)
    out, info = trimmed_cross_entropy(
        *empty, 0.5, score_offset=torch.zeros(0, device=dev), return_info=True, backend=name
    )
    assert int(info.k) == 0 and info.scores.shape == (0,)


def test_offset_requiring_grad_is_used_detached():
    x, t = make_batch(20, 4, seed=19)
    x.requires_grad_(True)
    offset = torch.randn(20, dtype=torch.float64, requires_grad=True)
    out, info = trimmed_cross_entropy(x, t, 0.5, score_offset=offset, return_info=True, backend="reference")
    out.backward()
    assert offset.grad is None and x.grad is not None
    assert not info.scores.requires_grad


@pytest.mark.parametrize(
    ("offset", "error", "match"),
    [
        (torch.zeros(7), ValueError, r"score_offset shape \(7,\) does not match target shape \(8,\)"),
        (torch.zeros(8, 1), ValueError, r"score_offset shape \(8, 1\)"),
        (torch.zeros(8, dtype=torch.long), TypeError, "score_offset must be a floating-point .* torch.int64"),
        (torch.zeros(8, dtype=torch.bool), TypeError, "score_offset must be a floating-point .* torch.bool"),
        ([0.0] * 8, TypeError, "score_offset must be a tensor or None, got list"),
        (torch.zeros(8, device="meta"), ValueError, "score_offset is on meta but input is on cpu"),
    ],
)
def test_bad_offsets_name_the_argument(offset, error, match):
    x, t = make_batch(8, 3, seed=20)
    for backend in ("reference", "auto"):
        with pytest.raises(error, match=match):
            trimmed_cross_entropy(x, t, 0.5, score_offset=offset, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_forward_takes_an_offset_per_call(backend):
    name, dev = split(backend)
    x, t = make_batch(24, 5, ignore_frac=0.1, seed=21)
    offset = torch.randn(24, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    criterion = TrimmedCrossEntropyLoss(0.5, backend=name)
    loss = criterion(x.to(dev), t.to(dev), score_offset=offset.to(dev))
    expected, info = trimmed_cross_entropy(x, t, 0.5, score_offset=offset, backend="reference", return_info=True)
    assert_close(loss.cpu(), expected)
    assert torch.equal(criterion.info.kept.cpu(), info.kept)
    assert_close(criterion.info.scores.cpu(), info.scores)
    criterion(x.to(dev), t.to(dev))
    assert criterion.info.scores is None


# Fewer examples than the profile's: each runs every backend, Triton in its interpreter.
@settings(max_examples=15)
@given(
    rows=st.integers(1, 40),
    classes=st.integers(1, 6),
    ratio=st.floats(0.01, 1.0),
    keep=st.sampled_from(["hardest", "easiest"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_random_batches_with_ties(rows, classes, ratio, keep, reduction, seed):
    """Few distinct rows and offsets (many exact ties), NaN and infinite offsets, ignored samples."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(3, classes, generator=gen, dtype=torch.float64)
    which = torch.randint(0, 3, (rows,), generator=gen)
    x = patterns[which].clone()
    t = torch.randint(0, classes, (rows,), generator=gen)
    t[torch.rand(rows, generator=gen) < 0.2] = -100
    values = torch.tensor([0.0, -0.0, 1.0, float("nan"), float("inf"), float("-inf"), 0.5], dtype=torch.float64)
    offset = values[torch.randint(0, len(values), (rows,), generator=gen)]
    for backend in BACKENDS:
        check(backend, x, t, offset, ratio, keep=keep, reduction=reduction)


COMPILE_BACKENDS = [b for b in BACKENDS if b.startswith("native")] + [b for b in BACKENDS if b == "triton@cuda"]


@pytest.mark.skipif(not COMPILE_BACKENDS, reason="no compiled backend here (native not built, no CUDA)")
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_torch_compile_fullgraph_with_an_offset(backend):
    """The offset reaches the compiled op (its fake implementation takes it): no graph break."""
    name, dev = split(backend)
    torch.manual_seed(0)
    body = torch.nn.Linear(12, 10).to(dev)
    x, t = torch.randn(48, 12, device=dev), torch.randint(0, 10, (48,), device=dev)
    offset = torch.randn(48, device=dev)

    def step(fn):
        body.zero_grad(set_to_none=True)
        loss = fn(x, t, offset)
        loss.backward()
        return loss.detach(), body.weight.grad.clone()

    def loss_fn(x, t, offset):
        return trimmed_cross_entropy(body(x), t, 0.4, keep="easiest", backend=name, score_offset=offset)

    torch._dynamo.reset()
    got = step(torch.compile(loss_fn, fullgraph=True, backend="aot_eager"))
    want = step(loss_fn)
    torch.testing.assert_close(got, want)
