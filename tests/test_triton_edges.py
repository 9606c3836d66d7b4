"""Edge cases found by audits of the Triton kernels (issues 11 and 13), held against the
reference, the native op and ``F.cross_entropy`` (float64 where it matters): narrow integer
targets, out-of-range targets, signed zeros in the ranking key, small losses at large logits,
round-to-nearest-even outputs, double backward and the device guard."""

from __future__ import annotations

import pytest
import torch

from .helpers import BACKENDS, CPU_BACKENDS, run
from .triton_targets import TRITON_TARGETS, any_target, needs_interpreter, target_device

pytestmark = any_target


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("ignore_index", [-100, 11])
def test_narrow_integer_targets_match_int64(backend, dtype, ignore_index):
    """Padding lanes of the select are never valid samples: a uint8 target once turned
    ``other=-100`` into 156 and counted 64 rows instead of 20 (k = 64, loss ~8e-32)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(20, 12, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 12, (20,), generator=gen)
    for reduction in ("mean", "none"):
        ref = run(backend, x, t, 0.5, reduction=reduction, ignore_index=ignore_index)
        out, info, grad = run(backend, x, t.to(dtype), 0.5, reduction=reduction, ignore_index=ignore_index)
        n = int((t != ignore_index).sum())
        assert int(info.k) == int(ref[1].k) == round(0.5 * n)
        assert torch.equal(info.kept, ref[1].kept)
        torch.testing.assert_close(out, ref[0], rtol=0, atol=0)
        torch.testing.assert_close(grad, ref[2], rtol=0, atol=0)


@pytest.mark.parametrize("triton_backend", TRITON_TARGETS)
@pytest.mark.usefixtures("grid_select")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_integer_targets_grid_select(triton_backend, dtype):
    """The same through the multi-program select (blocks of 64 rows: 200 rows leave 56 padding lanes)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(200, 7, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 7, (200,), generator=gen)
    ref_out, ref_info, ref_grad = run("reference", x, t, 0.3)
    out, info, grad = run(triton_backend, x, t.to(dtype), 0.3)
    assert int(info.k) == int(ref_info.k) == 60
    assert torch.equal(info.kept, ref_info.kept)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("triton_backend", TRITON_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_signed_zeros_are_one_key(triton_backend, dtype, keep):
    """A negative class weight makes a loss of -0.0 beside +0.0: one value, so the tie goes to the
    lower index (issue 11's x = [[100, 0], [0, 100]], t = [0, 1], weight = [-1, 1], with 1000 for
    100: ``exp(-1000)`` is 0 in fp32 and fp64, so every backend's losses are exactly -0.0 and +0.0;
    at 100 the Triton losses are the exact -3.7e-44 and +3.7e-44)."""
    x = torch.tensor([[1000.0, 0.0], [0.0, 1000.0]], dtype=dtype)
    t = torch.tensor([0, 1])
    weight = torch.tensor([-1.0, 1.0], dtype=dtype)
    for backend in CPU_BACKENDS:
        out, info, _ = run(backend, x, t, 0.5, keep=keep, weight=weight, reduction="sum")
        assert info.kept.tolist() == [True, False], backend
        assert int(info.k) == 1
    losses = run(triton_backend, x, t, 1.0, weight=weight, reduction="none")[0]
    assert losses.tolist() == [0.0, 0.0] and torch.signbit(losses).tolist() == [True, False]


@pytest.mark.parametrize("triton_backend", TRITON_TARGETS)
@pytest.mark.usefixtures("grid_select")
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_signed_zeros_grid_select(triton_backend, keep):
    """Signed zeros interleaved over several blocks: the grid select keeps the lowest indices."""
    x = torch.tensor([[1000.0, 0.0], [0.0, 1000.0]], dtype=torch.float64).repeat(100, 1)
    t = torch.tensor([0, 1]).repeat(100)
    weight = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    _, ref_info, _ = run("reference", x, t, 0.3, keep=keep, weight=weight, reduction="sum")
    _, info, _ = run(triton_backend, x, t, 0.3, keep=keep, weight=weight, reduction="sum")
    assert torch.equal(info.kept, ref_info.kept)
    assert info.kept.nonzero().squeeze(1).tolist() == list(range(60))


def _loss_and_grad(x: torch.Tensor, t: torch.Tensor, backend: str | None, **kw):
    """Per-sample losses and the gradient of their sum: the Triton op (``backend``) or, with
    ``backend=None``, ``F.cross_entropy`` in float64 on the same (rounded) logits."""
    import torch.nn.functional as F

    from fused_trim import trimmed_cross_entropy

    if backend is None:
        x = x.double()
        kw = {key: v.double() if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
    dev = torch.device("cpu") if backend is None else target_device(backend)
    x = x.detach().to(dev).requires_grad_(True)
    if backend is None:
        out = F.cross_entropy(x, t, reduction="none", **kw)
    else:
        kw = {key: v.to(dev) if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
        out = trimmed_cross_entropy(x, t.to(dev), 1.0, reduction="none", backend="triton", **kw)
    (grad,) = torch.autograd.grad(out.sum(), x)
    return out.detach().cpu(), grad.cpu()


def _as_map(x: torch.Tensor) -> torch.Tensor:
    """Rows ``(M, C)`` as a segmentation map ``(1, C, M)``: the spatial kernels."""
    return x.t().unsqueeze(0).contiguous()


@pytest.mark.parametrize("triton_backend", TRITON_TARGETS)
@pytest.mark.parametrize("layout", ["rows", "spatial"])
def test_small_losses_at_large_logits_keep_relative_precision(triton_backend, layout):
    """The loss is ``(m - x_t) + log s`` and the true class's ``p_t - 1`` comes from the same
    relative quantities (issue 11): at logits near 1000, ``lse - x_t`` had an absolute error of an
    ulp of 1000 (6e-5) and ranked ``[1000, 990]`` (4.54e-5) above ``[0, -9.9]`` (5.02e-5); the loss
    of ``[100, 85]`` (3.06e-7) came out as 0, its gradient too. Against float64, to a few fp32 ulp."""
    x = torch.tensor([[1000.0, 990.0], [0.0, -9.9], [100.0, 85.0], [-8.0, 8.0]])
    t = torch.tensor([0, 0, 0, 1])
    if layout == "spatial":
        x, t = _as_map(x), t.unsqueeze(0)
    loss, grad = _loss_and_grad(x, t, triton_backend)
    ref_loss, ref_grad = _loss_and_grad(x, t, None)
    assert torch.all(loss > 0)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-6, atol=0)
    first_two = (x[..., :2], t[..., :2]) if layout == "spatial" else (x[:2], t[:2])
    kept = run(triton_backend, *first_two, 0.5, keep="easiest")[1].kept
    assert kept.reshape(-1).tolist() == [True, False]


@pytest.mark.parametrize("triton_backend", TRITON_TARGETS)
@pytest.mark.parametrize("layout", ["rows", "spatial"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_losses_at_large_logit_offsets_match_float64(triton_backend, layout, smoothing):
    """Logits of ``1000 + N(0, 1)`` (fp32 spacing 6e-5), weights and label smoothing (``sum_c w_c
    (m - x_c)`` kept relative to the running max too), several class blocks: losses and gradient
    within 1e-5 (relative) of float64 on the same logits."""
    gen = torch.Generator().manual_seed(11)
    x = (1000 + torch.randn(30, 40, generator=gen, dtype=torch.float64)).float()
    t = torch.randint(0, 40, (30,), generator=gen)
    weight = torch.rand(40, generator=gen) + 0.5
    if layout == "spatial":
        x, t = _as_map(x), t.unsqueeze(0)
    kw = dict(weight=weight, label_smoothing=smoothing)
    loss, grad = _loss_and_grad(x, t, triton_backend, **kw)
    ref_loss, ref_grad = _loss_and_grad(x, t, None, **kw)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("triton_backend", TRITON_TARGETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["rows", "spatial"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_outputs_round_to_nearest_even(triton_backend, dtype, layout, reduction):
    """bf16/fp16 outputs (loss, threshold, gradient) are the fp32 results rounded to nearest even,
    under the interpreter as compiled: exactly ``value.to(dtype)`` of the same kernels run on the
    same logits in fp32 (the interpreter truncated fp32 -> bf16: about half the outputs were one
    step low)."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(64, 300, generator=gen).mul(3).to(dtype)
    t = torch.randint(0, 300, (64,), generator=gen)
    if layout == "spatial":
        x, t = _as_map(x[:, :40]), t.remainder(40).unsqueeze(0)
    out, info, grad = run(triton_backend, x, t, 0.7, reduction=reduction, label_smoothing=0.05)
    out32, info32, grad32 = run(triton_backend, x.float(), t, 0.7, reduction=reduction, label_smoothing=0.05)
    assert out.dtype == grad.dtype == dtype
    assert torch.equal(info.kept, info32.kept)
    assert torch.equal(out, out32.to(dtype))
    assert torch.equal(info.threshold, info32.threshold.to(dtype))
    assert torch.equal(grad, grad32.to(dtype))


@needs_interpreter
def test_double_backward_raises_a_clear_error():
    """The gradient is not itself differentiable through the Triton op: a clear error, not
    "no autograd formula was registered"; a first-order create_graph=True still works."""
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    from fused_trim import trimmed_cross_entropy

    out = trimmed_cross_entropy(x, t, 0.5, backend="triton")
    (grad,) = torch.autograd.grad(out, x, create_graph=True)
    ref_out = trimmed_cross_entropy(x, t, 0.5, backend="reference")
    (ref_grad,) = torch.autograd.grad(ref_out, x)
    torch.testing.assert_close(grad.detach(), ref_grad)
    message = "double backward of trimmed_cross_entropy is not supported; use backend='reference'"
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(")):
        torch.autograd.grad(grad.pow(2).sum(), x)


@needs_interpreter
def test_device_guard_is_a_no_op_off_cuda(monkeypatch):
    """On the CPU (the interpreter) the ops take no CUDA device guard: torch.cuda.device is never
    entered (it would raise without a GPU)."""
    from fused_trim.triton import function

    def no_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda.device entered for a CPU tensor")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    x, t = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 5, (8,))
    out, info, grad = run("triton", x, t, 0.5)
    ref = run("reference", x, t, 0.5)
    torch.testing.assert_close(out, ref[0])
    torch.testing.assert_close(grad, ref[2])
    assert isinstance(function.device_guard(x), type(function.device_guard(t)))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2 or "triton@cuda" not in BACKENDS,
    reason="needs two CUDA devices and compiled Triton",
)
def test_tensors_on_a_non_current_cuda_device():
    """Inputs on cuda:1 while cuda:0 is current: the ops launch on the inputs' device (and stream)."""
    from fused_trim import trimmed_cross_entropy

    x, t = torch.randn(300, 40, dtype=torch.float64), torch.randint(0, 40, (300,))
    ref = run("reference", x, t, 0.4, reduction="none")
    with torch.cuda.device(0):
        x1 = x.to("cuda:1").requires_grad_(True)
        out = trimmed_cross_entropy(x1, t.to("cuda:1"), 0.4, reduction="none", backend="triton")
        gen = torch.Generator().manual_seed(0)
        upstream = torch.randn(out.shape, generator=gen).to(torch.bfloat16).to(out.dtype)
        (grad,) = torch.autograd.grad(out, x1, upstream.to("cuda:1"))
        assert out.device == grad.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), ref[0])
    torch.testing.assert_close(grad.cpu(), ref[2])


@pytest.mark.parametrize("layout", ["rows", "spatial"])
@pytest.mark.parametrize("triton_backend", TRITON_TARGETS)
def test_out_of_range_targets_give_nan_never_a_read(triton_backend, layout):
    """Below the dispatch's range check, a target outside [0, C) that is not ignore_index is
    never read through (no ``row_ptr + t`` or ``weight + t`` outside the tensors): its loss is NaN,
    as the native op gives; the other samples are untouched."""
    from fused_trim.triton import function

    x = torch.randn(6, 5, dtype=torch.float64)
    t = torch.tensor([0, 5, 2, -3, -100, 1])
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    if layout == "spatial":
        xin = _as_map(x)
    else:
        xin = x
    dev = target_device(triton_backend)
    xin = xin.to(dev).requires_grad_(True)
    out, losses, kept, k, _, _, _ = function.trimmed_ce_fwd(
        xin, t.to(dev), weight.to(dev), 1.0, None, True, -100, 0.1, 2
    )
    losses, kept = losses.cpu(), kept.cpu()
    good = torch.tensor([True, False, True, False, False, True])
    assert torch.isnan(losses[[1, 3]]).all() and losses[4] == 0
    ref = torch.nn.functional.cross_entropy(x[good], t[good], weight=weight, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(losses[good], ref)
    assert int(k) == 5 and kept.tolist() == [True, True, True, True, False, True]
    (grad,) = torch.autograd.grad(out, xin, torch.ones_like(out))
    grad = grad.cpu().t() if layout == "rows" else grad.cpu()[0]
    assert torch.isnan(grad[:, [1, 3]]).all() and torch.isfinite(grad[:, [0, 2, 5]]).all()
    assert torch.all(grad[:, 4] == 0)
