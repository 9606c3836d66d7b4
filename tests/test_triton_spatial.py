"""The spatial kernels (``ce_forward_spatial``, ``ce_backward_spatial``) where the contract tests do
not reach: partial pixel blocks, several class blocks, fp16, non-finite logits, all pixels
ignored, strided images read in place, and the fake (meta) shapes ``torch.compile`` traces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .helpers import assert_close, f_cross_entropy, make_batch, run
from .triton_targets import TRITON_TARGETS, any_target, target_device

pytestmark = any_target


def test_block_config_covers_every_class_and_pixel_count():
    from fused_trim.triton.launch import spatial_config

    for c in (1, 2, 3, 16, 17, 1000, 50257):
        for s in (1, 5, 64, 129, 1 << 20):
            for size in (2, 4, 8):
                block_c, block_s, warps = spatial_config(c, s, size)
                assert block_c & (block_c - 1) == 0 and block_s & (block_s - 1) == 0
                assert 1 <= block_c <= 16 and 16 <= block_s <= 256 and warps in (1, 2, 4, 8)
                assert block_c >= min(c, 16) and block_s >= min(s, 128)


@pytest.mark.parametrize("triton_backend", TRITON_TARGETS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_partial_pixel_block_and_several_class_blocks(triton_backend, reduction):
    """C = 37: three class blocks (16, 16, 5); S = 150: a full block of 128 pixels and a partial one;
    weights, label smoothing and ignored pixels; trimmed against the reference."""
    x, t = make_batch(2, 37, ignore_frac=0.25, seed=21, spatial=(10, 15))
    weight = torch.rand(37, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.2
    kw = dict(weight=weight, label_smoothing=0.1)
    out, info, grad = run(triton_backend, x, t, 1.0, reduction=reduction, **kw)
    ref_out, ref_grad = f_cross_entropy(x, t, reduction, **kw)
    assert_close(out, ref_out)
    assert_close(grad, ref_grad)
    assert_close(info.losses, F.cross_entropy(x, t, reduction="none", **kw))
    for keep in ("hardest", "easiest"):
        out, info, grad = run(triton_backend, x, t, 0.3, keep=keep, reduction=reduction, **kw)
        ref_out, ref_info, ref_grad = run("reference", x, t, 0.3, keep=keep, reduction=reduction, **kw)
        assert torch.equal(info.kept, ref_info.kept)
        assert_close(out, ref_out)
        assert_close(grad, ref_grad)
        assert torch.all(grad.movedim(1, -1)[~info.kept] == 0)
        assert torch.all(grad.movedim(1, -1)[info.kept].abs().sum(-1) > 0)


@pytest.mark.parametrize("triton_backend", TRITON_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_maps_accumulate_in_fp32(triton_backend, dtype):
    """fp16/bf16 logits (C > BLOCK_C, S not a block multiple) against the fp64 formula on the same
    rounded logits: losses and gradient within one rounding of the input dtype."""
    x, t = make_batch(2, 21, dtype=dtype, ignore_frac=0.1, seed=22, spatial=(7, 11))
    out, info, grad = run(triton_backend, x, t, 0.6, reduction="sum", label_smoothing=0.05)
    ref_out, ref_info, ref_grad = run("reference", x.double(), t, 0.6, reduction="sum", label_smoothing=0.05)
    assert grad.dtype == dtype and out.dtype == dtype
    assert torch.equal(info.kept, ref_info.kept)
    assert_close(info.losses, ref_info.losses, dtype)
    assert_close(out, ref_out, dtype)
    assert_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("triton_backend", TRITON_TARGETS)
def test_non_finite_logits_in_a_map(triton_backend):
    """NaN, +inf and -inf logits on some pixels: every pixel's loss and gradient as the row kernel
    gives them for the same rows (the (N*S, C) copy), and as F.cross_entropy where it is finite."""
    x, t = make_batch(2, 19, dtype=torch.float32, ignore_frac=0.1, seed=23, spatial=(5, 7))
    x[0, 3, 1, 2] = float("nan")
    t[0, 1, 2] = 0
    x[1, 0, 4, 6] = float("inf")
    x[1, 5, 0, 0] = float("-inf")
    x[0, :, 2, 2] = float("-inf")  # a whole pixel of -inf
    t[0, 2, 2] = 4
    x[1, 7, 3, 3] = float("-inf")
    t[1, 3, 3] = 7  # the target's own logit is -inf: loss +inf
    rows = x.movedim(1, -1).reshape(-1, 19).contiguous()
    for ratio in (1.0, 0.4):
        for reduction in ("none", "sum"):
            out, info, grad = run(triton_backend, x, t, ratio, reduction=reduction)
            r_out, r_info, r_grad = run(triton_backend, rows, t.reshape(-1), ratio, reduction=reduction)
            assert torch.equal(info.kept.reshape(-1), r_info.kept)
            torch.testing.assert_close(info.losses.reshape(-1), r_info.losses, equal_nan=True)
            torch.testing.assert_close(out.reshape(r_out.shape), r_out, equal_nan=True)
            torch.testing.assert_close(grad.movedim(1, -1).reshape(-1, 19), r_grad, equal_nan=True)
            assert torch.all(grad.movedim(1, -1)[~info.kept] == 0)
    losses = info.losses
    ref = F.cross_entropy(x, t, reduction="none")
    assert losses[0, 1, 2].isnan() and losses[0, 2, 2].isnan() and losses[1, 3, 3] == float("inf")
    finite = ref.isfinite()
    assert_close(losses[finite], ref[finite], torch.float32)


@pytest.mark.parametrize("triton_backend", TRITON_TARGETS)
def test_all_pixels_ignored(triton_backend):
    x, t = make_batch(2, 20, dtype=torch.float32, seed=24, spatial=(3, 5))
    t = torch.full_like(t, -100)
    x[0, 0, 0, 0] = float("nan")  # an ignored pixel's logits are never read into the result
    for reduction, expect in (("mean", float("nan")), ("sum", 0.0)):
        out, info, grad = run(triton_backend, x, t, 0.5, reduction=reduction)
        torch.testing.assert_close(out, torch.tensor(expect), equal_nan=True)
        assert int(info.k) == 0 and not info.kept.any()
        assert torch.all(info.losses == 0)
        assert torch.all(grad == 0)
    out, info, grad = run(triton_backend, x, t, 1.0, reduction="none")
    assert torch.all(out == 0) and torch.all(grad == 0) and out.shape == t.shape


@pytest.mark.parametrize("triton_backend", TRITON_TARGETS)
def test_strided_images_are_read_in_place(triton_backend):
    """An (N, C, S) view with padded class and image strides (unit pixel stride) is read in place;
    one without unit pixel stride is copied first. Both against the dense (N, C, S) tensor."""
    from fused_trim._common import Reduction, TrimOptions
    from fused_trim.triton import trimmed_cross_entropy_2d

    opts = TrimOptions(keep_ratio=0.5, label_smoothing=0.1, reduction=Reduction.NONE)
    x, t = make_batch(3, 18, dtype=torch.float32, ignore_frac=0.2, seed=25, spatial=(40,))
    t = t.reshape(-1)
    padded = torch.full((3, 20, 48), float("nan"))
    padded[:, :18, 3:43] = x
    dev = target_device(triton_backend)
    x, t, padded = x.to(dev), t.to(dev), padded.to(dev)
    views = [padded[:, :18, 3:43], x.transpose(1, 2).contiguous().transpose(1, 2)]
    assert views[0].stride() == (960, 48, 1) and views[1].stride(2) != 1
    dense = trimmed_cross_entropy_2d(x.clone().requires_grad_(True), t, opts)
    for view in views:
        xv = view.detach().clone() if view.stride(2) != 1 else view
        xv.requires_grad_(True)
        out, losses, kept, k, thr, _ = trimmed_cross_entropy_2d(xv, t, opts)
        assert torch.equal(kept, dense[2]) and int(k) == int(dense[3])
        torch.testing.assert_close(out, dense[0], rtol=0, atol=0)
        torch.testing.assert_close(losses, dense[1], rtol=0, atol=0)
        (grad,) = torch.autograd.grad(out.sum(), xv)
        assert grad.shape == x.shape and torch.all(grad.isfinite())


def test_fake_shapes_of_the_spatial_ops(monkeypatch):
    """Under FakeTensorMode (the fake impl torch.compile traces) the ops give the spatial shapes:
    per-sample outputs (N * S,), the gradient the input's (N, C, S). Kernel launches are stubbed
    out: on the CPU ``wrap_triton`` would hand fake tensors to the interpreter."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fused_trim.triton import launch, trimmed_ce

    launched = []

    class _NoLaunch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((self.kernel.fn.__name__, grid))

    monkeypatch.setattr(trimmed_ce, "wrap_triton", _NoLaunch)
    monkeypatch.setattr(launch, "wrap_triton", _NoLaunch)
    with FakeTensorMode():
        x = torch.empty(2, 300, 50, dtype=torch.bfloat16)
        t = torch.empty(100, dtype=torch.int64)
        out, losses, kept, k, thr, stats, denom = trimmed_ce.trimmed_ce_fwd(x, t, None, 0.5, None, False, -100, 0.0, 0)
        assert out.shape == losses.shape == kept.shape == (100,) and stats.shape == (2, 100)
        assert out.dtype == torch.bfloat16 and losses.dtype == stats.dtype == torch.float32
        assert k.shape == thr.shape == denom.shape == ()
        grad = trimmed_ce.trimmed_ce_bwd(out, x, t, None, stats, kept, denom, 0.0)
        assert grad.shape == x.shape and grad.dtype == x.dtype
    # 16x128 tiles: one program per image and block of 128 pixels.
    assert launched[0] == ("ce_forward_spatial_kernel", (2,))
    assert launched[-1] == ("ce_backward_spatial_kernel", (2,))
