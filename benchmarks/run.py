"""Benchmark runner: every backend against the eager and the compiled reference, the bytes floor, peak memory.

    python -m benchmarks.run --quick                 # CPU: ten cases, a few minutes on 2 cores
    python -m benchmarks.run                         # every case for this device
    python -m benchmarks.run --device cuda --out gpu_out

For each case (shape x dtype x keep ratio) and backend (see :mod:`benchmarks.cases`) it measures

- ``fwd_ms``: one forward with autograd recording (a training step's forward), and ``fwdbwd_ms``:
  forward + ``backward()`` with the gradient set to ``None`` before each call; medians of repeated
  calls after a warm-up call (which, for the compiled baseline, is where it compiles: ``first_call_s``);
  short calls are timed in batches;
- ``*_vs_eager`` / ``*_vs_compiled``: the baseline's time over this backend's (> 1: faster than the
  baseline); the eager baseline is ``reference``, the compiled one ``topk_compiled``;
- ``*_floor_frac``: the minimum bytes (:func:`benchmarks.cases.floor_bytes`: logits read once
  forward; kept rows read and every row written backward; O(N) terms) per measured second, as a
  fraction of the copy bandwidth measured at the start of the same run (``dst.copy_(src)``, 2 x size
  bytes per copy, median); 1.0 would be a kernel as fast as a memory copy of the same bytes;
- ``peak_mem_MiB``: the peak memory of one forward + backward beyond what was allocated before it
  (the inputs, and nothing else of the run's). CUDA: ``torch.cuda.max_memory_allocated``. CPU: each
  case runs in a fresh subprocess; before each backend's measured call the freed heap is returned to
  the OS (``malloc_trim``) and the kernel's resident-set high-water mark is reset
  (``/proc/self/clear_refs``); the figure is ``VmHWM`` after the call minus ``VmRSS`` before it. It
  includes the gradient (``grad_MiB``), which every backend must allocate, and is page-granular:
  tiny cases read as ~0;
- ``max_rel_err``: loss and gradient against the eager reference (first call; ``nan`` for
  ``F.cross_entropy``, which does not trim).

Output in ``--out``: ``results.csv`` (a row per backend x case), ``results.json`` (rows plus
machine, versions, timestamp, copy bandwidth, skipped backends), ``results.md`` (the printed table)
and ``benchmark.png`` (fwd+bwd speed-up over the eager reference and peak memory per case).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

from . import cases as C

ROOT = Path(__file__).resolve().parents[1]
RESULT_TAG = "@@ROWS "

COLUMNS = [
    "device",
    "case",
    "shape",
    "dtype",
    "keep_ratio",
    "samples",
    "classes",
    "k",
    "backend",
    "status",
    "fwd_ms",
    "fwdbwd_ms",
    "fwd_vs_eager",
    "fwdbwd_vs_eager",
    "fwd_vs_compiled",
    "fwdbwd_vs_compiled",
    "floor_fwd_MB",
    "floor_fwdbwd_MB",
    "fwd_floor_frac",
    "fwdbwd_floor_frac",
    "copy_GBps",
    "peak_mem_MiB",
    "grad_MiB",
    "memory_method",
    "first_call_s",
    "fwd_calls",
    "fwdbwd_calls",
    "max_rel_err",
]
# Columns every successful row must fill (the smoke test holds the runner to this).
REQUIRED = COLUMNS[: COLUMNS.index("max_rel_err")]


# --------------------------------------------------------------------------------------------
# One case, measured in this process
# --------------------------------------------------------------------------------------------


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a - b).abs().max().item() / max(scale, 1e-30) if b.numel() else 0.0


def run_case(case: C.Case, device: str, backends: list[str], opts: dict) -> list[dict]:
    """Measure every backend at ``case`` in this process; one row per backend (numbers unrounded)."""
    x, t = C.make_inputs(case, device)
    order = [C.EAGER_BASELINE] + [b for b in backends if b != C.EAGER_BASELINE and C.runs_at(b, case)]
    ref_loss = ref_grad = None
    rows = []
    for name in order:
        row: dict = {"backend": name, "status": "ok"}
        xin = x.detach().clone().requires_grad_(True) if name in C.INPLACE_INPUT else x
        try:
            fn = C.make_fn(name, case, opts["compile_backend"])

            def fwd(fn=fn, xin=xin):
                return fn(xin, t)

            def fwdbwd(fn=fn, xin=xin):
                xin.grad = None
                fn(xin, t).backward()

            xin.grad = None
            t0 = time.perf_counter()
            loss = fn(xin, t)
            loss.backward()
            C.synchronize(device)
            row["first_call_s"] = time.perf_counter() - t0
            if name == C.EAGER_BASELINE:
                ref_loss, ref_grad = loss.detach(), xin.grad.detach().clone()
                row["max_rel_err"] = 0.0
            elif name == "F.cross_entropy" or ref_grad is None:
                row["max_rel_err"] = math.nan
            else:
                row["max_rel_err"] = max(_rel_err(loss, ref_loss), _rel_err(xin.grad, ref_grad))
            del loss
            xin.grad = None
            kw = dict(repeats=opts["repeats"], min_repeats=opts["min_repeats"], budget_s=opts["budget_s"])
            row["fwd_ms"], row["fwd_calls"] = C.measure(fwd, device, **kw)
            row["fwdbwd_ms"], row["fwdbwd_calls"] = C.measure(fwdbwd, device, **kw)
            row["fwd_ms"] *= 1e3
            row["fwdbwd_ms"] *= 1e3
            xin.grad = None
            peak, method = C.peak_memory(fwdbwd, device)
            row["peak_mem_MiB"], row["memory_method"] = peak / 2**20, method
        except Exception as exc:  # noqa: BLE001 - a failing backend is a result, not the end of the run
            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        finally:
            xin.grad = None
            del xin
        rows.append(row)
    return rows


def _child_main(spec: dict) -> None:
    """Subprocess entry: run one case and print its rows as one tagged JSON line."""
    case = C.Case.from_dict(spec["case"])
    if spec["opts"].get("threads"):
        torch.set_num_threads(spec["opts"]["threads"])
    rows = run_case(case, "cpu", spec["backends"], spec["opts"])
    threads = torch.get_num_threads()
    print(RESULT_TAG + json.dumps({"rows": rows, "threads": threads}), flush=True)


def run_case_subprocess(case: C.Case, backends: list[str], opts: dict, timeout_s: float) -> tuple[list[dict], int]:
    """Run one CPU case in a fresh Python process (so its peak memory is its own)."""
    spec = {"case": case.to_dict(), "backends": backends, "opts": opts}
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.run", "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [{"backend": b, "status": f"error: case timed out after {timeout_s:.0f} s"} for b in backends], 0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            payload = json.loads(line[len(RESULT_TAG) :])
            return payload["rows"], payload["threads"]
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    print(proc.stderr[-3000:], file=sys.stderr)
    return [{"backend": b, "status": f"error: child exited {proc.returncode}: {tail[0]}"[:300]} for b in backends], 0


# --------------------------------------------------------------------------------------------
# Derived columns, tables and files
# --------------------------------------------------------------------------------------------


def finish_rows(case: C.Case, device: str, rows: list[dict], copy_bps: float) -> list[dict]:
    """Add the case's fields, the ratios against both baselines and the bytes-floor fractions."""
    by_name = {r["backend"]: r for r in rows if r["status"] == "ok"}
    eager, compiled = by_name.get(C.EAGER_BASELINE), by_name.get(C.COMPILED_BASELINE)
    out = []
    for r in rows:
        full = {col: "" for col in COLUMNS}
        full.update(
            device=device,
            case=case.label,
            shape=case.shape_str,
            dtype=case.dtype,
            keep_ratio=case.keep_ratio,
            samples=case.num_samples,
            classes=case.num_classes,
            k=case.num_samples if r["backend"] == "F.cross_entropy" else case.k,
            copy_GBps=copy_bps / 1e9,
        )
        full.update({key: val for key, val in r.items() if key in full})
        if r["status"] == "ok":
            fwd_b, fb_b = C.floor_bytes(case, r["backend"])
            full["floor_fwd_MB"], full["floor_fwdbwd_MB"] = fwd_b / 1e6, fb_b / 1e6
            full["fwd_floor_frac"] = fwd_b / (r["fwd_ms"] / 1e3) / copy_bps
            full["fwdbwd_floor_frac"] = fb_b / (r["fwdbwd_ms"] / 1e3) / copy_bps
            full["grad_MiB"] = math.prod(case.shape) * case.element_size / 2**20
            for base, tag in ((eager, "eager"), (compiled, "compiled")):
                if base is not None:
                    full[f"fwd_vs_{tag}"] = base["fwd_ms"] / r["fwd_ms"]
                    full[f"fwdbwd_vs_{tag}"] = base["fwdbwd_ms"] / r["fwdbwd_ms"]
        out.append(full)
    return out


