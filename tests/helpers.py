"""Shared test helpers: which backends can run here, and one call that returns everything.

A backend is named ``"name"`` (CPU tensors; Triton through its interpreter) or ``"name@cuda"``
(CUDA tensors, when a GPU is present): the same contract tests then run on the GPU.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_trim import TrimInfo, native, trimmed_cross_entropy


def available_backends() -> list[str]:
    """Every backend that can run on this machine, CPU first, then the CUDA variants."""
    names = ["reference"]
    try:
        import triton  # noqa: F401

        has_triton = True
    except ImportError:
        has_triton = False
    if has_triton and os.environ.get("TRITON_INTERPRET") == "1":
        names.append("triton")
    if native.is_available(torch.device("cpu")):
        names.append("native")
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        if has_triton:
            names.append("triton@cuda")
        if native.is_available(torch.device("cuda")):
            names.append("native@cuda")
    return names


BACKENDS = available_backends()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]
CPU_BACKENDS = [b for b in BACKENDS if "@" not in b]


def split(backend: str) -> tuple[str, torch.device]:
    """``"triton@cuda"`` -> ``("triton", device("cuda"))``; plain names run on the CPU."""
    name, _, dev = backend.partition("@")
    return name, torch.device(dev or "cpu")


def _to(value, device: torch.device):
    return value.to(device) if isinstance(value, Tensor) else value


def call(backend: str, x: Tensor, t: Tensor, keep_ratio=1.0, **kw):
    """``trimmed_cross_entropy`` with the inputs on the backend's device (``x`` as given)."""
    name, dev = split(backend)
    kw = {key: _to(v, dev) for key, v in kw.items()}
    return trimmed_cross_entropy(x, t.to(dev), _to(keep_ratio, dev), backend=name, **kw)


def tolerances(dtype: torch.dtype) -> dict:
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-12),
        torch.float32: dict(rtol=2e-5, atol=2e-6),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
    }[dtype]


def run(backend, x, t, keep_ratio=1.0, grad_seed=0, **kw):
    """Forward with ``return_info``, backward with a random upstream gradient (same for every
    backend given the same seed). Returns ``(out, info, grad_input)``, on the CPU."""
    _, dev = split(backend)
    # A leaf with exactly x's strides (clone() would make a sliced or padded view contiguous).
    leaf = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=dev)
    x = leaf.copy_(x.detach()).requires_grad_(True)
    out, info = call(backend, x, t, keep_ratio, return_info=True, **kw)
    gen = torch.Generator().manual_seed(grad_seed)
    # Rounded to bf16 so that every dtype sees exactly the same upstream gradient.
    upstream = torch.randn(out.shape, generator=gen).to(torch.bfloat16).to(out.dtype)
    (grad,) = torch.autograd.grad(out, x, upstream.to(dev))
    info = TrimInfo(*(_to(v, torch.device("cpu")) for v in info))
    return out.detach().cpu(), info, grad.cpu()


def make_batch(n, c, dtype=torch.float64, ignore_frac=0.0, seed=0, spatial=(), ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, *spatial), generator=gen, dtype=torch.float64).mul(2).to(dtype)
    t = torch.randint(0, c, (n, *spatial), generator=gen)
    if ignore_frac > 0:
        drop = torch.rand(t.shape, generator=gen) < ignore_frac
        t = torch.where(drop, torch.full_like(t, ignore_index), t)
    return x, t


def assert_close(a: Tensor, b: Tensor, dtype: torch.dtype = torch.float64, **kw) -> None:
    """``a == b`` within ``dtype``'s tolerances (overridable), compared in float64, NaN == NaN."""
    tol = tolerances(dtype)
    tol.update(kw)
    torch.testing.assert_close(a.double(), b.double(), equal_nan=True, **tol)


def f_cross_entropy(x: Tensor, t: Tensor, reduction: str, **kw) -> tuple[Tensor, Tensor]:
    """``F.cross_entropy`` and its input gradient under the same upstream gradient as :func:`run`
    (seed 0, rounded to bf16): the untrimmed oracle."""
    x = x.detach().clone().requires_grad_(True)
    out = F.cross_entropy(x, t.long(), reduction=reduction, **kw)
    gen = torch.Generator().manual_seed(0)
    upstream = torch.randn(out.shape, generator=gen).to(torch.bfloat16).to(out.dtype)
    (grad,) = torch.autograd.grad(out, x, upstream)
    return out.detach(), grad
