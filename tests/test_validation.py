"""Bad input raises before any kernel runs, with a message naming the argument and the value."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_trim import native, trimmed_cross_entropy

from .helpers import BACKENDS, CPU_BACKENDS, call, split

X = torch.randn(4, 3)
T = torch.tensor([0, 1, 2, -100])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(keep_ratio=0.0), ValueError, r"keep_ratio must be in \(0, 1\], got 0.0"),
        (dict(keep_ratio=-0.5), ValueError, r"keep_ratio .* got -0.5"),
        (dict(keep_ratio=1.5), ValueError, r"keep_ratio .* got 1.5"),
        (dict(keep_ratio=float("nan")), ValueError, r"keep_ratio .* got nan"),
        (dict(keep_ratio=torch.tensor(1.2)), ValueError, r"keep_ratio .* got 1.2"),
        (dict(keep_ratio=torch.tensor([0.5])), TypeError, r"keep_ratio .* shape \(1,\)"),
        (dict(keep_ratio=torch.tensor(1)), TypeError, r"keep_ratio .* dtype torch.int64"),
        (dict(keep_ratio="half"), TypeError, r"keep_ratio .* 'half'"),
        (dict(keep_ratio=True), TypeError, r"keep_ratio .* True"),
        (dict(keep="hard"), ValueError, r"keep must be one of 'hardest', 'easiest', got 'hard'"),
        (dict(reduction="avg"), ValueError, r"reduction must be one of .* got 'avg'"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\], got 1.5"),
        (dict(label_smoothing=-0.1), ValueError, r"label_smoothing .* got -0.1"),
        (dict(ignore_index=1.0), TypeError, r"ignore_index must be an int, got 1.0"),
        (dict(weight=torch.ones(4)), ValueError, r"weight must be a 1-D tensor of length C = 3, got \(4,\)"),
        (dict(weight=torch.ones(3, 1)), ValueError, r"weight .* got \(3, 1\)"),
        (dict(weight=torch.ones(3, dtype=torch.long)), TypeError, r"weight must be floating point"),
        (dict(target=torch.tensor([0.0, 1.0, 2.0, 0.0])), TypeError, r"class-probability targets are not supported"),
        (dict(target=torch.tensor([0, 1, 3, -100])), ValueError, r"target holds 3, outside \[0, 3\)"),
        (dict(target=torch.tensor([0, -1, 2, 1])), ValueError, r"target holds -1, outside \[0, 3\)"),
        (dict(target=torch.tensor([0, 1, 2])), ValueError, r"target shape \(3,\) does not match input shape \(4, 3\)"),
        (dict(target=torch.tensor([True, False, True, True])), TypeError, r"target .* torch.bool"),
        (dict(input=torch.ones(4, 3, dtype=torch.long)), TypeError, r"input must be a floating-point .* torch.int64"),
        (dict(input=torch.tensor(1.0)), ValueError, r"input must have at least 1 dimension"),
        (dict(input=torch.ones(4, 0), target=torch.zeros(4, dtype=torch.long)), ValueError, r"C = 0"),
        (dict(input=torch.ones(4, 3, 2)), ValueError, r"expected target of shape \(4, 2\)"),
    ],
)
def test_bad_input_raises(backend, kwargs, exc, match):
    args = dict(input=X, target=T, keep_ratio=0.5)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        trimmed_cross_entropy(args.pop("input"), args.pop("target"), args.pop("keep_ratio"), backend=backend, **args)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cuda'"):
        trimmed_cross_entropy(X, T, backend="cuda")


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run here: input is on cpu.*TRITON_INTERPRET=1"):
        trimmed_cross_entropy(X, T, backend="triton")


def test_auto_on_cpu_never_picks_triton(monkeypatch):
    """auto uses native (when built) or the reference on the CPU, even under the interpreter."""
    import fused_trim.functional as functional

    picked = functional._resolve_backend("auto", X.device)
    assert picked == ("native" if native.is_available(torch.device("cpu")) else "reference")


def test_validation_runs_before_any_backend(monkeypatch):
    import fused_trim.functional as functional

    def boom(name):
        raise AssertionError("a backend ran on bad input")

    monkeypatch.setattr(functional, "_backend_fn", boom)
    with pytest.raises(ValueError, match="weight"):
        trimmed_cross_entropy(X, T, 0.5, weight=torch.ones(5))
    # The class range too, except on the native CPU op, which checks it in its own first pass
    # (test_bad_input_raises holds it to the same message).
    with pytest.raises(ValueError, match="target holds 7"):
        trimmed_cross_entropy(X, torch.tensor([0, 1, 7, 0]), 0.5, backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weight_requiring_grad_raises_as_f_cross_entropy_does(backend, reduction):
    """No backend computes a gradient for the class weights: a weight that requires grad is an
    error (F.cross_entropy raises a RuntimeError too), not a silent ``weight.grad = None``."""
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 1, -100, 0])
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        F.cross_entropy(x, t, weight=weight, reduction=reduction)
    with pytest.raises(RuntimeError, match=r"weight requires grad.*weight\.detach\(\)"):
        call(backend, x, t, 0.5, weight=weight, reduction=reduction)
    with pytest.raises(RuntimeError, match="weight requires grad"):
        call(backend, x.detach(), t, 0.5, weight=weight, reduction=reduction)  # as torch: input need not
    # Without grad mode there is no gradient to miss (torch accepts it too).
    with torch.no_grad():
        got = call(backend, x, t, 1.0, weight=weight, reduction=reduction)
        expected = F.cross_entropy(x, t, weight=weight, reduction=reduction)
    torch.testing.assert_close(got.cpu(), expected)


def test_weight_requiring_grad_is_rejected_before_any_backend(monkeypatch):
    import fused_trim.functional as functional

    def boom(name):
        raise AssertionError("a backend ran")

    monkeypatch.setattr(functional, "_backend_fn", boom)
    with pytest.raises(RuntimeError, match="weight requires grad"):
        trimmed_cross_entropy(X, T, 0.5, weight=torch.ones(3, requires_grad=True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_ratio_tensor_reaches_the_backend_as_a_host_float(backend, monkeypatch):
    """A CPU 0-dim keep_ratio is read on the host (free) once, in dispatch: no backend then
    copies it to the input's device on every call (a synchronising copy on CUDA)."""
    import fused_trim.functional as functional

    seen = []
    real = functional._backend_fn

    def spy(name):
        fn = real(name)

        def wrapped(x2d, t1d, opts):
            seen.append(opts.keep_ratio)
            return fn(x2d, t1d, opts)

        return wrapped

    monkeypatch.setattr(functional, "_backend_fn", spy)
    x = torch.randn(10, 4, dtype=torch.float64)
    t = torch.randint(0, 4, (10,))
    for ratio in (torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.7)):
        out = trimmed_cross_entropy(x, t, ratio, backend=backend, reduction="sum")
        assert type(seen[-1]) is float and seen[-1] == ratio.item()  # the tensor's value exactly
        torch.testing.assert_close(out, trimmed_cross_entropy(x, t, ratio.item(), backend=backend, reduction="sum"))
    assert len(seen) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.endswith("@cuda")])
def test_cpu_ratio_tensor_with_cuda_input_never_syncs(backend):
    """No host-to-device copy of a CPU ratio per call (that copy synchronises the stream)."""
    name, dev = split(backend)
    x = torch.randn(512, 100, device=dev, requires_grad=True)
    t = torch.randint(0, 100, (512,), device=dev)
    ratio = torch.tensor(0.3, dtype=torch.float64)  # on the CPU
    trimmed_cross_entropy(x, t, ratio, backend=name).backward()  # warm-up: compile, load
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = trimmed_cross_entropy(x, t, ratio, backend=name)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = trimmed_cross_entropy(x.detach(), t, 0.3, backend="reference")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_resolve_backend_says_what_runs(monkeypatch):
    """The public resolver names the backend a call would run, and rejects what cannot run here."""
    from fused_trim import resolve_backend

    expected = "native" if native.is_available(torch.device("cpu")) else "reference"
    assert resolve_backend() == resolve_backend("auto", torch.device("cpu")) == expected
    assert resolve_backend("reference", "cpu") == "reference"
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cuda'"):
        resolve_backend("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run here: input is on cpu"):
        resolve_backend("triton", "cpu")
