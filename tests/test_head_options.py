"""``logit_softcap`` and ``z_loss`` on both ops, and ``info.lse`` / ``info.z_loss``, against a
float64 oracle of the unfused formula:
``F.cross_entropy(c * tanh(z / c), ...) + λ * logsumexp(c * tanh(z / c))**2``, trimmed by the
reference selection of those losses, reduced over the kept set (the mean over ``Σ_K w[y]``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fused_trim import TrimmedCrossEntropyLoss, trimmed_cross_entropy, trimmed_linear_cross_entropy
from fused_trim._common import Keep, compute_k, ranking_scores
from fused_trim.reference import select

from .helpers import BACKENDS, split

HEAD_BACKENDS = BACKENDS  # every backend implements the options
LINEAR_BACKENDS = [b for b in HEAD_BACKENDS if b != "native@cuda"]


def _capped(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    return z if cap is None else cap * torch.tanh(z / cap)


def oracle(logits, t, keep_ratio, *, cap, z, weight=None, ignore_index=-100, label_smoothing=0.0, **kw):
    """The unfused float64 loss (differentiable in ``logits``, ``(M, C)``), its kept mask and its
    z part reduced over the kept set."""
    keep = Keep[kw.get("keep", "hardest").upper()]
    reduction = kw.get("reduction", "mean")
    capped = _capped(logits.double(), cap)
    w = None if weight is None else weight.double()
    ce = F.cross_entropy(
        capped, t, weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    )
    valid = t != ignore_index
    lse = torch.logsumexp(capped, 1)
    zterm = torch.where(valid, z * lse**2, 0)
    losses = torch.where(valid, ce + zterm, 0)
    offset = kw.get("score_offset")
    scores = ranking_scores(losses.detach(), None if offset is None else offset.double())
    k = compute_k(valid.sum(), keep_ratio)
    kept, _, _ = select(scores, valid, k, keep)
    w_y = torch.ones_like(ce) if w is None else w[t.clamp(min=0)]
    denom = torch.where(kept, w_y, 0).sum()
    if reduction == "none":
        return torch.where(kept, losses, 0), kept, torch.where(kept, zterm, 0).detach(), lse.detach()
    total, ztot = torch.where(kept, losses, 0).sum(), torch.where(kept, zterm, 0).sum().detach()
    if reduction == "sum":
        return total, kept, ztot, lse.detach()
    return total / denom, kept, ztot / denom, lse.detach()


CE_CASES = {
    "cap-mean-hardest": dict(shape=(37, 7), keep_ratio=0.5, cap=2.0, z=0.0),
    "z-sum-easiest-smooth": dict(
        shape=(41, 257), keep_ratio=0.3, cap=None, z=1e-2, reduction="sum", keep="easiest", label_smoothing=0.1
    ),
    "both-none-weight": dict(shape=(29, 13), keep_ratio=0.6, cap=3.0, z=1e-3, reduction="none", weight=True),
    "both-keep_all-mean-weight-smooth": dict(
        shape=(33, 11), keep_ratio=1.0, cap=1.5, z=1e-1, weight=True, label_smoothing=0.2
    ),
    "both-offset": dict(shape=(31, 9), keep_ratio=0.4, cap=4.0, z=1e-2, offset=True),
    "one-class": dict(shape=(17, 1), keep_ratio=0.5, cap=2.0, z=1e-2),
    "spatial": dict(shape=(2, 7, 3, 5), keep_ratio=0.5, cap=2.0, z=1e-2, weight=True),
    "cap-rows-weight-smooth": dict(shape=(19, 300), keep_ratio=0.5, cap=2.5, z=1e-2, weight=True, label_smoothing=0.1),
    "cap-blocks-sum": dict(shape=(5, 2100), keep_ratio=0.6, cap=3.0, z=1e-3, reduction="sum"),
}


def _ce_problem(shape, weight=False, offset=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    c = shape[1]
    tshape = (shape[0], *shape[2:])
    t = torch.randint(0, c, tshape, generator=g)
    t.view(-1)[::5] = -100
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5 if weight else None
    o = torch.randn(tshape, generator=g, dtype=torch.float64) if offset else None
    return x, t, w, o


def _rows(x):
    return x if x.dim() == 2 else x.movedim(1, -1).reshape(-1, x.shape[1])


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
@pytest.mark.parametrize("case", CE_CASES, ids=list(CE_CASES))
def test_cross_entropy_against_unfused_oracle(backend, case):
    spec = dict(CE_CASES[case])
    x, t, w, o = _ce_problem(spec.pop("shape"), spec.pop("weight", False), spec.pop("offset", False))
    keep_ratio, cap, z = spec.pop("keep_ratio"), spec.pop("cap"), spec.pop("z")
    name, dev = split(backend)
    kw = dict(spec, weight=w, score_offset=o)
    xg = x.clone().to(dev).requires_grad_(True)
    dkw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out, info = trimmed_cross_entropy(
        xg, t.to(dev), keep_ratio, logit_softcap=cap, z_loss=z, backend=name, return_info=True, **dkw
    )
    xo = x.clone().requires_grad_(True)
    flat_o = None if o is None else o.reshape(-1)
    want, kept, zwant, lse = oracle(_rows(xo), t.reshape(-1), keep_ratio, cap=cap, z=z, **dict(kw, score_offset=flat_o))
    assert torch.equal(info.kept.cpu().reshape(-1), kept)
    torch.testing.assert_close(out.cpu().reshape(want.shape), want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(info.lse.cpu().reshape(-1), torch.where(t.reshape(-1) != -100, lse, 0))
    if z == 0.0:
        assert info.z_loss is None
    else:
        torch.testing.assert_close(info.z_loss.cpu().reshape(zwant.shape), zwant)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(upstream.to(dev))
    want.backward(upstream.reshape(want.shape))
    torch.testing.assert_close(xg.grad.cpu(), xo.grad, rtol=1e-9, atol=1e-12)
    outside = ~info.kept.cpu()
    rows_grad = _rows(xg.grad.cpu())
    assert torch.all(rows_grad[outside.reshape(-1)] == 0)


LINEAR_CASES = {
    "keep_all-mean-bias": dict(keep_ratio=1.0, cap=2.0, z=1e-2, bias=True),
    "keep_all-sum-smooth-weight": dict(
        keep_ratio=1.0, cap=None, z=1e-1, reduction="sum", label_smoothing=0.1, weight=True
    ),
    "hardest-mean-cap": dict(keep_ratio=0.4, cap=1.5, z=0.0, bias=True),
    "easiest-none-both": dict(keep_ratio=0.5, cap=3.0, z=1e-2, reduction="none", keep="easiest"),
    "offset-both-weight": dict(keep_ratio=0.3, cap=2.5, z=1e-3, offset=True, weight=True),
    "tiles-hardest-both": dict(keep_ratio=0.5, cap=2.0, z=1e-2, bias=True, v=1100),
    "tiles-keep_all-both": dict(keep_ratio=1.0, cap=2.0, z=1e-2, v=1100, label_smoothing=0.1),
}


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=list(LINEAR_CASES))
def test_linear_against_unfused_oracle(backend, case):
    spec = dict(LINEAR_CASES[case])
    keep_ratio, cap, z = spec.pop("keep_ratio"), spec.pop("cap"), spec.pop("z")
    g = torch.Generator().manual_seed(3)
    n, d, v = 37, 16, spec.pop("v", 29)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64) if spec.pop("bias", False) else None
    t = torch.randint(0, v, (n,), generator=g)
    t[::6] = -100
    cw = torch.rand(v, generator=g, dtype=torch.float64) + 0.5 if spec.pop("weight", False) else None
    o = torch.randn(n, generator=g, dtype=torch.float64) if spec.pop("offset", False) else None
    name, dev = split(backend)
    leaves = [None if a is None else a.clone().to(dev).requires_grad_(True) for a in (x, w, b)]
    ref_leaves = [None if a is None else a.clone().requires_grad_(True) for a in (x, w, b)]
    to = lambda a: None if a is None else a.to(dev)  # noqa: E731
    out, info = trimmed_linear_cross_entropy(
        leaves[0],
        leaves[1],
        t.to(dev),
        keep_ratio,
        linear_bias=leaves[2],
        weight=to(cw),
        score_offset=to(o),
        logit_softcap=cap,
        z_loss=z,
        backend=name,
        return_info=True,
        chunk_size=8,
        **spec,
    )
    logits = F.linear(ref_leaves[0], ref_leaves[1], ref_leaves[2])
    want, kept, zwant, lse = oracle(logits, t, keep_ratio, cap=cap, z=z, weight=cw, score_offset=o, **spec)
    assert torch.equal(info.kept.cpu(), kept)
    torch.testing.assert_close(out.cpu(), want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(info.lse.cpu(), torch.where(t != -100, lse, 0))
    if z:
        torch.testing.assert_close(info.z_loss.cpu(), zwant)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(upstream.to(dev))
    want.backward(upstream)
    for got, ref in zip(leaves, ref_leaves, strict=True):
        if got is not None:
            torch.testing.assert_close(got.grad.cpu(), ref.grad, rtol=1e-9, atol=1e-11)
    assert torch.all(leaves[0].grad.cpu()[~info.kept.cpu()] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_off_is_off_bitwise(backend):
    """``z_loss=0.0`` and ``logit_softcap=None`` given explicitly are the plain op, bitwise (the
    z term is never added, not even as ``+ 0 * lse**2``)."""
    x, t, w, _ = _ce_problem((23, 9), weight=True, seed=4)
    x = x.float()
    name, dev = split(backend)
    a, ia = trimmed_cross_entropy(x.to(dev), t.to(dev), 0.5, weight=w.float().to(dev), backend=name, return_info=True)
    b, ib = trimmed_cross_entropy(
        x.to(dev),
        t.to(dev),
        0.5,
        weight=w.float().to(dev),
        backend=name,
        return_info=True,
        z_loss=0.0,
        logit_softcap=None,
    )
    assert torch.equal(a, b) and torch.equal(ia.losses, ib.losses) and ib.z_loss is None
    h = torch.randn(19, 8)
    hw = torch.randn(13, 8)
    ht = torch.randint(0, 13, (19,))
    if name == "native" and dev.type == "cuda":
        return
    a = trimmed_linear_cross_entropy(h.to(dev), hw.to(dev), ht.to(dev), 0.5, backend=name)
    b = trimmed_linear_cross_entropy(h.to(dev), hw.to(dev), ht.to(dev), 0.5, backend=name, z_loss=0.0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
def test_softcap_at_huge_logits_is_finite(backend):
    """``|z| >> c`` (and ``±inf``): tanh saturates, the capped logits tie at ``±c``; the derivative
    underflows to 0 without a NaN."""
    name, dev = split(backend)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(5)) * 1e6
    x[0, 1], x[1, 2] = float("inf"), float("-inf")  # capped to ±c as well
    x = x.to(dev).requires_grad_(True)
    t = torch.arange(16).remainder(5).to(dev)
    out = trimmed_cross_entropy(x, t, 0.5, logit_softcap=30.0, z_loss=1e-4, backend=name)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    want = oracle(x.detach().cpu(), t.cpu(), 0.5, cap=30.0, z=1e-4)[0]
    assert math.isclose(float(out.detach()), float(want), rel_tol=1e-5)
    # The LM head, both paths (the trimmed one recomputes in the backward, keep 1.0 forms the
    # gradient in the forward).
    h = torch.randn(16, 4, generator=torch.Generator().manual_seed(6)).to(dev).requires_grad_(True)
    w = (torch.randn(5, 4, generator=torch.Generator().manual_seed(7)) * 1e6).to(dev).requires_grad_(True)
    for ratio in (0.5, 1.0):
        out = trimmed_linear_cross_entropy(h, w, t, ratio, logit_softcap=30.0, z_loss=1e-4, backend=name, chunk_size=8)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
        want = oracle(F.linear(h, w).detach().cpu(), t.cpu(), ratio, cap=30.0, z=1e-4)[0]
        assert math.isclose(float(out.detach()), float(want), rel_tol=1e-5)


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
def test_softcap_float32_accuracy(backend):
    """fp32 logits from ``1e-4 c`` to ``1e3 c``, both signs: with one class the loss is
    ``λ (c tanh(x / c))**2`` and ``info.lse`` the capped logit itself, so that both branches of a
    kernel's tanh (and its derivative) are held to a few ulp of the float64 formula (the row and
    spatial kernels share the one device function)."""
    name, dev = split(backend)
    cap, lam = 4.0, 0.25
    mag = torch.logspace(-4, 3, 57, dtype=torch.float64) * cap
    flat = torch.cat([mag, -mag]).float()
    x = flat[:, None]
    t = torch.zeros(x.shape[0], dtype=torch.int64)
    xg = x.clone().to(dev).requires_grad_(True)
    out, info = trimmed_cross_entropy(
        xg, t.to(dev), reduction="none", logit_softcap=cap, z_loss=lam, backend=name, return_info=True
    )
    out.backward(torch.ones_like(out))
    u = flat.double() / cap
    capped = cap * torch.tanh(u)
    e = torch.exp(-2 * u.abs())
    torch.testing.assert_close(info.lse.cpu().double().reshape(-1), capped, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.detach().cpu().double().reshape(-1), lam * capped**2, rtol=3e-6, atol=0)
    grad = 2 * lam * capped * 4 * e / (1 + e) ** 2
    got = xg.grad.cpu().double().reshape(-1)
    torch.testing.assert_close(got, grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()))


def test_reference_gradcheck():
    x, t, w, _ = _ce_problem((7, 4), weight=True, seed=6)
    x.requires_grad_(True)

    def f(a):
        return trimmed_cross_entropy(a, t, 0.6, weight=w, logit_softcap=2.0, z_loss=0.1, backend="reference")

    assert torch.autograd.gradcheck(f, (x,))
    h = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    hw = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    ht = torch.tensor([0, 1, 2, 3, 4, -100])

    def g(a, b):
        return trimmed_linear_cross_entropy(a, b, ht, 0.5, logit_softcap=1.5, z_loss=0.1, backend="reference")

    assert torch.autograd.gradcheck(g, (h, hw))


def test_module_passes_options():
    x, t, _, _ = _ce_problem((21, 6), seed=7)
    crit = TrimmedCrossEntropyLoss(0.5, logit_softcap=2.0, z_loss=1e-2, backend="reference")
    got = crit(x, t)
    assert torch.equal(got, trimmed_cross_entropy(x, t, 0.5, logit_softcap=2.0, z_loss=1e-2, backend="reference"))
    assert "logit_softcap=2.0" in repr(crit) and "z_loss=0.01" in repr(crit)
    assert crit.info.z_loss is not None


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(logit_softcap=0.0), ValueError, "logit_softcap must be a finite float > 0, got 0.0"),
        (dict(logit_softcap=-1.0), ValueError, "logit_softcap"),
        (dict(logit_softcap=float("inf")), ValueError, "logit_softcap"),
        (dict(logit_softcap=float("nan")), ValueError, "logit_softcap"),
        (dict(logit_softcap="30"), TypeError, "logit_softcap must be None or a float > 0, got '30'"),
        (dict(logit_softcap=True), TypeError, "logit_softcap"),
        (dict(z_loss=-1e-4), ValueError, r"z_loss must be a finite float >= 0, got -0.0001"),
        (dict(z_loss=float("nan")), ValueError, "z_loss"),
        (dict(z_loss=None), TypeError, "z_loss must be a float >= 0, got None"),
    ],
)
def test_bad_options_raise(kw, exc, match):
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(exc, match=match):
        trimmed_cross_entropy(x, t, **kw)
    with pytest.raises(exc, match=match):
        trimmed_linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2), t, **kw)
    with pytest.raises(exc, match=match):
        TrimmedCrossEntropyLoss(**kw)


def _unfused_rows(logits, t, cap, z, label_smoothing):
    """The unfused per-row losses (``reduction="none"`` plus the z term) in ``logits``' dtype."""
    capped = _capped(logits, cap)
    ce = F.cross_entropy(capped, t, label_smoothing=label_smoothing, reduction="none")
    return ce + z * torch.logsumexp(capped, 1) ** 2


