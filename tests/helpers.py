"""Shared test helpers: which backends can run here, and one call that returns everything.

A backend is named ``"name"`` (CPU tensors; Triton through its interpreter) or ``"name@cuda"``
(CUDA tensors, when a GPU is present): the same contract tests then run on the GPU.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_trim import TrimInfo, native, trimmed_cross_entropy, trimmed_linear_cross_entropy


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


# The LM head (trimmed_linear_cross_entropy): backends, a random head, the fused and the unfused runs.


def _has_linear(backend: str) -> bool:
    name, _ = split(backend)
    if name == "reference":
        return True
    module = importlib.import_module("fused_trim.triton" if name == "triton" else "fused_trim.native")
    return hasattr(module, "trimmed_linear_cross_entropy_2d")


LM_BACKENDS = [b for b in BACKENDS if _has_linear(b)]
KERNEL_LM_BACKENDS = [b for b in LM_BACKENDS if split(b)[0] != "reference"]


def make_head(n, d, v, dtype=torch.float64, seed=0, ignore_frac=0.0, bias=True, scale=1.0, lead=()):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((*lead, n, d), generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, d, generator=gen, dtype=torch.float64) * (scale / max(d, 1) ** 0.5)).to(dtype)
    b = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    t = torch.randint(0, v, (*lead, n), generator=gen)
    if ignore_frac > 0:
        t[torch.rand(t.shape, generator=gen) < ignore_frac] = -100
    return x, w, b, t


def leaves(*tensors, device):
    return [None if t is None else t.detach().to(device).clone().requires_grad_(True) for t in tensors]


def run_fused(backend, x, w, b, t, keep_ratio=1.0, grad_seed=0, **kw):
    """Forward with ``return_info`` and backward under a random upstream gradient; CPU results."""
    name, dev = split(backend)
    x, w, b = leaves(x, w, b, device=dev)
    for key in ("weight", "score_offset"):
        if kw.get(key) is not None:
            kw[key] = kw[key].to(dev)
    out, info = trimmed_linear_cross_entropy(
        x, w, t.to(dev), keep_ratio, linear_bias=b, backend=name, return_info=True, **kw
    )
    gen = torch.Generator().manual_seed(grad_seed)
    upstream = torch.randn(out.shape, generator=gen).to(torch.bfloat16).to(out.dtype).to(dev)
    inputs = [p for p in (x, w, b) if p is not None]
    grads = list(torch.autograd.grad(out, inputs, upstream))
    if b is None:
        grads.append(None)
    info = TrimInfo(*(v.cpu() if isinstance(v, torch.Tensor) else v for v in info))
    return out.detach().cpu(), info, [None if g is None else g.cpu() for g in grads]


def run_unfused(x, w, b, t, keep_ratio=1.0, grad_seed=0, chunk_size=None, **kw):
    """The oracle: ``trimmed_cross_entropy(F.linear(...))`` on the reference backend."""
    x, w, b = leaves(x, w, b, device=torch.device("cpu"))
    logits = F.linear(x, w, b)
    out, info = trimmed_cross_entropy(
        logits.reshape(-1, logits.shape[-1]), t.reshape(-1), keep_ratio, backend="reference", return_info=True, **kw
    )
    if kw.get("reduction") == "none":
        out = out.reshape(t.shape)
    info = info._replace(losses=info.losses.reshape(t.shape), kept=info.kept.reshape(t.shape))
    gen = torch.Generator().manual_seed(grad_seed)
    upstream = torch.randn(out.shape, generator=gen).to(torch.bfloat16).to(out.dtype)
    inputs = [p for p in (x, w, b) if p is not None]
    grads = list(torch.autograd.grad(out, inputs, upstream))
    if b is None:
        grads.append(None)
    return out.detach(), info, grads


def assert_same(fused, unfused, rtol=1e-9, atol=1e-11):
    out, info, grads = fused
    ref_out, ref_info, ref_grads = unfused
    assert torch.equal(info.kept, ref_info.kept), "kept sets differ"
    assert int(info.k) == int(ref_info.k)
    torch.testing.assert_close(out.double(), ref_out.double(), rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(info.losses.double(), ref_info.losses.double(), rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(
        info.threshold.double(), ref_info.threshold.double(), rtol=rtol, atol=atol, equal_nan=True
    )
    for g, r in zip(grads, ref_grads, strict=True):
        if r is None:
            assert g is None
            continue
        torch.testing.assert_close(g.double(), r.double(), rtol=rtol, atol=atol, equal_nan=True)
    dx = grads[0].reshape(-1, grads[0].shape[-1])
    outside = ~info.kept.reshape(-1)
    assert torch.all(dx[outside] == 0), "input gradient is not exactly zero outside the kept set"


SPAWN_DEADLINE_S = 300.0  # a 2-rank job takes about 10 s here


def spawn_ranks(tmp_path: Path, job: str, world: int, *args) -> list[str]:
    """Run ``_dist_worker.run(rank, job, ...)`` on ``world`` spawned ranks under a deadline (so a
    collective that never completes fails the test instead of hanging the suite); return rank 0's
    lines, or fail with the ranks' tracebacks."""
    import pytest
    import torch.multiprocessing as mp

    from . import _dist_worker

    out = tmp_path / f"{job}.txt"
    ctx = mp.start_processes(
        _dist_worker.run,
        args=(job, world, str(tmp_path / f"{job}.init"), str(out), *args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"{job}: ranks still running after {SPAWN_DEADLINE_S:.0f} s")
    except mp.ProcessExitedException:
        errors = [f.read_text() for f in sorted(tmp_path.glob(f"{job}.txt.rank*.err"))]
        pytest.fail(f"{job}: a rank failed\n" + "\n".join(errors or ["(no traceback written)"]))
    return out.read_text().splitlines()
