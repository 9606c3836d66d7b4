"""Selection cost on a GPU: the select against the cross-entropy pass, and the single-program/grid crossover.

1. Select vs cross-entropy at a segmentation-sized batch (``--rows``, default 2**21 = 8 x 512 x 512
   pixels, 19 classes, fp32): per-kernel device times of one forward of the native CUDA op and of
   the Triton op, from ``torch.profiler``. The native select is one block of 1024 threads for any
   number of rows; the question is how many times the cross-entropy pass it costs.
2. The Triton single-program / grid select crossover: the forward at 16k..256k rows with
   ``SINGLE_PROGRAM_MAX_ROWS`` forced above and below the row count (the cross-entropy pass is the
   same in both, so the difference is the select). ``SINGLE_PROGRAM_MAX_ROWS`` should sit where the
   grid starts to win.

    python -m benchmarks.select_timing                   # on CUDA (benchmarks/gpu_check.sh runs it)
    python -m benchmarks.select_timing --smoke           # tiny sizes on the CPU: checks the script runs

A benchmark, not a test: it prints figures and asserts nothing about them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from fused_trim import native, trimmed_cross_entropy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on a GPU), after two warm-up calls."""
    for _ in range(2):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _kernel_times(fn: Callable[[], object], device: torch.device, repeats: int) -> dict[str, float]:
    """Mean device time per call (ms) of each kernel ``fn`` launches (profiler, CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        _sync(device)
    times: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None)
        if total is None:
            total = getattr(evt, "cuda_time_total", 0.0)
        if total and evt.device_type == torch.autograd.DeviceType.CUDA:
            times[evt.key] += total / 1e3 / repeats  # us -> ms
    return dict(times)


def _is_select(name: str) -> bool:
    low = name.lower()
    return any(part in low for part in ("select", "grid_", "radix", "histogram", "ties", "keep"))


def select_vs_ce(rows: int, classes: int, device: torch.device, repeats: int) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, classes, device=device, generator=gen)
    t = torch.randint(0, classes, (rows,), device=device, generator=gen)
    print(f"\n== select vs cross-entropy: forward of ({rows}, {classes}) fp32, keep 0.3, {device}")
    for backend in ("native", "triton"):
        if backend == "native" and not native.is_available(device):
            print(f"  {backend}: unavailable ({native.unavailable_reason(device)})")
            continue

        def fwd(backend=backend):
            return trimmed_cross_entropy(x, t, 0.3, backend=backend)

        try:
            total = _time_ms(fwd, device, repeats)
        except Exception as exc:  # noqa: BLE001 - a measurement: report and go on
            print(f"  {backend}: failed ({type(exc).__name__}: {exc})")
            continue
        print(f"  {backend}: forward {total:.3f} ms (median of {repeats})")
        if device.type != "cuda":
            continue
        kernels = _kernel_times(fwd, device, repeats)
        sel = sum(v for k, v in kernels.items() if _is_select(k))
        ce = sum(v for k, v in kernels.items() if "ce_forward" in k.lower())
        for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1]):
            print(f"    {ms:9.4f} ms  {'select' if _is_select(name) else '      '}  {name[:90]}")
        ratio = f"{sel / ce:.1f}x the CE pass" if ce > 0 else "no CE kernel found by name"
        print(f"  {backend}: cross-entropy kernels {ce:.4f} ms, select kernels {sel:.4f} ms ({ratio})")


def triton_crossover(sizes: list[int], classes: int, device: torch.device, repeats: int) -> None:
    from fused_trim.triton import launch as tf

    print(f"\n== Triton select: single program vs grid, forward of (M, {classes}) fp32, keep 0.3, {device}")
    print(f"   (SINGLE_PROGRAM_MAX_ROWS is {tf.SINGLE_PROGRAM_MAX_ROWS})")
    print(f"  {'rows':>8} {'single ms':>10} {'grid ms':>10}  faster")
    saved = tf.SINGLE_PROGRAM_MAX_ROWS
    first_grid_win = None
    try:
        for m in sizes:
            gen = torch.Generator(device=device).manual_seed(m)
            x = torch.randn(m, classes, device=device, generator=gen)
            t = torch.randint(0, classes, (m,), device=device, generator=gen)
            res = {}
            for mode, limit in (("single", m), ("grid", 0)):
                tf.SINGLE_PROGRAM_MAX_ROWS = limit
                try:
                    fwd = lambda x=x, t=t: trimmed_cross_entropy(x, t, 0.3, backend="triton")  # noqa: E731
                    res[mode] = _time_ms(fwd, device, repeats)
                except Exception as exc:  # noqa: BLE001 - a measurement: report and go on
                    print(f"  {m:>8} {mode} failed ({type(exc).__name__}: {exc})")
                    res[mode] = float("nan")
            faster = "grid" if res["grid"] < res["single"] else "single"
            if faster == "grid" and first_grid_win is None:
                first_grid_win = m
            print(f"  {m:>8} {res['single']:>10.3f} {res['grid']:>10.3f}  {faster}")
    finally:
        tf.SINGLE_PROGRAM_MAX_ROWS = saved
    print(f"  grid first faster at {first_grid_win} rows" if first_grid_win else "  single program faster throughout")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1 << 21, help="rows of the select-vs-CE case (default 2**21)")
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (interpreted Triton): the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
        select_vs_ce(512, args.classes, device, 1)
        triton_crossover([256], args.classes, device, 1)
        return 0
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (or --smoke)")
    device = torch.device("cuda")
    select_vs_ce(args.rows, args.classes, device, args.repeats)
    select_vs_ce(1 << 18, args.classes, device, args.repeats)
    triton_crossover([1 << 14, 1 << 15, 1 << 16, 1 << 17, 1 << 18], args.classes, device, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
