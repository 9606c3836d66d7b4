"""Checks only a CUDA GPU can make, of the compiled Triton kernels (skipped elsewhere): no host
synchronisation in the LM head, CUDA-graph capture and replay of forward and backward, and the
registers and spills of the kernels as launched (the offline sm_90 compile uses other
specialisations). The edge-case files run compiled on CUDA as well (tests/triton_targets.py)."""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F

from fused_trim import trimmed_cross_entropy, trimmed_linear_cross_entropy

from .triton_targets import needs_cuda

pytestmark = needs_cuda

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _head(n=1000, d=64, v=3000, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(dtype).cuda()
    w = (torch.randn(v, d, generator=gen) / d**0.5).to(dtype).cuda()
    b = torch.randn(v, generator=gen).to(dtype).cuda()
    t = torch.randint(0, v, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < 0.2] = -100
    return x, w, b, t.cuda()


def _step(x, w, b, t, ratio, reduction="mean"):
    """Forward and backward of the LM head: the loss and the three gradients."""
    out = trimmed_linear_cross_entropy(
        x, w, t, ratio, linear_bias=b, backend="triton", reduction=reduction, chunk_size=512
    )
    up = torch.ones_like(out) if reduction == "none" else None
    return (out, *torch.autograd.grad(out, (x, w, b), up))


RATIOS = [pytest.param(0.5, id="float"), pytest.param("tensor", id="tensor"), pytest.param(1.0, id="keep-all")]


def _ratio(ratio):
    return torch.tensor(0.5, device="cuda") if ratio == "tensor" else ratio


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lm_head_never_synchronises(ratio, reduction):
    """Forward and backward under ``set_sync_debug_mode("error")``: any host synchronisation
    (``.item()``, a data-dependent shape, a blocking copy) raises."""
    x, w, b, t = _head()
    x, w, b = (p.requires_grad_(True) for p in (x, w, b))
    _step(x, w, b, t, _ratio(ratio), reduction)  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(x, w, b, t, _ratio(ratio), reduction)
        trimmed_cross_entropy(F.linear(x, w, b), t, _ratio(ratio), backend="triton").backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("ratio", RATIOS)
def test_lm_head_captures_in_a_cuda_graph(ratio):
    """Forward and backward captured once and replayed on new inputs give what eager gives."""
    x, w, b, t = _head(seed=1)
    static = [p.clone().requires_grad_(True) for p in (x, w, b)]
    ratio = _ratio(ratio)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (compiles, fills the allocator) off the capture
            _step(*static, t, ratio)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(*static, t, ratio)
    x2, w2, b2, _ = _head(seed=2)
    with torch.no_grad():
        for p, new in zip(static, (x2, w2, b2), strict=True):
            p.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    eager = _step(*(p.clone().requires_grad_(True) for p in (x2, w2, b2)), t, ratio)
    for a, e in zip(captured, eager, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)  # the same kernels; cuBLAS may pick others


def _launched(kernel) -> list:
    """The compiled specialisations of a ``@triton.jit`` kernel launched on the current device."""
    cache = kernel.device_caches[torch.cuda.current_device()][0]
    compiled = list(cache.values())
    for c in compiled:
        c._init_handles()
    return compiled


def test_registers_and_spills_of_the_launched_kernels():
    """Every kernel as launched by the ops (cross-entropy rows and maps, the LM head, the single
    and the grid select) spills nothing; registers are written to .benchmarks/cuda_resources.txt."""
    from fused_trim.triton import ce_backward, ce_backward_spatial, ce_forward, ce_forward_spatial, launch, select

    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(300, 5000, generator=gen).to(dtype).cuda().requires_grad_(True)
        t = torch.randint(0, 5000, (300,), generator=gen).cuda()
        trimmed_cross_entropy(x, t, 0.3, backend="triton", label_smoothing=0.1).backward()
        m = torch.randn(2, 19, 700, generator=gen).to(dtype).cuda().requires_grad_(True)
        tm = torch.randint(0, 19, (2, 700), generator=gen).cuda()
        trimmed_cross_entropy(m, tm, 0.3, backend="triton", reduction="none").sum().backward()
    big = torch.randn(launch.SINGLE_PROGRAM_MAX_ROWS + 5, 3, device="cuda", requires_grad=True)
    trimmed_cross_entropy(big, torch.randint(0, 3, (big.shape[0],), device="cuda"), 0.5, backend="triton").backward()
    xh, w, b, th = _head()
    for ratio in (0.5, 1.0):
        _step(*(p.clone().requires_grad_(True) for p in (xh, w, b)), th, ratio)
    from fused_trim.triton import grid_select

    kernels = [
        ce_forward.ce_forward_kernel,
        ce_backward.ce_backward_kernel,
        select.select_kernel,
        ce_forward_spatial.ce_forward_spatial_kernel,
        ce_backward_spatial.ce_backward_spatial_kernel,
        *(
            getattr(grid_select, name)
            for name in dir(grid_select)
            if name.startswith("grid_") and name.endswith("_kernel")
        ),
    ]
    lines, spilled = [], []
    for kernel in kernels:
        compiled = _launched(kernel)
        assert compiled, f"{kernel.fn.__name__} was never launched"
        for c in compiled:
            line = f"{kernel.fn.__name__}: registers={c.n_regs} spills={c.n_spills} warps={c.metadata.num_warps}"
            lines.append(line)
            if c.n_spills:
                spilled.append(line)
    out = ROOT / ".benchmarks"
    out.mkdir(exist_ok=True)
    (out / "cuda_resources.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    assert not spilled, spilled