def _fmt(v: object, spec: str) -> str:
    if v == "" or v is None:
        return "—"
    if isinstance(v, float) and math.isnan(v):
        return "—"
    return format(v, spec)


def _fmt_ms(v: object) -> str:
    if v == "" or v is None:
        return "—"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def markdown_table(rows: list[dict]) -> str:
    """One line per case x backend: times, ratios (fwd / fwd+bwd), floor fraction, peak memory."""
    head = (
        "| case | backend | fwd ms | fwd+bwd ms | × vs eager ref (fwd / f+b) | × vs compiled topk (fwd / f+b) "
        "| % of bytes floor (fwd / f+b) | peak MiB (grad) |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    last = None
    for r in rows:
        case = r["case"] if r["case"] != last else ""
        last = r["case"]
        if r["status"] != "ok":
            lines.append(f"| {case} | {r['backend']} | {r['status']} ||||||")
            continue
        ratio_e = f"{_fmt(r['fwd_vs_eager'], '.2f')} / {_fmt(r['fwdbwd_vs_eager'], '.2f')}"
        ratio_c = f"{_fmt(r['fwd_vs_compiled'], '.2f')} / {_fmt(r['fwdbwd_vs_compiled'], '.2f')}"
        floor = f"{_fmt(100 * r['fwd_floor_frac'], '.1f')} / {_fmt(100 * r['fwdbwd_floor_frac'], '.1f')}"
        mem = f"{_fmt(r['peak_mem_MiB'], '.1f')} ({_fmt(r['grad_MiB'], '.1f')})"
        lines.append(
            f"| {case} | {r['backend']} | {_fmt_ms(r['fwd_ms'])} | {_fmt_ms(r['fwdbwd_ms'])} | {ratio_e} | {ratio_c} "
            f"| {floor} | {mem} |"
        )
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def write_plot(path: Path, rows: list[dict]) -> str | None:
    """Forward+backward speed-up over the eager reference, and peak memory, per case and backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: matplotlib is not importable ({exc})"
    ok = [r for r in rows if r["status"] == "ok"]
    cases = list(dict.fromkeys(r["case"] for r in ok))
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    if not cases:
        return "no plot: no successful rows"
    width = 0.8 / len(backends)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(cases) + 3), 9), sharex=True)
    for i, b in enumerate(backends):
        xs, speed, mem = [], [], []
        for j, c in enumerate(cases):
            r = next((r for r in ok if r["case"] == c and r["backend"] == b), None)
            if r is not None:
                xs.append(j + (i - (len(backends) - 1) / 2) * width)
                speed.append(r["fwdbwd_vs_eager"] if r["fwdbwd_vs_eager"] != "" else math.nan)
                mem.append(max(r["peak_mem_MiB"], 0.01))
        axes[0].bar(xs, speed, width, label=b)
        axes[1].bar(xs, mem, width, label=b)
    axes[0].axhline(1.0, color="black", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("fwd+bwd speed-up over eager reference (×)")
    # Outside the axes: a legend inside would hide the bars of the first cases.
    axes[0].legend(fontsize=8, ncol=min(6, len(backends)), loc="lower center", bbox_to_anchor=(0.5, 1.02))
    axes[1].set_yscale("log")
    axes[1].set_ylabel("peak memory beyond inputs (MiB)")
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels(cases, rotation=35, ha="right", fontsize=8)
    device = ok[0]["device"]
    fig.suptitle(f"fused_trim benchmark ({device}); higher is faster, lower uses less memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(device: str) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg_1_5_15min": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        info["memory_GiB"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu"] = props.name
        info["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "fused_trim": _version("fused_trim"),
        "liger_kernel": _version("liger-kernel"),
    }


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer cases and repeats (CPU: a few minutes)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="out/bench", help="output folder (default: out/bench)")
    dtypes, keeps = " and ".join(C.DTYPES), ", ".join(f"{r:g}" for r in C.KEEP_RATIOS)
    per_shape = len(C.DTYPES) * len(C.KEEP_RATIOS)
    p.add_argument(
        "--shapes",
        nargs="+",
        help="run these shapes instead, e.g. 1024x1000 8x19x128x128. Each is combined with every dtype and "
        f"keep ratio of the default cases ({dtypes} x keep {keeps}: {per_shape} cases per shape; on CUDA with "
        "--quick keep 0.5 only) unless --dtypes and --keeps narrow it",
    )
    p.add_argument(
        "--dtypes", nargs="+", choices=sorted(C.DTYPES), help="only these dtypes (default: those of the default cases)"
    )
    p.add_argument(
        "--keeps", nargs="+", type=float, help="only these keep ratios (default: those of the default cases)"
    )
    p.add_argument(
        "--backends", nargs="+", help="only these (the two baselines always run); reference_compiled on request"
    )
    p.add_argument("--repeats", type=int, help="most timed samples per measurement (default 21 quick, 51 full)")
    p.add_argument("--threads", type=int, help="torch intra-op threads on the CPU (default: torch's)")
    p.add_argument("--max-minutes", type=float, help="start no new case after this many minutes")
    p.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth buffer (default 256 CPU, 1024 CUDA)")
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of the compiled baseline (tests: eager)"
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument(
        "--strict", action="store_true", help="exit 3 when a fused_trim backend fails or disagrees with the reference"
    )
    p.add_argument(
        "--lm-head",
        action="store_true",
        help="benchmark trimmed_linear_cross_entropy instead (see benchmarks/lm_head.py); --dtypes, --keeps, "
        "--repeats, --threads, --out and --backends apply",
    )
    p.add_argument("--lm-shapes", nargs="+", help="LM-head shapes NxDxV (default: 2048x512x32000 quick, CPU)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def select_cases(args: argparse.Namespace, device: str) -> list[C.Case]:
    cases = C.runner_cases(device, args.quick)
    if args.shapes or args.dtypes or args.keeps:
        shapes = [C.parse_shape(s) for s in args.shapes] if args.shapes else list(dict.fromkeys(c.shape for c in cases))
        dtypes = args.dtypes or list(dict.fromkeys(c.dtype for c in cases))
        keeps = args.keeps or list(dict.fromkeys(c.keep_ratio for c in cases))
        cases = [C.Case(s, d, r) for r in keeps for d in dtypes for s in shapes]
    for c in cases:
        if not 0.0 < c.keep_ratio <= 1.0:
            raise SystemExit(f"keep ratios must be in (0, 1], got {c.keep_ratio}")
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        _child_main(json.loads(args.child))
        return 0
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False")
    device = "cuda" if torch.device(device).type == "cuda" else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.lm_head:
        return _lm_head_main(args, device, out, started)
    cases = select_cases(args, device)
    backends, skipped = C.available_backends(device)
    if args.backends:
        unknown = set(args.backends) - set(C.DESCRIPTIONS)
        if unknown:
            raise SystemExit(f"unknown backends {sorted(unknown)}; known: {sorted(C.DESCRIPTIONS)}")
        for b in args.backends:
            if b not in backends and b not in skipped and b not in C.OPTIONAL:
                skipped[b] = "not available here"
        backends = [b for b in backends if b in args.backends or b in (C.EAGER_BASELINE, C.COMPILED_BASELINE)]
        backends += [b for b in C.OPTIONAL if b in args.backends]
    opts = {
        "repeats": args.repeats or (21 if args.quick else 51),
        "min_repeats": 3,
        "budget_s": 0.5 if args.quick else 2.0,
        "compile_backend": args.compile_backend,
        "threads": args.threads,
    }
    copy_mib = args.copy_mib or (1024 if device == "cuda" else 256)
    copy_bps = C.copy_bandwidth(device, copy_mib)
    print(f"device {device}; copy bandwidth {copy_bps / 1e9:.1f} GB/s ({copy_mib} MiB, read + write)")
    print(f"backends: {', '.join(backends)}")
    for b, why in skipped.items():
        print(f"skipped {b}: {why}")

    all_rows: list[dict] = []
    threads = torch.get_num_threads()
    skipped_cases: list[str] = []

    def write_outputs() -> str:
        """Write CSV, JSON and the table (after every case, so a cut-short run leaves its data)."""
        wall = time.perf_counter() - started
        info = machine_info(device)
        info["torch_threads"] = threads
        header = (
            f"Machine: {info.get('gpu', info['cpu'])}"
            + (f" ({info['cpu_count']} CPUs, {threads} torch threads)" if device == "cpu" else "")
            + f"; torch {torch.__version__}; copy bandwidth {copy_bps / 1e9:.1f} GB/s; "
            f"compiled baseline: {C.COMPILED_BASELINE} ({args.compile_backend}); wall time {wall:.0f} s"
        )
        table = markdown_table(all_rows)
        write_csv(out / "results.csv", all_rows)
        (out / "results.md").write_text(header + "\n\n" + table + "\n")
        methods = sorted({r["memory_method"] for r in all_rows if r["memory_method"]})
        meta = {
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": [sys.executable, "-m", "benchmarks.run", *(argv if argv is not None else sys.argv[1:])],
            "device": device,
            "machine": info,
            "versions": versions(),
            "copy_bandwidth_GBps": copy_bps / 1e9,
            "copy_buffer_MiB": copy_mib,
            "options": opts,
            "wall_s": wall,
            "backends": {b: C.DESCRIPTIONS[b] for b in backends},
            "skipped_backends": skipped,
            "skipped_cases": skipped_cases,
            "memory_method": methods,
            "memory_method_note": (
                "cuda: max_memory_allocated - memory_allocated before one fwd+bwd"
                if device == "cuda"
                else "fresh subprocess per case; per backend: gc + malloc_trim, reset VmHWM (/proc/self/clear_refs), "
                "then VmHWM after one fwd+bwd - VmRSS before it ('sampling': VmRSS polled every 0.2 ms)"
            ),
            "columns": COLUMNS,
            "rows": all_rows,
        }
        (out / "results.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
        return header + "\n\n" + table

    for i, case in enumerate(cases):
        elapsed = time.perf_counter() - started
        if args.max_minutes is not None and elapsed > 60 * args.max_minutes:
            skipped_cases = [c.label for c in cases[i:]]
            print(f"time budget of {args.max_minutes} min spent: {len(skipped_cases)} cases not run")
            break
        t0 = time.perf_counter()
        if device == "cpu":
            timeout = 600 if args.quick else 1800
            rows, child_threads = run_case_subprocess(case, backends, opts, timeout)
            threads = child_threads or threads
        else:
            torch._dynamo.reset()
            rows = run_case(case, device, backends, opts)
        rows = finish_rows(case, device, rows, copy_bps)
        all_rows.extend(rows)
        bad = [r["backend"] for r in rows if r["status"] != "ok"]
        note = f"; failed: {', '.join(bad)}" if bad else ""
        print(f"[{i + 1}/{len(cases)}] {case.label}: {time.perf_counter() - t0:.1f} s{note}", flush=True)
        write_outputs()

    print()
    print(write_outputs())
    if not args.no_plot:
        problem = write_plot(out / "benchmark.png", all_rows)
        if problem:
            print(problem)
    print(f"\nwrote {out}/results.csv, results.json, results.md" + ("" if args.no_plot else ", benchmark.png"))
    print(f"wall time {time.perf_counter() - started:.1f} s")
    problems = check_rows(all_rows)
    for p in problems:
        print(f"CHECK: {p}")
    return 3 if problems and args.strict else 0


def _lm_head_main(args: argparse.Namespace, device: str, out: Path, started: float) -> int:
    """``--lm-head``: the LM-head rows of :mod:`benchmarks.lm_head`, written to ``lm_head.{md,json}``."""
    from . import lm_head as L

    cases = L.default_cases(device, quick=not args.lm_shapes and not args.dtypes)
    if args.lm_shapes or args.dtypes or args.keeps:
        shapes = (
            [L.parse_shape(s) for s in args.lm_shapes]
            if args.lm_shapes
            else list(dict.fromkeys(c.shape for c in cases))
        )
        dtypes = args.dtypes or list(dict.fromkeys(c.dtype for c in cases))
        keeps = args.keeps or list(L.KEEPS)
        cases = [L.LMCase(s, d, r) for s in shapes for d in dtypes for r in keeps]
    print(f"device {device}; torch threads {torch.get_num_threads()}; {len(cases)} LM-head cases")
    rows = L.run(device, cases, args.repeats or 5, 30.0, args.backends)
    (out / "lm_head.md").write_text(L.markdown(rows) + "\n")
    info = {
        "machine": machine_info(device),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - started,
        "rows": rows,
    }
    (out / "lm_head.json").write_text(json.dumps(info, indent=1, default=str))
    print(f"wrote {out / 'lm_head.md'} and lm_head.json in {time.perf_counter() - started:.0f} s")
    return 0


def check_rows(rows: list[dict]) -> list[str]:
    """fused_trim backends that failed, or whose loss or gradient disagrees with the eager reference."""
    problems = []
    for r in rows:
        if r["backend"] not in ("reference", "native", "triton"):
            continue
        if r["status"] != "ok":
            problems.append(f"{r['case']} {r['backend']}: {r['status']}")
            continue
        tol = 1e-4 if r["dtype"] == "fp32" else 3e-2
        err = r["max_rel_err"]
        if not isinstance(err, float) or not err <= tol:
            problems.append(f"{r['case']} {r['backend']}: max_rel_err {err} > {tol} against the eager reference")
    return problems


if __name__ == "__main__":
    sys.exit(main())