def _kept_mean(rows, kept):
    return torch.where(kept, rows, 0).sum() / kept.sum()


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
@pytest.mark.parametrize("op", ["ce", "linear"])
@pytest.mark.parametrize("keep_ratio", [0.5, 1.0])
def test_bf16_no_worse_than_unfused_bf16(backend, op, keep_ratio):
    """bf16 inputs with both options: the loss and the gradients are no further from the float64
    unfused formula than the unfused formula evaluated in bf16 (over the same kept set, so that a
    near-tie ranked differently in bf16 does not count)."""
    if op == "linear" and backend not in LINEAR_BACKENDS:
        pytest.skip(f"{backend} has no LM-head kernels")
    name, dev = split(backend)
    g = torch.Generator().manual_seed(8)
    cap, z, ls = 5.0, 1e-2, 0.1
    t = torch.randint(0, 40, (48,), generator=g)
    t[::7] = -100
    if op == "ce":
        leaves = [(torch.randn(48, 40, generator=g) * 4).bfloat16()]
    else:
        leaves = [torch.randn(48, 32, generator=g).bfloat16(), (torch.randn(40, 32, generator=g) / 2).bfloat16()]

    def logits(ps):
        return ps[0] if op == "ce" else F.linear(*ps)

    fused = [p.clone().to(dev).requires_grad_(True) for p in leaves]
    kw = dict(logit_softcap=cap, z_loss=z, label_smoothing=ls, backend=name, return_info=True)
    if op == "ce":
        out, info = trimmed_cross_entropy(fused[0], t.to(dev), keep_ratio, **kw)
    else:
        out, info = trimmed_linear_cross_entropy(*fused, t.to(dev), keep_ratio, chunk_size=16, **kw)
    out.backward()
    kept = info.kept.cpu()
    assert out.dtype == torch.bfloat16 and kept.sum() == (21 if keep_ratio == 0.5 else 41)
    errors = []
    for dtype in (torch.float64, torch.bfloat16):
        ps = [p.clone().to(dtype).requires_grad_(True) for p in leaves]
        want = _kept_mean(_unfused_rows(logits(ps), t, cap, z, ls), kept)
        want.backward()
        errors.append((want.detach().double(), [p.grad.double() for p in ps]))
    (ref, ref_grads), (unfused, unfused_grads) = errors
    ulp = 2.0**-8 * abs(float(ref))
    assert abs(float(out.detach()) - float(ref)) <= max(abs(float(unfused) - float(ref)), ulp)
    for got, want, bf16 in zip(fused, ref_grads, unfused_grads, strict=True):
        assert torch.linalg.norm(got.grad.cpu().double() - want) <= torch.linalg.norm(bf16 - want)


