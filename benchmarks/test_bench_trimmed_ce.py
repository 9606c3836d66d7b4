"""pytest-benchmark suite: every backend x case, forward and forward+backward.

    pytest benchmarks/ --benchmark-only                              # the quick case set
    FUSED_TRIM_BENCH_FULL=1 pytest benchmarks/ --benchmark-only      # every case
    pytest benchmarks/ --benchmark-only -k "4096x32000 and fwdbwd"   # one problem
    pytest benchmarks/ --benchmark-only --benchmark-autosave         # then --benchmark-compare

Each benchmark's group is ``"<pass> <case> <device>"``, so pytest-benchmark's comparison table puts
the backends of one problem side by side, fastest first. The ratios against the eager and compiled
references, the bytes floor and peak memory are what ``python -m benchmarks.run`` adds; here each
benchmark carries its floor bytes and ``k`` in ``extra_info``. ``FUSED_TRIM_BENCH_THREADS`` sets
torch's CPU threads (see ``benchmarks/conftest.py``).
"""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks import cases as C

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PASSES = ("fwd", "fwdbwd")


def _params() -> list:
    params = []
    for device in DEVICES:
        names, skipped = C.available_backends(device)
        for case in C.suite_cases(device):
            for pass_ in PASSES:
                ident = f"{device}-{case.shape_str}-{case.dtype}-keep{case.keep_ratio:g}-{pass_}"
                for b in names:
                    if C.runs_at(b, case):
                        params.append(pytest.param(device, case, pass_, b, id=f"{ident}-{b}"))
                for b, why in skipped.items():
                    params.append(pytest.param(device, case, pass_, b, id=f"{ident}-{b}", marks=pytest.mark.skip(why)))
    return params


# One case's inputs and functions at a time: the LM cases hold 0.5-1 GiB per tensor.
_current: dict = {"key": None, "inputs": None, "fns": {}}


def _prepare(device: str, case: C.Case, backend: str):
    key = (device, case)
    if _current["key"] != key:
        _current.update(key=None, inputs=None, fns={})
        _current["inputs"] = C.make_inputs(case, device)
        _current["key"] = key
    x, t = _current["inputs"]
    if backend in C.INPLACE_INPUT:
        x = x.detach().clone().requires_grad_(True)
    if backend not in _current["fns"]:
        fn = C.make_fn(backend, case)
        x.grad = None
        fn(x, t).backward()  # compiles, builds, warms up: never timed
        x.grad = None
        _current["fns"][backend] = fn
    return x, t, _current["fns"][backend]


@pytest.mark.parametrize(("device", "case", "pass_", "backend"), _params())
def test_trimmed_cross_entropy(benchmark, device: str, case: C.Case, pass_: str, backend: str) -> None:
    x, t, fn = _prepare(device, case, backend)

    if pass_ == "fwd":

        def step() -> None:
            fn(x, t)
            C.synchronize(device)

    else:

        def step() -> None:
            x.grad = None
            fn(x, t).backward()
            C.synchronize(device)

    t0 = time.perf_counter()
    step()
    single = time.perf_counter() - t0
    iterations = max(1, min(1000, int(1e-3 / max(single, 1e-7))))
    rounds = max(3, min(50, int(1.0 / max(single * iterations, 1e-7))))
    fwd_b, fwdbwd_b = C.floor_bytes(case, backend)
    benchmark.group = f"{pass_} {case.label} {device}"
    benchmark.extra_info.update(
        backend=backend, k=case.k, floor_bytes=fwd_b if pass_ == "fwd" else fwdbwd_b, threads=torch.get_num_threads()
    )
    benchmark.pedantic(step, rounds=rounds, iterations=iterations, warmup_rounds=1)
    x.grad = None
