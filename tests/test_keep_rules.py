"""The count and threshold keep rules (``keep_count=``, ``keep_threshold=`` with ``min_kept=``) on
both ops and every backend, against a float64 oracle written here: a loop over the samples in
ranking order, with the rule spelled out as the contract states it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fused_trim import trimmed_cross_entropy, trimmed_linear_cross_entropy

from .helpers import BACKENDS, KERNEL_BACKENDS, LM_BACKENDS, make_batch, make_head, run, run_fused, split

# ------------------------------------------------------------------------------------------------
# The oracle
# ------------------------------------------------------------------------------------------------


def oracle_kept(scores, valid, keep, count=None, threshold=None, min_kept=0):
    """``(kept, k)`` by the contract: rank the valid scores (float64; hardest: NaN first, then
    descending; easiest: ascending, NaN last; ties to the lower index), then keep the first ``k``
    with ``k = min(n, count)``, or ``max(min(n, min_kept), #past)`` where past means strictly
    above the threshold (hardest; NaN too) or strictly below (easiest)."""
    s = [float(v) for v in scores.double().reshape(-1)]
    ok = valid.reshape(-1).tolist()
    idx = [i for i in range(len(s)) if ok[i]]
    n = len(idx)

    def rank(i):
        nan = math.isnan(s[i])
        if keep == "hardest":
            return (0 if nan else 1, 0.0 if nan else -s[i], i)
        return (1 if nan else 0, 0.0 if nan else s[i], i)

    order = sorted(idx, key=rank)
    if count is not None:
        k = min(n, count)
    else:
        if keep == "hardest":
            past = sum(1 for i in idx if math.isnan(s[i]) or s[i] > threshold)
        else:
            past = sum(1 for i in idx if not math.isnan(s[i]) and s[i] < threshold)
        k = max(min(n, min_kept), past)
    kept = torch.zeros(len(s), dtype=torch.bool)
    kept[order[:k]] = True
    return kept.reshape(valid.shape), k


def oracle_loss(x, t, kept, reduction, weight=None, label_smoothing=0.0, grad_seed=0):
    """The reduced float64 ``F.cross_entropy`` over ``kept`` and its input gradient under the
    upstream gradient :func:`tests.helpers.run` uses."""
    x = x.detach().double().clone().requires_grad_(True)
    w = None if weight is None else weight.double()
    # Rows outside the kept set enter as zeros with an ignored target: no gradient, not even 0 * NaN.
    xk = torch.where(kept.unsqueeze(1), x, 0.0)
    per = F.cross_entropy(xk, torch.where(kept, t, -100), weight=w, reduction="none", label_smoothing=label_smoothing)
    if reduction == "none":
        out = per
    elif reduction == "sum":
        out = per.sum()
    else:
        wy = torch.ones_like(per) if w is None else w[t.clamp(min=0)]
        out = per.sum() / torch.where(kept, wy, 0.0).sum()
    gen = torch.Generator().manual_seed(grad_seed)
    upstream = torch.randn(out.shape, generator=gen).to(torch.bfloat16).to(out.dtype)
    (grad,) = torch.autograd.grad(out, x, upstream)
    return out.detach(), grad


def _batch(seed, rows=37, classes=5, spatial=()):
    """float64 logits with ignored rows, exact ties (duplicated rows) and one NaN row."""
    x, t = make_batch(rows, classes, ignore_frac=0.15, seed=seed, spatial=spatial)
    if not spatial:
        x[20:24] = x[5]
        t[20:24] = t[5] if t[5] != -100 else 1
        t[5] = t[20]
    return x, t


def _check(backend, x, t, reduction, kw, oracle_kw):
    """One call of ``backend`` against the oracle: kept set and k exactly, loss and gradient
    closely, zeros outside the kept set exactly."""
    opts = {key: kw[key] for key in ("weight", "label_smoothing") if key in kw}
    out, info, grad = run(backend, x, t, None, reduction=reduction, **kw)
    _, base, _ = run(backend, x, t, None, reduction="none", **opts)  # every sample's loss, as ranked
    offset = kw.get("score_offset")
    scores = base.losses.double() - (0.0 if offset is None else offset.double())
    kept, k = oracle_kept(scores, t != -100, kw.get("keep", "hardest"), **oracle_kw)
    assert torch.equal(info.kept, kept), (backend, kw, oracle_kw)
    assert int(info.k) == k
    ref_out, ref_grad = oracle_loss(x, t, kept, reduction, **opts)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-9, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-9, atol=1e-12, equal_nan=True)
    dropped = ~kept.unsqueeze(1).expand_as(grad)
    assert bool((grad[dropped] == 0).all())
    return info


# ------------------------------------------------------------------------------------------------
# keep_count
# ------------------------------------------------------------------------------------------------

# A covering set: each count (1 to beyond n), direction, reduction and option appears, rotated.
COUNT_CASES = [
    (1, "hardest", "mean", {}),
    (2, "easiest", "sum", {"label_smoothing": 0.1}),
    (17, "hardest", "none", {"weight": True}),
    ("n-1", "easiest", "mean", {"score_offset": True}),
    ("n", "hardest", "sum", {}),
    (1000, "easiest", "none", {"weight": True, "label_smoothing": 0.2}),
    ("tensor", "hardest", "mean", {"score_offset": True}),
]


def _options(x, t, opts, seed):
    gen = torch.Generator().manual_seed(seed)
    kw = {}
    if opts.get("weight"):
        kw["weight"] = torch.rand(x.shape[1], generator=gen, dtype=torch.float64) + 0.5
    if opts.get("label_smoothing"):
        kw["label_smoothing"] = opts["label_smoothing"]
    if opts.get("score_offset"):
        kw["score_offset"] = torch.randn(t.shape, generator=gen, dtype=torch.float64).round(decimals=1)
    return kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(COUNT_CASES)))
def test_keep_count_matches_the_oracle(backend, case):
    count, keep, reduction, opts = COUNT_CASES[case]
    x, t = _batch(case)
    n = int((t != -100).sum())
    value = {"n-1": n - 1, "n": n, "tensor": 9}.get(count, count)
    kw = dict(keep=keep, **_options(x, t, opts, case))
    kw["keep_count"] = torch.tensor(value) if count == "tensor" else value
    _check(backend, x, t, reduction, kw, {"count": value})


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_count_zero_keeps_nothing(backend):
    x, t = _batch(0)
    out, info, grad = run(backend, x, t, None, keep_count=0)
    assert int(info.k) == 0 and not bool(info.kept.any())
    assert bool(torch.isnan(out)) and bool((grad == 0).all())


# ------------------------------------------------------------------------------------------------
# keep_threshold with min_kept
# ------------------------------------------------------------------------------------------------

# (where the threshold sits relative to the 9th ranked valid score, min_kept, keep, reduction,
# options); a covering set of positions x min_kept x directions x options.
THRESHOLD_CASES = [
    ("at", 0, "hardest", "mean", {}),
    ("below", 1, "easiest", "sum", {"score_offset": True}),
    ("above", "n+1", "hardest", "none", {"weight": True}),
    ("at", 1, "easiest", "mean", {"label_smoothing": 0.1}),
    ("below", 0, "hardest", "sum", {"score_offset": True, "nan": True}),
    ("above", 0, "easiest", "mean", {"nan": True}),
    ("at", "n+1", "easiest", "sum", {"weight": True, "nan": True}),
    ("tensor", 3, "hardest", "mean", {"spatial": True}),
    ("none-past", 0, "hardest", "mean", {}),
]


def _threshold_case(backend, case):
    where, min_kept, keep, reduction, opts = THRESHOLD_CASES[case]
    spatial = (3, 4) if opts.get("spatial") else ()
    x, t = _batch(10 + case, rows=7 if spatial else 37, spatial=spatial)
    if opts.get("nan"):
        x[2, 1] = float("nan")
        t[2] = 0
    n = int((t != -100).sum())
    kw = dict(keep=keep, **_options(x, t, opts, case))
    opts_only = {key: kw[key] for key in ("weight", "label_smoothing") if key in kw}
    _, base, _ = run(backend, x, t, None, reduction="none", **opts_only)
    offset = kw.get("score_offset")
    scores = base.losses.double() - (0.0 if offset is None else offset.double())
    finite = scores[(t != -100) & ~torch.isnan(scores)]
    ranked = finite.sort(descending=keep == "hardest").values
    value = float(ranked[8])
    thr = {
        "at": value,
        "tensor": value,
        "below": math.nextafter(value, -math.inf),
        "above": math.nextafter(value, math.inf),
        "none-past": float(finite.max()) + 1.0,
    }[where]
    kw["keep_threshold"] = torch.tensor(thr, dtype=torch.float64) if where == "tensor" else thr
    mk = n + 1 if min_kept == "n+1" else min_kept
    kw["min_kept"] = mk
    return x, t, reduction, kw, {"threshold": thr, "min_kept": mk}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(THRESHOLD_CASES)))
def test_keep_threshold_matches_the_oracle(backend, case):
    x, t, reduction, kw, oracle_kw = _threshold_case(backend, case)
    _check(backend, x, t, reduction, kw, oracle_kw)


def test_threshold_positions_move_exactly_one_sample():
    """At a loss value that sample is not kept (strictly above), just below it is: the oracle's own
    sanity, so that the cases above test what they say."""
    x, t = _batch(3)
    _, info, _ = run("reference", x, t, None, reduction="none")
    losses = info.losses[t != -100].double()
    value = float(losses.sort(descending=True).values[8])
    counts = [
        oracle_kept(info.losses, t != -100, "hardest", threshold=thr)[1]
        for thr in (math.nextafter(value, math.inf), value, math.nextafter(value, -math.inf))
    ]
    assert counts[0] == counts[1] == 8 and counts[2] == 9


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_keep_rules_are_bitwise_repeatable(backend):
    x, t = _batch(4)
    x = x.float()
    for kw in (dict(keep_count=11), dict(keep_threshold=1.5, min_kept=4, keep="easiest")):
        first = run(backend, x, t, None, **kw)
        again = run(backend, x, t, None, **kw)
        assert torch.equal(first[0], again[0]) and torch.equal(first[2], again[2])
        assert torch.equal(first[1].kept, again[1].kept)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if split(b)[0] == "triton"])
def test_triton_grid_select_takes_the_rules(backend, grid_select):
    x, t = _batch(5, rows=150)
    _check(backend, x, t, "mean", dict(keep_count=40), {"count": 40})
    _check(backend, x, t, "sum", dict(keep_threshold=1.2, min_kept=5), {"threshold": 1.2, "min_kept": 5})


# ------------------------------------------------------------------------------------------------
# The LM head
# ------------------------------------------------------------------------------------------------

LM_CASES = [
    ("hardest", "mean", dict(keep_count=7)),
    ("easiest", "sum", dict(keep_count=torch.tensor(100))),
    ("hardest", "none", dict(keep_threshold=2.3, min_kept=2)),
    ("easiest", "mean", dict(keep_threshold=2.0, min_kept=30)),
]


@pytest.mark.parametrize("backend", LM_BACKENDS)
@pytest.mark.parametrize("case", range(len(LM_CASES)))
def test_lm_head_keep_rules_match_the_oracle(backend, case):
    keep, reduction, rule = LM_CASES[case]
    x, w, b, t = make_head(29, 8, 11, seed=case, ignore_frac=0.2)
    out, info, grads = run_fused(backend, x, w, b, t, None, keep=keep, reduction=reduction, chunk_size=8, **rule)
    _, base, _ = run_fused(backend, x, w, b, t, 1.0, reduction="none", chunk_size=8)
    oracle_kw = (
        {"count": int(rule["keep_count"])}
        if "keep_count" in rule
        else {"threshold": rule["keep_threshold"], "min_kept": rule["min_kept"]}
    )
    kept, k = oracle_kept(base.losses, t != -100, keep, **oracle_kw)
    assert torch.equal(info.kept, kept) and int(info.k) == k
    ref_out, ref_info, ref_grads = run_fused(
        "reference", x, w, b, t, None, keep=keep, reduction=reduction, chunk_size=8, **rule
    )
    assert torch.equal(ref_info.kept, kept)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    assert bool((grads[0][~kept] == 0).all())


# ------------------------------------------------------------------------------------------------
# torch.compile and errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [b for b in ("reference", "native") if b in BACKENDS])
def test_tensor_count_and_threshold_compile_fullgraph_without_recompiles(backend):
    from torch._dynamo.testing import CompileCounter

    x, t = _batch(6)

    def step(x, count, thr):
        a = trimmed_cross_entropy(x, t, keep_count=count, backend=backend)
        b = trimmed_cross_entropy(x, t, keep_threshold=thr, min_kept=3, keep="easiest", backend=backend)
        return a + b

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for count, thr in ((5, 1.0), (12, 2.5), (40, 0.1)):
        args = (torch.tensor(count), torch.tensor(thr, dtype=torch.float64))
        results = []
        for fn in (compiled, step):
            leaf = x.clone().requires_grad_(True)
            out = fn(leaf, *args)
            results.append((out.detach(), torch.autograd.grad(out, leaf)[0]))
        torch.testing.assert_close(results[0][0], results[1][0])
        torch.testing.assert_close(results[0][1], results[1][1])
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(keep_ratio=0.5, keep_count=3), ValueError, "got keep_ratio and keep_count"),
        (dict(keep_count=3, keep_threshold=1.0), ValueError, "got keep_count and keep_threshold"),
        (dict(keep_ratio=1.0, keep_threshold=1.0), ValueError, "got keep_ratio and keep_threshold"),
        (dict(keep_count=-1), ValueError, "keep_count must be >= 0.*-1"),
        (dict(keep_count=torch.tensor(-2)), ValueError, "keep_count must be >= 0.*-2"),
        (dict(keep_count=2.0), TypeError, "keep_count must be an int"),
        (dict(keep_count=True), TypeError, "keep_count must be an int"),
        (dict(keep_count=torch.tensor(2.0)), TypeError, "keep_count must be an int.*float"),
        (dict(keep_count=torch.tensor([2])), TypeError, "keep_count must be an int.*shape"),
        (dict(keep_threshold=float("nan")), ValueError, "keep_threshold must be finite"),
        (dict(keep_threshold=float("inf")), ValueError, "keep_threshold must be finite"),
        (dict(keep_threshold=torch.tensor(float("-inf"))), ValueError, "keep_threshold must be finite"),
        (dict(keep_threshold="1"), TypeError, "keep_threshold must be a float"),
        (dict(keep_threshold=torch.tensor(1)), TypeError, "keep_threshold must be a float.*int64"),
        (dict(min_kept=3), ValueError, "min_kept=3 applies only with keep_threshold"),
        (dict(keep_count=3, min_kept=3), ValueError, "min_kept=3 applies only with keep_threshold"),
        (dict(keep_threshold=1.0, min_kept=-1), ValueError, "min_kept must be >= 0"),
        (dict(keep_threshold=1.0, min_kept=2.0), TypeError, "min_kept must be an int"),
    ],
)
@pytest.mark.parametrize("op", ["ce", "linear_ce"])
def test_bad_keep_rules_raise_naming_the_arguments(op, kwargs, error, match):
    x, t = _batch(0)
    with pytest.raises(error, match=match):
        if op == "ce":
            trimmed_cross_entropy(x, t, backend="reference", **kwargs)
        else:
            trimmed_linear_cross_entropy(x, torch.randn(4, 5, dtype=torch.float64), t.clamp(max=3), **kwargs)


def test_no_rule_given_is_a_ratio_of_one_and_positional_ratios_still_work():
    x, t = _batch(1)
    plain = F.cross_entropy(x, t)
    torch.testing.assert_close(trimmed_cross_entropy(x, t, backend="reference"), plain)
    half = trimmed_cross_entropy(x, t, 0.5, backend="reference")
    torch.testing.assert_close(trimmed_cross_entropy(x, t, keep_ratio=0.5, backend="reference"), half)


# ------------------------------------------------------------------------------------------------
# The modules and the count form of Ordered SGD's schedule
# ------------------------------------------------------------------------------------------------


def test_ordered_sgd_count_form_halves_the_count_per_threshold():
    from fused_trim.schedules import OrderedSGDSchedule

    schedule = OrderedSGDSchedule(start_count=64)
    assert schedule.gives_count and not OrderedSGDSchedule().gives_count
    assert [schedule.update(a) for a in (0.5, 0.85, 0.92, 0.96, 0.999, 0.2)] == [64, 32, 16, 8, 4, 4]
    assert OrderedSGDSchedule(start_count=100).update(0.96) == 13  # 12.5 rounds up, as k does
    assert OrderedSGDSchedule(start_count=3, factor=0.1).update(1.0) == 1  # never below one sample
    with pytest.raises(ValueError, match="start_count must be >= 1"):
        OrderedSGDSchedule(start_count=0)
    with pytest.raises(ValueError, match="not both"):
        OrderedSGDSchedule(start=0.5, start_count=8)


def test_module_keep_count_schedule_and_threshold_equal_the_functional():
    from fused_trim import TrimmedCrossEntropyLoss, TrimmedLinearCrossEntropyLoss
    from fused_trim.schedules import OrderedSGDSchedule

    x, t = _batch(7)
    schedule = OrderedSGDSchedule(start_count=12)
    crit = TrimmedCrossEntropyLoss(keep_count=schedule, backend="reference")
    assert "keep_count=OrderedSGDSchedule" in repr(crit)
    for accuracy, count in ((0.5, 12), (0.85, 6), (0.93, 3)):
        schedule.update(accuracy)
        crit.step()
        loss = crit(x, t)
        assert int(crit.info.k) == count and crit.last_keep_count == count and crit.last_keep_ratio is None
        torch.testing.assert_close(loss, trimmed_cross_entropy(x, t, keep_count=count, backend="reference"))

    crit = TrimmedCrossEntropyLoss(keep_threshold=1.5, min_kept=4, keep="easiest", backend="reference")
    expected = trimmed_cross_entropy(x, t, keep_threshold=1.5, min_kept=4, keep="easiest", backend="reference")
    torch.testing.assert_close(crit(x, t), expected)

    xh, w, b, th = make_head(19, 6, 9, seed=1)
    head = TrimmedLinearCrossEntropyLoss(w, keep_count=5, linear_bias=b, backend="reference")
    expected = trimmed_linear_cross_entropy(xh, w, th, keep_count=5, linear_bias=b, backend="reference")
    torch.testing.assert_close(head(xh, th), expected)
    assert int(head.info.k) == 5


def test_compiled_module_follows_a_count_schedule_without_recompiling():
    from torch._dynamo.testing import CompileCounter

    from fused_trim import TrimmedCrossEntropyLoss
    from fused_trim.schedules import OrderedSGDSchedule

    x, t = _batch(8)
    schedule = OrderedSGDSchedule(start_count=16)
    crit = TrimmedCrossEntropyLoss(keep_count=schedule, backend="reference")
    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(lambda x, t: crit(x, t), fullgraph=True, backend=counter)
    for accuracy in (0.5, 0.85, 0.92, 0.96):
        count = schedule.update(accuracy)
        crit.step()
        torch.testing.assert_close(step(x, t), trimmed_cross_entropy(x, t, keep_count=count, backend="reference"))
    # The first compiled call copies the count to the input's device once, the next reads it.
    assert counter.frame_count <= 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(keep_ratio=0.5, keep_count=3), "got keep_ratio and keep_count"),
        (dict(keep_count=4, keep_threshold=1.0), "got keep_count and keep_threshold"),
        (dict(keep_count=-3), "keep_count must be >= 0"),
        (dict(min_kept=2), "min_kept=2 applies only with keep_threshold"),
        (dict(keep_threshold=float("nan")), "keep_threshold must be finite"),
        (dict(keep_ratio="counts"), "takes a schedule of ratios"),
        (dict(keep_count="ratios"), "takes a schedule of counts"),
    ],
)
def test_module_keep_rule_errors(kwargs, match):
    from fused_trim import TrimmedCrossEntropyLoss
    from fused_trim.schedules import OrderedSGDSchedule

    schedules = {"counts": OrderedSGDSchedule(start_count=8), "ratios": OrderedSGDSchedule()}
    kwargs = {key: schedules.get(v, v) if isinstance(v, str) else v for key, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        TrimmedCrossEntropyLoss(**kwargs)