def _bf16_errors(got, want):
    """Largest absolute error of ``got`` against ``want`` (float64), and the scale it is judged by."""
    return (got.double() - want).abs().max().item(), want.abs().max().item()


def _assert_no_worse(got, unfused, want, what):
    """``got`` no further from ``want`` than the unfused bf16 computation, or than one bf16 rounding
    of the result (the fused paths round once, at the end)."""
    err, scale = _bf16_errors(got, want)
    err_u, _ = _bf16_errors(unfused, want)
    assert err <= max(err_u, scale * 2.0**-8), f"{what}: fused error {err:.3g}, unfused bf16 {err_u:.3g}"


# The CE paths test_bf16_no_worse_than_unfused_bf16 (rows of 40 classes) does not reach.
BF16_CE_SHAPES = {"few-classes": (64, 7), "spatial": (2, 5, 4, 6)}


@pytest.mark.parametrize("backend", [b for b in HEAD_BACKENDS if split(b)[0] != "reference"])
@pytest.mark.parametrize("case", BF16_CE_SHAPES, ids=list(BF16_CE_SHAPES))
def test_bf16_few_classes_and_spatial_no_worse_than_unfused(backend, case):
    """bf16 logits with both options: value and gradient no further from the float64 oracle (of the
    same bf16 values) than ``c * tanh(x / c)``, ``F.cross_entropy`` and ``logsumexp`` in bf16. A
    steep ``score_offset`` fixes the kept set, so that every computation reduces the same rows."""
    shape = BF16_CE_SHAPES[case]
    x, t, _, _ = _ce_problem(shape, seed=8)
    xb = x.to(torch.bfloat16)
    cap, z = 4.0, 1e-2
    m = t.numel()
    offset = (-1e4 * torch.arange(m, dtype=torch.float64)).reshape(t.shape)
    name, dev = split(backend)
    xg = xb.clone().to(dev).requires_grad_(True)
    out = trimmed_cross_entropy(
        xg, t.to(dev), 0.5, logit_softcap=cap, z_loss=z, score_offset=offset.float().to(dev), backend=name
    )
    out.backward()
    xo = xb.double().requires_grad_(True)
    want, kept, _, _ = oracle(_rows(xo), t.reshape(-1), 0.5, cap=cap, z=z, score_offset=offset.reshape(-1))
    want.backward()
    xu = xb.clone().requires_grad_(True)
    capped = _rows(cap * torch.tanh(xu / cap))
    valid = t.reshape(-1) != -100
    losses = F.cross_entropy(capped, t.reshape(-1), reduction="none") + z * torch.logsumexp(capped, 1) ** 2
    unfused = torch.where(kept & valid, losses, 0).sum() / kept.sum()
    unfused.backward()
    _assert_no_worse(out.detach().cpu(), unfused.detach(), want.detach(), "loss")
    _assert_no_worse(xg.grad.cpu(), xu.grad, xo.grad, "gradient")


