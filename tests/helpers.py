"""Shared test helpers: which backends can run here, and one call that returns everything."""

from __future__ import annotations

import os

import torch

from fused_trim import native, trimmed_cross_entropy


def available_backends() -> list[str]:
    """Every backend that can run on this machine's CPU (Triton through its interpreter)."""
    names = ["reference"]
    try:
        import triton  # noqa: F401

        if os.environ.get("TRITON_INTERPRET") == "1":
            names.append("triton")
    except ImportError:
        pass
    if native.is_available(torch.device("cpu")):
        names.append("native")
    return names


BACKENDS = available_backends()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]


def tolerances(dtype: torch.dtype) -> dict:
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-12),
        torch.float32: dict(rtol=2e-5, atol=2e-6),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
    }[dtype]


def run(backend, x, t, keep_ratio=1.0, grad_seed=0, **kw):
    """Forward with ``return_info``, backward with a random upstream gradient (same for every
    backend given the same seed). Returns ``(out, info, grad_input)``."""
    x = x.detach().clone().requires_grad_(True)
    out, info = trimmed_cross_entropy(x, t, keep_ratio, backend=backend, return_info=True, **kw)
    gen = torch.Generator().manual_seed(grad_seed)
    # Rounded to bf16 so that every dtype sees exactly the same upstream gradient.
    upstream = torch.randn(out.shape, generator=gen).to(torch.bfloat16).to(out.dtype)
    (grad,) = torch.autograd.grad(out, x, upstream)
    return out.detach(), info, grad


def make_batch(n, c, dtype=torch.float64, ignore_frac=0.0, seed=0, spatial=(), ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, *spatial), generator=gen, dtype=torch.float64).mul(2).to(dtype)
    t = torch.randint(0, c, (n, *spatial), generator=gen)
    if ignore_frac > 0:
        drop = torch.rand(t.shape, generator=gen) < ignore_frac
        t = torch.where(drop, torch.full_like(t, ignore_index), t)
    return x, t
