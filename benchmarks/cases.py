"""What is benchmarked and how it is measured; shared by ``benchmarks.run`` and the pytest-benchmark suite.

Backends (the names used in every table):

- ``F.cross_entropy``: ``torch.nn.functional.cross_entropy``, eager, *no trimming* (what users compare to).
- ``reference``: ``trimmed_cross_entropy(..., backend="reference")``, eager: the *eager reference*.
- ``topk_compiled``: ``torch.compile`` (static shapes) of the user's natural pure-torch alternative,
  ``F.cross_entropy(reduction="none")`` -> ``topk(k)`` -> ``mean``, with ``k`` computed on the host from
  the batch size: the *compiled reference*. ``torch.compile`` of ``trimmed_cross_entropy(backend=
  "reference")`` itself graph-breaks (host syncs in validation, ``nonzero``, ``int(k)``), so that is not
  the baseline.
- ``topk_eager``: the same function, eager.
- ``reference_compiled`` (only on request): ``torch.compile`` of ``backend="reference"``, graph breaks and all.
- ``native``: ``backend="native"`` (the C++ op on the CPU, its CUDA kernels on a GPU), when built.
- ``triton``: ``backend="triton"``, CUDA only (Triton's interpreter is never benchmarked).
- ``liger_topk``: Liger-Kernel's cross-entropy (``reduction="none"``) -> ``topk`` -> ``mean``, CUDA only,
  when ``liger_kernel`` is importable.
- ``native+rows`` / ``triton+rows``: the kernel backend trimming whole sequences
  (``group_ids="rows"``) at the LM shapes: the ``(N, V)`` logits viewed as ``N / 1024`` sequences of
  1024 tokens (a ``(B, V, T)`` view, no copy); the cost of group trimming over the plain row's
  per-token trimming in the same run.
- ``native+ohem`` / ``triton+ohem``: the threshold rule (OHEM) at the segmentation shapes:
  ``keep_threshold`` set once, from the first call's losses, between the ``k``-th largest and the
  next (so the same ``k`` pixels pass it), and ``min_kept = k / 2``; the cost of a threshold over the
  plain row's ratio in the same run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib.util
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_trim import native, trimmed_cross_entropy
from fused_trim._common import host_k

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}

IMAGE_SHAPES: list[tuple[int, ...]] = [(256, 10), (256, 100), (65536, 10), (1048576, 10), (1024, 1000)]
LM_SHAPES: list[tuple[int, ...]] = [(4096, 32000), (2048, 128256)]
SEGMENTATION_SHAPES: list[tuple[int, ...]] = [(8, 19, 128, 128)]
ALL_SHAPES = IMAGE_SHAPES + LM_SHAPES + SEGMENTATION_SHAPES
KEEP_RATIOS = (0.5, 0.2, 1.0)  # in order of priority when a time budget cuts a run short

EAGER_BASELINE = "reference"
COMPILED_BASELINE = "topk_compiled"
BASELINES = ("F.cross_entropy", EAGER_BASELINE, COMPILED_BASELINE, "topk_eager")
OPTIONAL = ("reference_compiled",)  # run only when asked for by name
INPLACE_INPUT = {"liger_topk"}  # Liger writes the gradient into its input: it gets a private copy

DESCRIPTIONS = {
    "F.cross_entropy": "F.cross_entropy, eager, no trimming",
    "reference": "trimmed_cross_entropy(backend='reference'), eager (the eager reference)",
    "topk_compiled": "torch.compile(F.cross_entropy(reduction='none') -> topk(k) -> mean), static shapes "
    "(the compiled reference; compiling backend='reference' itself graph-breaks)",
    "topk_eager": "F.cross_entropy(reduction='none') -> topk(k) -> mean, eager",
    "reference_compiled": "torch.compile(trimmed_cross_entropy(backend='reference')), static shapes, with its "
    "graph breaks",
    "native": "trimmed_cross_entropy(backend='native'): the C++/CUDA op",
    "triton": "trimmed_cross_entropy(backend='triton'): the Triton kernels",
    "liger_topk": "Liger-Kernel cross-entropy(reduction='none') -> topk(k) -> mean",
    "native+rows": "trimmed_cross_entropy(backend='native', group_ids='rows'): whole sequences of 1024 tokens",
    "triton+rows": "trimmed_cross_entropy(backend='triton', group_ids='rows'): whole sequences of 1024 tokens",
    "native+ohem": "trimmed_cross_entropy(backend='native', keep_threshold=t, min_kept=k/2): the k pixels past t",
    "triton+ohem": "trimmed_cross_entropy(backend='triton', keep_threshold=t, min_kept=k/2): the k pixels past t",
}
GROUP_SEQ_LEN = 1024  # tokens per sequence of the "+rows" rows


def runs_at(name: str, case: Case) -> bool:
    """Whether backend ``name`` has a row at ``case``: the "+rows" rows only at LM-like shapes
    (``(N, V)`` with ``V >= 8192`` and whole sequences of :data:`GROUP_SEQ_LEN` tokens), the "+ohem"
    rows only at segmentation shapes (``(N, C, d1, ...)``)."""
    if name.endswith("+ohem"):
        return len(case.shape) > 2
    if not name.endswith("+rows"):
        return True
    return len(case.shape) == 2 and case.num_classes >= 8192 and case.shape[0] % GROUP_SEQ_LEN == 0


@dataclass(frozen=True)
class Case:
    """One benchmark problem: logits of ``shape`` (``(N, C)`` or ``(N, C, d1, ...)``), a dtype, a keep ratio."""

    shape: tuple[int, ...]
    dtype: str
    keep_ratio: float

    @property
    def num_classes(self) -> int:
        return self.shape[1]

    @property
    def num_samples(self) -> int:
        """Target positions (rows after moving the class dimension last)."""
        return self.shape[0] * math.prod(self.shape[2:])

    @property
    def k(self) -> int:
        """Kept samples, as the contract computes it (no ignored targets here)."""
        n = self.num_samples
        return host_k(n, self.keep_ratio)

    @property
    def element_size(self) -> int:
        return torch.tensor([], dtype=DTYPES[self.dtype]).element_size()

    @property
    def shape_str(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def label(self) -> str:
        return f"{self.shape_str} {self.dtype} keep={self.keep_ratio:g}"

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "keep_ratio": self.keep_ratio}

    @classmethod
    def from_dict(cls, d: dict) -> Case:
        return cls(tuple(d["shape"]), d["dtype"], float(d["keep_ratio"]))


def parse_shape(text: str) -> tuple[int, ...]:
    """``"4096x32000"`` -> ``(4096, 32000)``."""
    shape = tuple(int(v) for v in text.lower().replace(",", "x").split("x") if v)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"a shape is N x C [x d1 ...] with positive sizes, got {text!r}")
    return shape


def runner_cases(device: str, quick: bool) -> list[Case]:
    """The runner's cases, most important first (a time budget drops the tail).

    CUDA runs every shape x dtype x keep ratio (``quick``: keep 0.5 only). The CPU full run skips bf16
    for the LM shapes (the eager reference upcasts whole 0.5-1 GiB tensors: minutes per case);
    ``quick`` on the CPU is ten cases that fit in well under five minutes on two cores.
    """
    if device == "cuda":
        keeps = (0.5,) if quick else KEEP_RATIOS
        return [Case(s, d, r) for r in keeps for d in DTYPES for s in ALL_SHAPES]
    if quick:
        quick_shapes = [(256, 10), (256, 100), (65536, 10), (1048576, 10), (1024, 1000), (4096, 32000)]
        quick_shapes += [(8, 19, 128, 128)]
        cases = [Case(s, "fp32", 0.5) for s in quick_shapes]
        cases += [Case((1024, 1000), "fp32", 0.2), Case((1024, 1000), "fp32", 1.0)]
        cases += [Case((1024, 1000), "bf16", 0.5)]
        return cases
    cases = []
    for r in KEEP_RATIOS:
        for d in DTYPES:
            for s in ALL_SHAPES:
                if d == "bf16" and s in LM_SHAPES:
                    continue
                cases.append(Case(s, d, r))
    return cases


def suite_cases(device: str) -> list[Case]:
    """Cases of the pytest-benchmark suite: the quick runner set, or all of them with FUSED_TRIM_BENCH_FULL=1."""
    return runner_cases(device, quick=os.environ.get("FUSED_TRIM_BENCH_FULL") != "1")


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def available_backends(device: str) -> tuple[list[str], dict[str, str]]:
    """Backends that can run on ``device`` and, for the others, why not."""
    names = list(BASELINES)
    skipped: dict[str, str] = {}
    dev = torch.device(device)
    reason = native.unavailable_reason(dev)
    if reason is None:
        names += ["native", "native+rows", "native+ohem"]
    else:
        skipped["native"] = reason
    if dev.type == "cuda":
        if os.environ.get("TRITON_INTERPRET") == "1":
            skipped["triton"] = "TRITON_INTERPRET=1 is set: the interpreter is never benchmarked"
        elif importlib.util.find_spec("triton") is None:
            skipped["triton"] = "triton is not importable"
        else:
            names += ["triton", "triton+rows", "triton+ohem"]
        if importlib.util.find_spec("liger_kernel") is None:
            skipped["liger_topk"] = "liger_kernel is not installed"
        else:
            names.append("liger_topk")
    else:
        skipped["triton"] = "needs a CUDA device (Triton's CPU interpreter is far too slow to benchmark)"
        skipped["liger_topk"] = "Liger-Kernel needs a CUDA device"
    return names, skipped


def topk_mean(x: Tensor, t: Tensor, k: int) -> Tensor:
    """The user's pure-torch trimmed loss: per-sample CE, the ``k`` largest, their mean."""
    losses = F.cross_entropy(x, t, reduction="none").reshape(-1)
    return losses.topk(k, sorted=False).values.mean()


