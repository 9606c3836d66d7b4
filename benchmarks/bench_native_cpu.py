"""CPU benchmark of the native op against the reference, the compiled reference and F.cross_entropy.

Forward + backward of a trimmed cross-entropy (fp32, keep_ratio 0.5 by default), each case timed in
the same run, reported as ratios, beside the bytes floor: the logits read once in the forward, the
kept rows read and every row of the gradient written in the backward, over the copy bandwidth
measured on this machine in the same run. Peak memory is measured per backend in a child process
(the rise of the resident-set high-water mark over the inputs), and reported beside the size of the
gradient buffer, which every backend must allocate.

    python benchmarks/bench_native_cpu.py                  # the default cases (below)
    python benchmarks/bench_native_cpu.py --shape 4096x32000 --repeats 7
    python benchmarks/bench_native_cpu.py --shape 8x19x128x128 --dtype bfloat16 --threads 1

A shape is NxC (rows) or NxCxd1x... (a segmentation map: one sample per pixel, the class
dimension strided in memory). The defaults are the three row shapes the CPU op was tuned on and
the segmentation case (8, 19, 128, 128) in fp32 and bf16.

A benchmark, not a test: the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fused_trim import native, trimmed_cross_entropy  # noqa: E402

DEFAULT_CASES = [
    ((4096, 32000), "float32"),
    ((256, 100), "float32"),
    ((65536, 10), "float32"),
    ((8, 19, 128, 128), "float32"),
    ((8, 19, 128, 128), "bfloat16"),
]


def _make(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    return x, t


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in shape)


def _fns(keep_ratio: float):
    ref = lambda x, t: trimmed_cross_entropy(x, t, keep_ratio, backend="reference")  # noqa: E731
    return {
        "reference": ref,
        "reference_compiled": torch.compile(ref),
        "F.cross_entropy": lambda x, t: F.cross_entropy(x, t),
        "native": lambda x, t: trimmed_cross_entropy(x, t, keep_ratio, backend="native"),
    }


def _time(fn, x, t, repeats: int, warmup: int) -> float:
    times = []
    for i in range(warmup + repeats):
        x.grad = None
        t0 = time.perf_counter()
        fn(x, t).backward()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    x.grad = None
    return statistics.median(times), min(times)


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 7) -> float:
    """Bytes per second of a large tensor copy (read + write), into a warm destination."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _rss_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(name: str, shape: tuple[int, ...], dtype: torch.dtype, keep_ratio: float) -> None:
    """Child process: print the peak extra resident memory of one forward+backward.

    The resident-set high-water mark (VmHWM) is reset (``/proc/self/clear_refs``) after the
    inputs exist, so the figure is what the forward+backward itself adds at its peak.
    """
    x, t = _make(shape, dtype)
    fn = _fns(keep_ratio)[name]
    if name == "native":
        native.is_available(torch.device("cpu"))
    # Warm up on a small problem (compilation, thread pools) without touching the big one.
    xs, ts = _make((2, *shape[1:]) if len(shape) > 2 else (64, shape[1]), dtype)
    fn(xs, ts).backward()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = _rss_status("VmRSS")
    fn(x, t).backward()
    after = _rss_status("VmHWM")
    print(json.dumps({"peak_extra": after - before}))


def peak_memory(name: str, shape: tuple[int, ...], dtype: torch.dtype, keep_ratio: float) -> int | None:
    cmd = [sys.executable, __file__, "--peak-child", name, "--shape", _fmt(shape), "--keep", str(keep_ratio),
           "--dtype", str(dtype).removeprefix("torch."), "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return int(json.loads(line)["peak_extra"])
    print(proc.stderr[-2000:], file=sys.stderr)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", help="NxC or NxCxd1x... (repeatable); default: the cases above")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16 or float64")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-memory", action="store_true", help="skip the per-backend peak-memory runs")
    p.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.shape:
        cases = [(tuple(int(v) for v in s.split("x")), args.dtype or "float32") for s in args.shape]
    else:
        cases = [c for c in DEFAULT_CASES if args.dtype is None or c[1] == args.dtype]

    if args.peak_child:
        _peak_child(args.peak_child, cases[0][0], getattr(torch, cases[0][1]), args.keep)
        return

    reason = native.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        sys.exit(f"native op unavailable: {reason}")
    bw = copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"copy bandwidth (read + write): {bw / 1e9:.1f} GB/s; keep_ratio {args.keep}; "
          f"forward+backward, median and min of {args.repeats} (30 for small shapes)")
    print(f"load average before the run: {os.getloadavg()[0]:.2f} (other processes skew the figures)")
    fns = _fns(args.keep)
    for shape, dtype_name in cases:
        dtype = getattr(torch, dtype_name)
        x, t = _make(shape, dtype)
        elem = x.element_size()
        numel = x.numel()
        floor_bytes = numel * elem * (1 + args.keep + 1)  # fwd read, bwd read kept, bwd write all
        floor = floor_bytes / bw
        warmup = 2 if numel >= 1 << 24 else 5
        repeats = args.repeats if numel >= 1 << 24 else max(args.repeats, 30)
        stats = {name: _time(fn, x, t, repeats, warmup) for name, fn in fns.items()}
        times = {name: med for name, (med, _) in stats.items()}
        dims = "(N, C)" if len(shape) == 2 else "(N, C, d...)"
        print(f"\n{dims} = {shape}, {dtype_name}; bytes floor {floor * 1e3:.2f} ms")
        print(f"  {'':20s} {'median':>10s} {'min':>10s}")
        for name, (med, best) in stats.items():
            print(f"  {name:20s} {med * 1e3:8.3f}ms {best * 1e3:8.3f}ms")
        nat, nat_min = stats["native"]
        for other in ("reference", "reference_compiled", "F.cross_entropy"):
            print(f"  native speed-up over {other + ':':20s} {times[other] / nat:7.2f}x "
                  f"(min/min {stats[other][1] / nat_min:7.2f}x)")
        print(f"  native / bytes floor:                    {nat / floor:7.2f}x (min {nat_min / floor:.2f}x)")
        if not args.no_memory:
            grad_mb = numel * elem / 2**20
            print(f"  peak extra resident memory (gradient buffer {grad_mb:.1f} MiB):")
            for name in fns:
                peak = peak_memory(name, shape, dtype, args.keep)
                if peak is not None:
                    print(f"    {name:20s} {peak / 2**20:9.1f} MiB  (beyond the gradient: "
                          f"{(peak / 2**20 - grad_mb):8.1f} MiB)")


if __name__ == "__main__":
    main()
