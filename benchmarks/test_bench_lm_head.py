"""pytest-benchmark suite of the LM head: forward+backward of each row of :mod:`benchmarks.lm_head`.

    pytest benchmarks/test_bench_lm_head.py --benchmark-only

One group per problem (``lm-head 2048x512x32000 fp32 keep=0.2 cpu``), so the comparison table lists
the rows side by side, fastest first. ``FUSED_TRIM_BENCH_FULL=1`` adds (4096, 1024, 32000).
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import lm_head as L

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _params() -> list:
    params = []
    for device in DEVICES:
        rows = ["linear+cross_entropy", "torch_chunked", "linear+trimmed"]
        rows += [f"fused/{b}" for b in L.fused_backends(device)]
        rows += ["liger", "cce"] if device == "cuda" else []
        for case in L.default_cases(device, quick=not os.environ.get("FUSED_TRIM_BENCH_FULL")):
            for row in rows:
                params.append(pytest.param(device, case, row, id=f"{device}-{case.label.replace(' ', '-')}-{row}"))
    return params


@pytest.mark.parametrize("device, case, row", _params())
def test_lm_head(benchmark, device, case, row):
    n, d, v = case.shape
    dtype = L.DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(v, d, generator=gen) / d**0.5).to(device=device, dtype=dtype).requires_grad_(True)
    t = torch.randint(0, v, (n,), generator=gen).to(device)
    fwd = L.make_step(row, case, x, w, t)
    if fwd is None:
        pytest.skip(f"{row} is not installed here")
    benchmark.group = f"lm-head {case.label} {device}"

    def step():
        x.grad = w.grad = None
        fwd().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