def _liger_fn(k: int) -> Callable[[Tensor, Tensor], Tensor]:
    from liger_kernel.transformers.functional import liger_cross_entropy

    def fn(x: Tensor, t: Tensor) -> Tensor:
        x2 = x.movedim(1, -1).reshape(-1, x.shape[1]) if x.dim() > 2 else x
        out = liger_cross_entropy(x2, t.reshape(-1), reduction="none")
        if isinstance(out, tuple):
            out = out[0]
        out = getattr(out, "loss", out)
        return out.topk(k, sorted=False).values.mean()

    return fn


def configure_dynamo() -> None:
    """Let one process compile many static-shape variants without falling back to eager."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 1 << 16


def make_fn(name: str, case: Case, compile_backend: str = "inductor") -> Callable[[Tensor, Tensor], Tensor]:
    """``fn(logits, target) -> scalar loss`` for backend ``name`` at ``case`` (compiles lazily)."""
    r, k = case.keep_ratio, case.k
    if name == "F.cross_entropy":
        return lambda x, t: F.cross_entropy(x, t)
    if name in ("reference", "native", "triton"):
        return lambda x, t: trimmed_cross_entropy(x, t, r, backend=name)
    if name in ("native+rows", "triton+rows"):
        backend, seq = name.split("+")[0], GROUP_SEQ_LEN

        def rows(x: Tensor, t: Tensor) -> Tensor:
            xs = x.view(-1, seq, x.shape[-1]).transpose(1, 2)  # (B, V, T): the rows of x, in place
            return trimmed_cross_entropy(xs, t.view(-1, seq), r, backend=backend, group_ids="rows")

        return rows
    if name in ("native+ohem", "triton+ohem"):
        backend, found = name.split("+")[0], {}

        def ohem(x: Tensor, t: Tensor) -> Tensor:
            if "threshold" not in found:  # the first (untimed warm-up) call: the k largest losses above it
                with torch.no_grad():
                    v = F.cross_entropy(x.detach().float(), t, reduction="none").reshape(-1).sort().values
                    n = v.numel()  # midway between the k-th largest loss and the next: no rounding moves k
                    found["threshold"] = float(v[0] - 1) if k >= n else float((v[n - k - 1] + v[n - k]) / 2)
            return trimmed_cross_entropy(x, t, keep_threshold=found["threshold"], min_kept=k // 2, backend=backend)

        return ohem
    if name == "topk_eager":
        return lambda x, t: topk_mean(x, t, k)
    if name == "reference_compiled":
        configure_dynamo()

        def reference(x: Tensor, t: Tensor) -> Tensor:
            return trimmed_cross_entropy(x, t, r, backend="reference")

        return torch.compile(reference, dynamic=False, backend=compile_backend)
    if name == "topk_compiled":
        configure_dynamo()
        compiled = torch.compile(topk_mean, dynamic=False, backend=compile_backend)
        return lambda x, t: compiled(x, t, k)
    if name == "liger_topk":
        return _liger_fn(k)
    raise ValueError(f"unknown backend {name!r}")


def make_inputs(case: Case, device: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Logits (``requires_grad``, N(0, 2^2)) and targets in ``[0, C)``, none ignored."""
    gen = torch.Generator(device=device).manual_seed(seed)
    target_shape = (case.shape[0], *case.shape[2:])
    x = torch.randn(case.shape, generator=gen, device=device, dtype=torch.float32).mul_(2.0)
    x = x.to(DTYPES[case.dtype]).requires_grad_(True)
    t = torch.randint(0, case.num_classes, target_shape, generator=gen, device=device)
    return x, t


