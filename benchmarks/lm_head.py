"""LM-head benchmark: ``trimmed_linear_cross_entropy`` against the unfused and the chunked paths.

    python -m benchmarks.run --lm-head                       # CPU: (2048, 512, 32000) fp32, keep 0.2/0.5/1
    python -m benchmarks.run --lm-head --lm-shapes 4096x1024x32000 --dtypes bf16
    python -m benchmarks.run --lm-head --device cuda         # (16384, 4096, 128256) bf16

The op is compute-bound: its floor is the matmul work it must do. A plain ``torch.mm`` of the
forward's size, ``(N, D) @ (D, V)``, is timed in the same run (``mm_ms``); the floor of a
forward+backward is ``min(1 + 3 * keep, 3) * mm_ms`` (every row's logits once, then for the kept
rows the recomputed logits and the two gradient matmuls; at keep 1.0 the gradient is formed in the
forward, 3 matmuls). ``floor_frac`` is that floor over the measured time (1.0: as fast as the
matmuls alone). Rows:

- ``linear+cross_entropy``: ``F.linear`` then ``F.cross_entropy`` (no trimming: the (N, V) logits
  and their gradient exist);
- ``torch_chunked``: torch 2.13's ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
  (chunked, no trimming);
- ``linear+trimmed``: ``F.linear`` then ``trimmed_cross_entropy`` (trimming, logits materialised);
- ``fused/<backend>``: ``trimmed_linear_cross_entropy(backend=<backend>)``; ``fused/<backend>+offset``
  the same ranked by ``l_i - score_offset_i`` (a random offset: the cost of selective language
  modelling's ranking, for the default kernel backend); ``fused/<backend>+softcap_z`` the same with
  ``logit_softcap=30.0`` (Gemma 2) and ``z_loss=1e-4`` (PaLM), for the default kernel backend once
  its kernels have the options: their cost next to the plain row; ``fused/<backend>+rows`` the same
  trimming whole sequences (``group_ids="rows"`` on the ``(N / 256, 256, D)`` view of the hidden
  states: sequences of 256 tokens), for the default kernel backend: the cost of group trimming;
- CUDA, when installed: ``liger`` (Liger-Kernel's fused linear cross-entropy, no trimming) and
  ``cce`` (Cut Cross-Entropy's ``linear_cross_entropy``, no trimming).

Two floors: ``floor_frac`` times the ``torch.mm`` into a preallocated output (``mm_ms``: the
matmul's arithmetic alone, the strict floor), ``plain_floor_frac`` a plain ``torch.mm(x, W.t())``
that allocates its ``(N, V)`` result (``plain_mm_ms``; it also pays the
page faults of a fresh result, which the fused op never allocates).

Peak memory (``peak_MiB``) is what one forward+backward allocates beyond its inputs, gradients
included (:func:`benchmarks.cases.peak_memory`): on CUDA ``torch.cuda.max_memory_allocated``; on the
CPU the resident-set high-water mark after freed memory (and the native op's gradient-block cache)
went back to the OS, so every byte the step touches counts, BLAS's scratch too.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fused_trim import trimmed_cross_entropy, trimmed_linear_cross_entropy

from . import cases as C

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_SHAPES = [(2048, 512, 32000), (4096, 1024, 32000)]
CUDA_SHAPES = [(16384, 4096, 128256)]
KEEPS = (0.2, 0.5, 1.0)
# The "+softcap_z" rows: Gemma 2's final-logit cap and PaLM's z-loss coefficient.
HEAD_OPTIONS = {"logit_softcap": 30.0, "z_loss": 1e-4}
UNTRIMMED = ("linear+cross_entropy", "torch_chunked", "liger", "cce")
GROUP_SEQ_LEN = 256  # tokens per sequence of the "+rows" rows


@dataclass(frozen=True)
class LMCase:
    shape: tuple[int, int, int]  # (N, D, V)
    dtype: str
    keep_ratio: float

    @property
    def label(self) -> str:
        return f"{'x'.join(map(str, self.shape))} {self.dtype} keep={self.keep_ratio:g}"


def default_cases(device: str, quick: bool) -> list[LMCase]:
    if device == "cuda":
        return [LMCase(s, "bf16", r) for s in CUDA_SHAPES for r in KEEPS]
    shapes = CPU_SHAPES[:1] if quick else CPU_SHAPES
    return [LMCase(s, "fp32", r) for s in shapes for r in KEEPS]


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3 or min(parts) < 1:
        raise SystemExit(f"an LM-head shape is NxDxV with positive sizes, got {text!r}")
    return parts  # type: ignore[return-value]


def fused_backends(device: str) -> list[str]:
    """The backends of ``trimmed_linear_cross_entropy`` that can run on ``device``."""
    from fused_trim import native

    names = ["reference"]
    if native.is_available(torch.device(device)) and hasattr(native, "trimmed_linear_cross_entropy_2d"):
        names.append("native")
    if device == "cuda":
        names.append("triton")
    return names


def _optional(module: str) -> object | None:
    try:
        return importlib.import_module(module)
    except Exception:  # noqa: BLE001 - not installed, or installed without its GPU dependencies
        return None


def make_step(name: str, case: LMCase, x, w, t) -> Callable[[], torch.Tensor] | None:
    """A forward for row ``name``; ``None`` when it cannot run here."""
    r = case.keep_ratio
    if name == "linear+cross_entropy":
        return lambda: F.cross_entropy(F.linear(x, w), t)
    if name == "torch_chunked":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda: F.linear_cross_entropy(x, w, t, options=options)
    if name == "linear+trimmed":
        return lambda: trimmed_cross_entropy(F.linear(x, w), t, r)
    if name.startswith("fused/"):
        backend, _, variant = name.split("/", 1)[1].partition("+")
        # "+offset": ranked by l_i - score_offset_i (selective language modelling), to show its cost.
        with_offset = variant == "offset"
        offset = torch.randn(t.shape, generator=torch.Generator().manual_seed(1)).to(x.device) if with_offset else None
        head = HEAD_OPTIONS if variant == "softcap_z" else {}
        if variant == "rows":
            seq = math.gcd(x.shape[0], GROUP_SEQ_LEN)  # (tiny test shapes: shorter sequences)
            xs, ts = x.view(-1, seq, x.shape[-1]), t.view(-1, seq)
            return lambda: trimmed_linear_cross_entropy(xs, w, ts, r, backend=backend, group_ids="rows")
        return lambda: trimmed_linear_cross_entropy(x, w, t, r, backend=backend, score_offset=offset, **head)
    if name == "liger":
        mod = _optional("liger_kernel.transformers")
        if mod is None or x.device.type != "cuda":
            return None
        loss = mod.LigerFusedLinearCrossEntropyLoss()
        return lambda: loss(w, x, t)
    if name == "cce":
        mod = _optional("cut_cross_entropy")
        if mod is None or x.device.type != "cuda":
            return None
        return lambda: mod.linear_cross_entropy(x, w, t)
    raise ValueError(f"unknown row {name!r}")


def median_time(step: Callable[[], object], device: str, repeats: int, budget_s: float) -> float:
    """Median seconds of ``step`` after one warm-up call: :func:`benchmarks.cases.measure`, one call
    per sample (these steps take far longer than the timer's resolution)."""
    return C.measure(step, device, repeats=repeats, budget_s=budget_s, warmup=1, batch_s=0.0)[0]


def allocator_peak_bytes(step: Callable[[], object]) -> int:
    """Peak bytes held by torch's CPU allocator during ``step()`` beyond what it held before, from
    the profiler's memory events: deterministic (unlike the resident set), C++ ops' tensors included,
    but not memory the native op takes outside torch's allocator (its gradient-block cache)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def run_lm_case(case: LMCase, device: str, rows: list[str], repeats: int, budget_s: float, cache: dict) -> list[dict]:
    """Time forward+backward of every row at ``case``; untrimmed rows are measured once per shape
    and dtype (``cache``) and repeated for each keep ratio."""
    n, d, v = case.shape
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(v, d, generator=gen) / d**0.5).to(device=device, dtype=dtype).requires_grad_(True)
    t = torch.randint(0, v, (n,), generator=gen).to(device)
    key = (case.shape, case.dtype)
    if ("mm", key) not in cache:
        a, b = x.detach(), w.detach().t()
        cache[("plain_mm", key)] = median_time(lambda: torch.mm(a, b), device, repeats, budget_s)
        result = torch.empty(n, v, dtype=dtype, device=device)
        cache[("mm", key)] = median_time(lambda: torch.mm(a, b, out=result), device, repeats, budget_s)
        del result
    mm_s, plain_mm_s = cache[("mm", key)], cache[("plain_mm", key)]
    matmuls = min(1 + 3 * case.keep_ratio, 3)
    floor_s, plain_floor_s = matmuls * mm_s, matmuls * plain_mm_s
    out = []
    for name in rows:
        row = dict(
            case=case.label,
            shape="x".join(map(str, case.shape)),
            dtype=case.dtype,
            keep_ratio=case.keep_ratio,
            backend=name,
            mm_ms=mm_s * 1e3,
            floor_ms=floor_s * 1e3,
            plain_mm_ms=plain_mm_s * 1e3,
            plain_floor_ms=plain_floor_s * 1e3,
        )
        if name in UNTRIMMED and (name, key) in cache:
            row.update(cache[(name, key)])
            out.append(row)
            continue
        fwd = make_step(name, case, x, w, t)
        if fwd is None:
            row["status"] = "not available"
            out.append(row)
            continue

        def step(fwd=fwd):
            x.grad = w.grad = None
            fwd().backward()

        try:
            seconds = median_time(step, device, repeats, budget_s)
            x.grad = w.grad = None  # the step's own gradients count in its peak
            peak, _ = C.peak_memory(step, device)
        except Exception as exc:  # noqa: BLE001 - a row that fails is reported, not fatal
            row["status"] = f"error: {type(exc).__name__}: {exc}"[:200]
            out.append(row)
            continue
        result = dict(status="ok", fwdbwd_ms=seconds * 1e3, peak_MiB=peak / 2**20)
        if name in UNTRIMMED:
            cache[(name, key)] = result
        row.update(result)
        out.append(row)
    base = {r["backend"]: r for r in out if r.get("status") == "ok"}
    for r in out:
        if r.get("status") != "ok":
            continue
        r["floor_frac"] = r["floor_ms"] / r["fwdbwd_ms"]
        r["plain_floor_frac"] = r["plain_floor_ms"] / r["fwdbwd_ms"]
        for ref, tag in (("linear+cross_entropy", "vs_unfused"), ("torch_chunked", "vs_chunked")):
            if ref in base:
                r[tag] = base[ref]["fwdbwd_ms"] / r["fwdbwd_ms"]
        flops = 2 * n * d * v * (min(1 + 3 * case.keep_ratio, 3) if r["backend"] not in UNTRIMMED else 3)
        r["GFLOPs"] = flops / (r["fwdbwd_ms"] / 1e3) / 1e9
    return out


def markdown(rows: list[dict]) -> str:
    head = (
        "| case | row | fwd+bwd ms | × vs F.linear+F.cross_entropy | × vs torch chunked | "
        "share of floor (mm into buffer / plain mm) | peak MiB |\n|---|---|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    last = None

    def f(v: object, spec: str) -> str:
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    for r in rows:
        case = r["case"] if r["case"] != last else ""
        last = r["case"]
        if r.get("status") != "ok":
            lines.append(f"| {case} | {r['backend']} | {r.get('status')} | | | | |")
            continue
        lines.append(
            f"| {case} | {r['backend']} | {f(r['fwdbwd_ms'], '.0f')} | {f(r.get('vs_unfused'), '.2f')} | "
            f"{f(r.get('vs_chunked'), '.2f')} | {f(r['floor_frac'], '.2f')} / {f(r['plain_floor_frac'], '.2f')} | "
            f"{f(r['peak_MiB'], '.0f')} |"
        )
    return "\n".join(lines)


def run(device: str, cases: list[LMCase], repeats: int, budget_s: float, backends: list[str] | None) -> list[dict]:
    """Every row at every case; prints each case's table as it finishes."""
    fused = [f"fused/{b}" for b in fused_backends(device) if backends is None or b in backends]
    if len(fused) > 1:
        kernels = fused[-1]
        fused += [f"{kernels}+offset", f"{kernels}+rows", f"{kernels}+softcap_z"]
    rows_names = ["linear+cross_entropy", "torch_chunked", "linear+trimmed", *fused]
    if device == "cuda":
        rows_names += ["liger", "cce"]
    cache: dict = {}
    rows: list[dict] = []
    for case in cases:
        got = run_lm_case(case, device, rows_names, repeats, budget_s, cache)
        print(markdown(got), flush=True)
        rows += got
    return rows
