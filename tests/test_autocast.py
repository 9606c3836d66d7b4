"""Both ops under ``torch.autocast`` against the unfused ``F.linear`` + cross-entropy under the same
autocast, and against a float64 oracle of the operands autocast hands ``F.linear``.

Under autocast ``F.linear`` casts its operands to the autocast dtype and ``F.cross_entropy`` forms
the loss of its bf16/fp16 logits in fp32. The fused ops must do the same: their GEMM operands are
the cast ones, their loss fp32, and each gradient comes back in its parameter's own dtype. The
oracle is the float64 loss of exactly those cast operands (the cast is the identity for the
gradient), trimmed by the reference selection. The fused ops never round the logits, so their
error against it is far below the unfused path's; the fp32 operands' own result is not (it differs
by the operands' rounding), which is what each backend returned before autocast was handled.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_trim import TrimmedLinearCrossEntropyLoss, trimmed_cross_entropy, trimmed_linear_cross_entropy

from .helpers import BACKENDS, split

# The LM head has no native CUDA kernel.
LINEAR_BACKENDS = [b for b in BACKENDS if b != "native@cuda"]

# Covering set of the LM head: keep-all (the gradient formed in the forward) and trimmed, each
# reduction, both directions, bias or not, fp32 or bf16 hidden states with an fp32 head (the mixed
# dtypes a mixed-precision model hands over), class weights, smoothing, ignored rows.
LINEAR_CASES = {
    "keep_all-mean-fp32-bias": dict(keep_ratio=1.0, reduction="mean", x_dtype=torch.float32, bias=True),
    "keep_all-sum-bf16x-smooth": dict(
        keep_ratio=1.0, reduction="sum", x_dtype=torch.bfloat16, bias=False, label_smoothing=0.1
    ),
    "hardest-mean-bf16x-bias-weight": dict(
        keep_ratio=0.5, reduction="mean", x_dtype=torch.bfloat16, bias=True, class_weight=True
    ),
    "easiest-none-fp32": dict(keep_ratio=0.3, reduction="none", x_dtype=torch.float32, bias=False, keep="easiest"),
}


def _autocast(dev: torch.device, enabled: bool = True):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=enabled)


def _linear_problem(dev, x_dtype, bias, class_weight=False, n=37, d=24, v=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(x_dtype)
    w = torch.randn(v, d, generator=g) * 0.4
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[::7] = -100
    cw = torch.rand(v, generator=g) + 0.5 if class_weight else None
    upstream = torch.randn(n, generator=g)
    to = (lambda a: None if a is None else a.to(dev)) if dev.type != "cpu" else (lambda a: a)
    return to(x), to(w), to(b), to(t), to(cw), to(upstream)


def _leaves(*tensors):
    return [None if a is None else a.detach().clone().requires_grad_(True) for a in tensors]


def _grads(out, upstream, params):
    g = upstream.to(out.dtype) if out.dim() == 1 else torch.ones_like(out)
    out.backward(g)
    return [None if p is None else p.grad for p in params]


def _max_err(a, b):
    return 0.0 if a is None else float((a.detach().double() - b.detach().double()).abs().max())


def _oracle(x, w, b, t, kw, upstream):
    """float64 of the autocast-cast operands (``F.linear``'s casts; straight through for the
    gradient), trimmed by the reference selection: ``(out, [d x, d w, d b])``."""
    cast = [None if a is None else a.detach().to(torch.bfloat16).double().requires_grad_(True) for a in (x, w, b)]
    out = trimmed_cross_entropy(F.linear(cast[0], cast[1], cast[2]), t, backend="reference", **kw)
    return out.detach(), _grads(out, upstream.double(), cast)


@pytest.mark.parametrize("case", list(LINEAR_CASES))
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_linear_under_autocast_is_the_unfused_path_without_its_rounding(backend, case):
    name, dev = split(backend)
    spec = dict(LINEAR_CASES[case])
    x_dtype, bias, class_weight = spec.pop("x_dtype"), spec.pop("bias"), spec.pop("class_weight", False)
    x, w, b, t, cw, upstream = _linear_problem(dev, x_dtype, bias, class_weight)
    kw = dict(spec, weight=cw)
    want, want_grads = _oracle(x, w, b, t, kw, upstream)

    params = _leaves(x, w, b)
    with _autocast(dev):
        out = trimmed_linear_cross_entropy(params[0], params[1], t, linear_bias=params[2], backend=name, **kw)
    got_grads = _grads(out, upstream, params)

    unfused_params = _leaves(x, w, b)
    with _autocast(dev):
        logits = F.linear(*unfused_params)
        assert logits.dtype == torch.bfloat16
        unfused = trimmed_cross_entropy(logits, t, backend="reference", **kw)
    unfused_grads = _grads(unfused, upstream, unfused_params)

    # The loss of bf16 logits is fp32 under autocast (F.cross_entropy's), each gradient in its
    # parameter's own dtype.
    assert out.dtype == unfused.dtype == torch.float32
    for p, g in zip(params, got_grads, strict=True):
        if p is not None:
            assert g is not None and g.dtype == p.dtype and torch.isfinite(g).all()
    # The GEMM ran on the cast operands, accumulated in fp32 and never rounded: fp32 precision
    # against the oracle (the fp32 operands' loss is ~1e-3 away from it; so is the unfused path).
    scale = 1.0 + float(want.abs().max())
    assert _max_err(out, want) <= 2e-5 * scale, (_max_err(out, want), _max_err(unfused, want))
    assert _max_err(out, want) <= _max_err(unfused, want) + 1e-6 * scale
    # Gradients: rounded once to bf16 where the unfused path rounds the logits' gradient and then
    # the GEMM's result: no worse (a margin for the one rounding both share).
    for got, unf, ref, label in zip(got_grads, unfused_grads, want_grads, ("input", "weight", "bias"), strict=True):
        if ref is None:
            continue
        err, err_unfused = _max_err(got, ref), _max_err(unf, ref)
        assert err <= 1.25 * err_unfused + 1e-6 * (1.0 + float(ref.abs().max())), (label, err, err_unfused)


# Covering set of the cross-entropy op: bf16 and fp16 logits (fp32 loss under autocast), keep-all
# and trimmed, each reduction, a segmentation map, smoothing and class weights.
CE_CASES = {
    "bf16-keep_all-mean": dict(dtype=torch.bfloat16, keep_ratio=1.0, reduction="mean"),
    "fp16-hardest-sum-smooth": dict(dtype=torch.float16, keep_ratio=0.4, reduction="sum", label_smoothing=0.1),
    "bf16-map-easiest-none-weight": dict(
        dtype=torch.bfloat16, keep_ratio=0.5, reduction="none", keep="easiest", class_weight=True, spatial=True
    ),
}


@pytest.mark.parametrize("case", list(CE_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_under_autocast_gives_the_fp32_loss_of_the_logits(backend, case):
    """As ``F.cross_entropy`` under autocast: the loss of bf16/fp16 logits formed and returned in
    fp32, the gradient in the logits' dtype; values to fp32 precision of the float64 loss of the
    same logits (rounded to bf16/fp16, a loss is off by ~1e-3)."""
    name, dev = split(backend)
    spec = dict(CE_CASES[case])
    dtype, class_weight, spatial = spec.pop("dtype"), spec.pop("class_weight", False), spec.pop("spatial", False)
    g = torch.Generator().manual_seed(1)
    shape = (3, 11, 5, 4) if spatial else (41, 13)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(dev)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g).to(dev)
    t.view(-1)[::6] = -100
    kw = dict(spec, weight=(torch.rand(shape[1], generator=g) + 0.5).to(dev) if class_weight else None)

    x64 = x.detach().double().requires_grad_(True)
    want = trimmed_cross_entropy(x64, t, backend="reference", **kw)
    upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(2)).to(dev)
    (want_grad,) = _grads(want, upstream.double(), [x64])

    leaf = x.detach().clone().requires_grad_(True)
    with _autocast(dev):
        out, info = trimmed_cross_entropy(leaf, t, backend=name, return_info=True, **kw)
    (grad,) = _grads(out, upstream, [leaf])

    assert out.dtype == info.threshold.dtype == info.losses.dtype == torch.float32
    assert grad.dtype == dtype
    scale = 1.0 + float(want.detach().abs().max())
    assert _max_err(out, want) <= 2e-5 * scale
    per_sample = F.cross_entropy(
        x64.detach(),
        t,
        weight=None if kw["weight"] is None else kw["weight"].double(),
        reduction="none",
        label_smoothing=kw.get("label_smoothing", 0.0),
    )
    assert _max_err(info.losses, per_sample) <= 2e-5 * (1.0 + float(per_sample.abs().max()))
    # The gradient rounded once to the logits' dtype, as F.cross_entropy's under autocast.
    torch.testing.assert_close(grad.double(), want_grad, **_rounding_tolerance(dtype))


def _rounding_tolerance(dtype: torch.dtype) -> dict:
    eps = torch.finfo(dtype).eps
    return dict(rtol=eps, atol=eps * 1e-3)


@pytest.mark.parametrize("bias_dtype", [None, torch.float32])
def test_mixed_dtypes_outside_autocast_raise_naming_the_argument(bias_dtype):
    x, w, b, t, _, _ = _linear_problem(torch.device("cpu"), torch.bfloat16, bias_dtype is not None)
    name = "linear_weight"
    if bias_dtype is not None:  # a matching head, a bias of another dtype
        w = w.to(torch.bfloat16)
        name = "linear_bias"
    with pytest.raises(
        TypeError, match=rf"{name} has dtype torch.float32 but input has dtype torch.bfloat16.*autocast"
    ):
        trimmed_linear_cross_entropy(x, w, t, linear_bias=b, backend="reference")
    # ... and inside a region where autocast is switched off again.
    with _autocast(x.device), _autocast(x.device, enabled=False):
        with pytest.raises(TypeError, match=f"{name} has dtype"):
            trimmed_linear_cross_entropy(x, w, t, linear_bias=b, backend="reference")


@pytest.mark.parametrize("backend", [b for b in LINEAR_BACKENDS if "@" not in b])
def test_disabled_region_and_fp64_are_the_plain_op_bitwise(backend):
    """Autocast switched off inside an enabled region, and fp64 operands (which autocast leaves
    alone), give bitwise the result and gradients of a call outside autocast."""
    dev = torch.device("cpu")
    for dtype, enabled in ((torch.float32, False), (torch.float64, True)):
        x, w, b, t, _, upstream = _linear_problem(dev, dtype, bias=True)
        w, b = w.to(dtype), b.to(dtype)
        plain_params = _leaves(x, w, b)
        plain = trimmed_linear_cross_entropy(*plain_params[:2], t, 0.5, linear_bias=plain_params[2], backend=backend)
        plain_grads = _grads(plain, upstream, plain_params)
        params = _leaves(x, w, b)
        with _autocast(dev), _autocast(dev, enabled=enabled):
            out = trimmed_linear_cross_entropy(*params[:2], t, 0.5, linear_bias=params[2], backend=backend)
        grads = _grads(out, upstream, params)
        assert out.dtype == dtype and torch.equal(out, plain)
        for a, c in zip(grads, plain_grads, strict=True):
            assert torch.equal(a, c)


@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_backward_inside_the_autocast_region_equals_backward_outside(backend, keep_ratio):
    """A backward called inside the region (``loss.backward()`` under the ``with``): the native and
    Triton backward ops run as outside it, bitwise. The reference's backward is made of autograd
    ops, which autocast casts again there as it does any PyTorch code's: equal within bf16."""
    name, dev = split(backend)
    x, w, b, t, _, upstream = _linear_problem(dev, torch.bfloat16, bias=True)
    results = []
    for inside in (False, True):
        params = _leaves(x, w, b)
        with _autocast(dev):
            out = trimmed_linear_cross_entropy(*params[:2], t, keep_ratio, linear_bias=params[2], backend=name)
            if inside:
                grads = _grads(out, upstream, params)
        if not inside:
            grads = _grads(out, upstream, params)
        results.append(grads)
    for a, c in zip(*results, strict=True):
        if name == "reference":
            torch.testing.assert_close(a, c, rtol=2**-7, atol=2**-7 * float(c.abs().max()))
        else:
            assert torch.equal(a, c)