def floor_bytes(case: Case, backend: str) -> tuple[int, int]:
    """Minimum bytes moved, ``(forward, forward+backward)``.

    Forward: the logits read once, the int64 targets read, one fp32 per row written (the logsumexp a
    backward needs). Backward: the kept rows' logits, targets and logsumexp read, the whole gradient
    written (zeros outside the kept set). ``F.cross_entropy`` keeps every row.
    """
    n, c, e = case.num_samples, case.num_classes, case.element_size
    k = n if backend == "F.cross_entropy" else case.k
    fwd = n * c * e + n * (8 + 4)
    bwd = k * c * e + k * (8 + 4) + n * c * e
    return fwd, fwd + bwd


# --------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(
    step: Callable[[], object],
    device: str,
    *,
    repeats: int,
    min_repeats: int = 3,
    budget_s: float = 1.0,
    warmup: int = 0,
    batch_s: float = 2e-3,
) -> tuple[float, int]:
    """Median seconds per call of ``step``, and the number of calls timed.

    ``warmup`` calls run untimed first (the caller may have warmed up already). Calls shorter than
    ``batch_s`` are timed in batches (one sample = the mean of a batch), so that the timer's
    resolution and a GPU's launch latency do not dominate. Sampling stops after ``repeats`` samples,
    or after ``min_repeats`` once ``budget_s`` has passed.
    """
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    single = time.perf_counter() - start
    samples: list[float] = [single] if single >= batch_s else []
    inner = max(1, min(1000, int(batch_s / max(single, 1e-7))))
    while len(samples) < repeats:
        t0 = time.perf_counter()
        for _ in range(inner):
            step()
        synchronize(device)
        samples.append((time.perf_counter() - t0) / inner)
        if len(samples) >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return statistics.median(samples), len(samples) * inner