@pytest.mark.parametrize("backend", [b for b in HEAD_BACKENDS if split(b)[0] == "native"])
def test_fp32_capped_rows_close_to_float64(backend):
    """fp32 logits spread over the cap's whole range (saturated ones too) with Gemma 2's cap: the
    per-sample losses, lse and gradient within fp32's own error of the float64 formula (the fp32
    tanh is a rational approximation, not the library's)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 300, generator=g) * 40
    t = torch.randint(0, 300, (64,), generator=g)
    name, dev = split(backend)
    xg = x.clone().to(dev).requires_grad_(True)
    out, info = trimmed_cross_entropy(
        xg, t.to(dev), 1.0, logit_softcap=30.0, z_loss=1e-4, reduction="sum", backend=name, return_info=True
    )
    out.backward()
    xo = x.double().requires_grad_(True)
    capped = 30.0 * torch.tanh(xo / 30.0)
    lse = torch.logsumexp(capped, 1)
    losses = F.cross_entropy(capped, t, reduction="none") + 1e-4 * lse**2
    losses.sum().backward()
    torch.testing.assert_close(info.losses.cpu().double(), losses.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(info.lse.cpu().double(), lse.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xg.grad.cpu().double(), xo.grad, rtol=1e-4, atol=1e-6)


COMPILE_BACKENDS = [b for b in LINEAR_BACKENDS if b in ("reference", "native") or b.endswith("@cuda")]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiles_fullgraph_with_options(backend):
    """Both ops with both options trace into one graph (``fullgraph=True``) and give the eager
    values and gradients."""
    name, dev = split(backend)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(24, 16, generator=g).to(dev)
    w = torch.randn(11, 16, generator=g).to(dev)
    t = torch.randint(0, 11, (24,), generator=g).to(dev)
    kw = dict(logit_softcap=3.0, z_loss=1e-2, backend=name)

    def step(x, w):
        a = trimmed_cross_entropy(x @ w.t(), t, 0.5, **kw)
        return a + trimmed_linear_cross_entropy(x, w, t, 0.5, **kw)

    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach(), *(p.grad for p in leaves)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