def test_module_with_a_bf16_backbone_and_an_fp32_head():
    """TrimmedLinearCrossEntropyLoss on bf16 hidden states with the model's fp32 head parameter
    inside autocast: the head's gradient in fp32, as the unfused path gives it."""
    dev = torch.device("cpu")
    x, w, _, t, _, _ = _linear_problem(dev, torch.bfloat16, bias=False)
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        head.weight.copy_(w)
    criterion = TrimmedLinearCrossEntropyLoss(head.weight, 0.5, backend="reference")
    with _autocast(dev):
        loss = criterion(x, t)
        unfused = trimmed_cross_entropy(head(x), t, 0.5, backend="reference")
    assert loss.dtype == torch.float32 and criterion.info.losses.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, head.weight)
    (want,) = torch.autograd.grad(unfused, head.weight)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, want, rtol=2e-2, atol=2e-3)


COMPILE_BACKENDS = [b for b in LINEAR_BACKENDS if b in ("native", "triton@cuda")]


@pytest.mark.skipif(not COMPILE_BACKENDS, reason="no compiled backend here (native not built, no CUDA)")
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_fullgraph_compile_under_autocast(backend):
    """The autocast rule is read while tracing: one graph (no break) with the casts, the custom
    ops' fake kernels for the bf16 operands and the fp32 result; the eager values and gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend

    name, dev = split(backend)
    x, w, b, t, _, _ = _linear_problem(dev, torch.bfloat16, bias=True)

    def step(x, w, b, t, logits):
        with _autocast(dev):
            head = trimmed_linear_cross_entropy(x, w, t, 0.5, linear_bias=b, backend=name)
            ce = trimmed_cross_entropy(logits, t, 0.5, backend=name, reduction="sum")
        return head + ce

    logits = torch.randn(t.shape[0], 9, device=dev).to(torch.bfloat16)
    t_ce = t.clamp(max=8)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    results = []
    for fn in (step, compiled):
        params = _leaves(x, w, b, logits)
        out = fn(*params[:3], t_ce, params[3])
        out.backward()
        results.append([out.detach(), *(p.grad for p in params)])
    assert counter.frame_count == 1
    assert results[1][0].dtype == torch.float32
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want)


def test_triton_ops_give_the_result_dtype_under_fake_tensors(monkeypatch):
    """What ``torch.compile`` traces of the Triton ops (launches stubbed: on the CPU they would
    hand fake tensors to the interpreter): bf16 operands, an fp32 ``out`` and ``threshold``."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fused_trim.triton import launch, linear_ce, trimmed_ce

    class _NoLaunch:
        def __init__(self, kernel):
            pass

        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for module in (linear_ce, launch, trimmed_ce):
        monkeypatch.setattr(module, "wrap_triton", _NoLaunch)
    f32, bf16 = torch.float32, torch.bfloat16
    with FakeTensorMode():
        x = torch.empty(40, 16, dtype=bf16)
        w = torch.empty(30, 16, dtype=bf16)
        t = torch.empty(40, dtype=torch.int64)
        res = trimmed_ce.trimmed_ce_fwd(x, t, None, 0.5, None, False, -100, 0.0, 1, None, f32)
        assert res[0].dtype == res[4].dtype == f32 and res[1].dtype == f32
        loss, w_y, stats = linear_ce.linear_ce_rows(x, w, None, t, None, -100, 0.0, 32)
        res = linear_ce.linear_ce_trimmed(loss, w_y, stats, x, w, None, t, None, 0.5, None, False, -100, 0.0, 0, 20, 32)
        assert res[0].dtype == res[3].dtype == bf16  # the input's without a result dtype
        res = linear_ce.linear_ce_trimmed(
            loss, w_y, stats, x, w, None, t, None, 0.5, None, False, -100, 0.0, 0, 20, 32, None, f32
        )
        assert res[0].shape == (40,) and res[0].dtype == res[3].dtype == f32
        res = linear_ce.linear_ce_keep_all(x, w, None, t, None, False, -100, 0.0, 1, 32, True, True, f32)
        assert res[0].dtype == res[4].dtype == f32 and res[6].dtype == f32