def copy_bandwidth(device: str, mib: int = 256, repeats: int = 10) -> float:
    """Bytes per second of ``dst.copy_(src)`` over a ``mib`` MiB buffer (read + write: 2 x size per copy).

    The median of ``repeats`` copies into a warm destination.
    """
    n = mib * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_rss_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_freed_memory() -> None:
    """Hand freed memory back to the OS, so that the next run faults in what it allocates.

    Includes the native op's cache of gradient blocks (``fused_trim.native.empty_cache``): kept, the
    block would sit in the baseline and the native backend's gradient would not count.
    """
    gc.collect()
    empty_cache = getattr(native, "empty_cache", None)
    if empty_cache is not None and native.is_available(torch.device("cpu")):
        empty_cache()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def cpu_memory_method() -> str:
    """``"vmhwm"`` where the RSS high-water mark can be reset, else ``"sampling"``."""
    try:
        _proc_status("VmHWM")
    except (OSError, RuntimeError):
        return "unavailable"
    return "vmhwm" if _reset_rss_peak() else "sampling"


def peak_memory(step: Callable[[], object], device: str) -> tuple[int, str]:
    """Peak memory of one ``step()`` beyond what was allocated before it, in bytes, and the method.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus ``memory_allocated``
    before. CPU: freed memory is returned to the OS (``gc``, the native op's gradient-block cache,
    ``malloc_trim``), the resident-set
    high-water mark is reset (``/proc/self/clear_refs``), and the result is ``VmHWM`` after the step
    minus ``VmRSS`` before it; where the mark cannot be reset, ``VmRSS`` is sampled every 0.2 ms
    from a thread (a lower bound).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base), "cuda_max_memory_allocated"
    _release_freed_memory()
    if _reset_rss_peak():
        base = _proc_status("VmRSS")
        step()
        return max(0, _proc_status("VmHWM") - base), "vmhwm"
    base = _proc_status("VmRSS")
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _proc_status("VmRSS"))
            time.sleep(2e-4)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        step()
    finally:
        done.set()
        thread.join()
    peak = max(peak, _proc_status("VmRSS"))
    return max(0, peak - base), "sampling"
