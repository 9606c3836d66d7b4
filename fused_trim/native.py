"""The compiled native op (``fused_trim._C``) and its autograd glue.

The C++ (CPU) and CUDA sources live in ``csrc/``. They register two ``torch.library`` ops,
``fused_trim::trimmed_ce_fwd`` and ``fused_trim::trimmed_ce_bwd``; this module gives them fake
(meta) implementations, so ``torch.compile(fullgraph=True)`` traces through them. The autograd
formula is registered in C++ (``csrc/trimmed_ce_cpu.cpp``, the ``Autograd`` key, for every device):
the backward op fed with the forward's saved logsumexp and per-row scale, no Python on the path.

Spatial inputs reach :func:`trimmed_cross_entropy_2d` as ``(N, C, S)`` (rows in ``n * S + s``
order). The CPU op reads them in place (vectorised across the pixels, which are adjacent in
memory, the classes ``S`` apart; only an input whose last dimension is not unit-stride is made
contiguous first) and returns the gradient in the same ``(N, C, S)`` layout. The CUDA op takes
``(M, C)`` rows only: CUDA tensors are first moved to ``(N * S, C)`` with one copy
(:func:`fused_trim._common.as_rows`).

Build: the first time the op is needed on a machine, the sources are compiled against the
installed torch with the system C++ compiler (and ``nvcc`` for the CUDA kernels, when torch has
CUDA and a GPU is present) and the shared library is cached under ``~/.cache/fused_trim`` (or
``$FUSED_TRIM_CACHE_DIR``), keyed by the sources, the flags, torch's and Python's versions and the
CPU capability; later processes load the cached library in milliseconds (``build()`` does it
ahead of time). When nothing can be built (no compiler, no sources), one warning says why,
``backend="auto"`` falls back to the reference and ``backend="native"`` raises with the reason.
``FUSED_TRIM_NO_BUILD=1`` forbids compiling (a cached library is still used).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ._common import as_rows

__all__ = ["build", "empty_cache", "is_available", "trimmed_cross_entropy_2d", "unavailable_reason"]

_PACKAGE_DIR = Path(__file__).resolve().parent
# The checkout's csrc/ (editable installs), else the copy that setup.py puts into wheels.
_CSRC = next(
    (d for d in (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "_csrc") if (d / "trimmed_ce_cpu.cpp").exists()),
    _PACKAGE_DIR.parent / "csrc",
)
_CPU_SOURCES = ("trimmed_ce_cpu.cpp",)
_CUDA_SOURCES = ("trimmed_ce_cuda.cu",)
_HEADERS = ("trimmed_ce_common.h",)
_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "error": str | None, "cuda": bool, "path": str


# --------------------------------------------------------------------------------------------
# Build and load
# --------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    env = os.environ.get("FUSED_TRIM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fused_trim"


def _cpu_capability_flags() -> tuple[str, list[str]]:
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    if cap == "AVX512":
        return cap, ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                     "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if cap == "AVX2":
        return cap, ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return "DEFAULT", ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]


def _want_cuda() -> bool:
    return (
        torch.version.cuda is not None
        and torch.cuda.is_available()
        and os.environ.get("FUSED_TRIM_NO_CUDA") != "1"
        and _find_nvcc() is not None
    )


def _find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    if os.path.exists(candidate):
        return candidate
    return shutil.which("nvcc")


def _torch_paths() -> tuple[list[str], list[str]]:
    from torch.utils.cpp_extension import include_paths, library_paths

    try:
        incs = include_paths(device_type="cuda" if _want_cuda() else "cpu")
    except TypeError:  # older signature: include_paths(cuda: bool)
        incs = include_paths(_want_cuda())
    try:
        libs = library_paths(device_type="cuda" if _want_cuda() else "cpu")
    except TypeError:
        libs = library_paths(_want_cuda())
    return incs, libs


def _compile_commands(out: Path, workdir: Path, with_cuda: bool) -> list[list[str]]:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    incs, libs = _torch_paths()
    inc_flags = [f"-I{p}" for p in incs] + [f"-I{_CSRC}"]
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    _, cap_flags = _cpu_capability_flags()
    common = ["-O3", "-std=c++20", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *inc_flags]
    cmds = []
    objects = []
    for src in _CPU_SOURCES:
        obj = workdir / (src + ".o")
        cmds.append([cxx, *common, *cap_flags, "-c", str(_CSRC / src), "-o", str(obj)])
        objects.append(str(obj))
    link_libs = ["-lc10", "-ltorch_cpu", "-ltorch"]
    if with_cuda:
        nvcc = _find_nvcc()
        major, minor = torch.cuda.get_device_capability()
        arch = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
        for src in _CUDA_SOURCES:
            obj = workdir / (src + ".o")
            cmds.append([
                nvcc, "-O3", "-std=c++20", arch, "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
                f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *inc_flags, "-c", str(_CSRC / src), "-o", str(obj),
            ])
            objects.append(str(obj))
        cuda_home = str(Path(nvcc).resolve().parent.parent)
        link_libs += ["-lc10_cuda", "-ltorch_cuda", f"-L{cuda_home}/lib64", f"-Wl,-rpath,{cuda_home}/lib64",
                      "-lcudart"]
    lib_flags = []
    for p in libs:
        lib_flags += [f"-L{p}", f"-Wl,-rpath,{p}"]
    cmds.append([cxx, "-shared", "-fopenmp", *objects, "-o", str(out), *lib_flags, *link_libs])
    return cmds


def _build_key(with_cuda: bool) -> str:
    h = hashlib.sha256()
    names = _CPU_SOURCES + _HEADERS + (_CUDA_SOURCES if with_cuda else ())
    for name in names:
        h.update(name.encode())
        h.update((_CSRC / name).read_bytes())
    cap, flags = _cpu_capability_flags()
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(str(torch.version.cuda).encode())
    h.update(sys.version.encode())
    h.update(str(sysconfig.get_platform()).encode())
    if with_cuda:
        h.update(str(torch.cuda.get_device_capability()).encode())
    h.update(b"v1")
    return f"{cap.lower()}{'-cuda' if with_cuda else ''}-{h.hexdigest()[:16]}"


def build(
    force: bool = False, verbose: bool = False, allow_compile: bool = True, with_cuda: bool | None = None
) -> Path:
    """Compile the native op (or find it in the cache) and return the shared library's path.

    ``with_cuda=None`` builds the CUDA kernels too when torch has CUDA, a GPU is present and
    ``nvcc`` is found. Raises ``RuntimeError`` with the compiler's errors when the build fails.
    """
    missing = [n for n in _CPU_SOURCES + _HEADERS if not (_CSRC / n).exists()]
    if missing:
        raise RuntimeError(f"the C++ sources are not found (looked for {', '.join(missing)} in {_CSRC})")
    if with_cuda is None:
        with_cuda = _want_cuda()
    key = _build_key(with_cuda)
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / "fused_trim_cache"
        cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"fused_trim_C-{key}.so"
    if target.exists() and not force:
        return target
    if not allow_compile:
        raise RuntimeError(f"the extension is not built ({target} missing) and FUSED_TRIM_NO_BUILD=1")
    import fcntl

    with open(cache / f"{key}.lock", "w") as lockfile:
        fcntl.flock(lockfile, fcntl.LOCK_EX)  # one build per machine; the others wait and reuse it
        try:
            if target.exists() and not force:
                return target
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                tmp_out = Path(tmp) / target.name
                for cmd in _compile_commands(tmp_out, Path(tmp), with_cuda):
                    if verbose:
                        print(" ".join(cmd), file=sys.stderr)
                    try:
                        proc = subprocess.run(cmd, capture_output=True, text=True)
                    except FileNotFoundError as exc:
                        raise RuntimeError(f"no C++ compiler found ({exc})") from None
                    if proc.returncode != 0:
                        errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
                        detail = "\n".join(errors[:5]) or proc.stderr[-2000:]
                        raise RuntimeError(f"compiling the native op failed ({cmd[0]}):\n{detail}")
                os.replace(tmp_out, target)
        finally:
            fcntl.flock(lockfile, fcntl.LOCK_UN)
    return target


def _load() -> str | None:
    """Build (once) and load the op; returns the error, or None on success."""
    if "error" in _state:
        return _state["error"]  # type: ignore[return-value]
    with _lock:
        if "error" in _state:
            return _state["error"]  # type: ignore[return-value]
        error: str | None = None
        try:
            if not hasattr(torch.ops, "fused_trim") or not hasattr(torch.ops.fused_trim, "trimmed_ce_fwd"):
                allow = os.environ.get("FUSED_TRIM_NO_BUILD") != "1"
                try:
                    path = build(allow_compile=allow)
                except RuntimeError as exc:
                    if not _want_cuda():
                        raise
                    # The CUDA kernels did not build (say, nvcc and torch disagree on the CUDA
                    # version): keep the CPU op rather than lose both.
                    warnings.warn(
                        f"fused_trim: the native CUDA kernels could not be built ({exc}); "
                        "building the CPU op only.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    path = build(allow_compile=allow, with_cuda=False)
                torch.ops.load_library(str(path))
                _state["path"] = str(path)
            _register_python_parts()
            _state["cuda"] = torch._C._dispatch_has_kernel_for_dispatch_key(
                "fused_trim::trimmed_ce_fwd", "CUDA"
            )
        except Exception as exc:  # noqa: BLE001 - any failure means "fall back"
            error = f"the compiled extension fused_trim._C is not available: {exc}"
            warnings.warn(
                f"fused_trim: {error}. backend='auto' uses the reference implementation on the CPU.",
                RuntimeWarning,
                stacklevel=3,
            )
        _state["error"] = error
        return error


def unavailable_reason(device: torch.device) -> str | None:
    """Why the native op cannot run on ``device``, or ``None`` when it can.

    The first call on a machine may compile the extension (tens of seconds, once).
    """
    if not isinstance(device, torch.device):
        device = device.device if isinstance(device, Tensor) else torch.device(device)
    if device.type == "cpu" and _state.get("error", "not loaded") is None:
        return None  # the fast path of every call once the op is loaded
    if device.type not in ("cpu", "cuda"):
        return f"the native op has kernels for CPU and CUDA tensors only, not {device.type}"
    error = _load()
    if error is not None:
        return error
    if device.type == "cuda" and not _state.get("cuda"):
        return "the native op was built without its CUDA kernels (no CUDA torch, nvcc or GPU at build time)"
    return None


def is_available(device: torch.device) -> bool:
    """Whether ``backend="native"`` can run on ``device``."""
    return unavailable_reason(device) is None


def empty_cache() -> None:
    """Release the CPU gradient blocks the native op keeps for reuse (at most two; see
    ``csrc/trimmed_ce_cpu.cpp``). ``FUSED_TRIM_NO_GRAD_CACHE=1`` disables the cache."""
    if _load() is None:
        torch.ops.fused_trim.empty_cache()


# --------------------------------------------------------------------------------------------
# Fake implementations and autograd
# --------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _num_rows(input):
    """Samples of the op's input: ``M`` of ``(M, C)``, ``N * S`` of ``(N, C, S)``."""
    torch._check(input.dim() in (2, 3), lambda: f"fused_trim: input must be (M, C) or (N, C, S), got {input.shape}")
    return input.shape[0] if input.dim() == 2 else input.shape[0] * input.shape[2]


def _fwd_fake(input, target, weight, keep_ratio, keep_ratio_t, easiest, ignore_index, label_smoothing,
              reduction):
    m = _num_rows(input)
    acc = _acc_dtype(input.dtype)
    out = input.new_empty((m,) if reduction == 0 else ())
    return (
        out,
        input.new_empty((m,), dtype=acc),
        input.new_empty((m,), dtype=torch.bool),
        input.new_empty((), dtype=torch.int64),
        input.new_empty(()),
        input.new_empty((m,), dtype=acc),
        input.new_empty((m,), dtype=acc),
    )


def _bwd_fake(grad_out, input, target, weight, lse, rowscale, ignore_index, label_smoothing):
    _num_rows(input)
    return input.new_empty(input.shape)  # contiguous, as the CPU and CUDA ops return it


def _register_python_parts() -> None:
    if _state.get("registered"):
        return
    torch.library.register_fake("fused_trim::trimmed_ce_fwd", _fwd_fake)
    torch.library.register_fake("fused_trim::trimmed_ce_bwd", _bwd_fake)
    _state["registered"] = True


# --------------------------------------------------------------------------------------------
# Backend entry point
# --------------------------------------------------------------------------------------------


def trimmed_cross_entropy_2d(
    input: Tensor,
    target: Tensor,
    keep_ratio: float | Tensor,
    keep: str,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The native op on the normalised ``(M, C)`` or ``(N, C, S)`` problem (see :mod:`fused_trim.reference`).

    Returns ``(out, losses, kept, k, threshold)``, ``losses`` in the accumulation dtype (see
    :func:`fused_trim.reference.trimmed_cross_entropy_2d`); only ``out`` carries gradient.
    """
    if _state.get("error", "not loaded") is not None or not input.is_cpu:
        reason = unavailable_reason(input.device)
        if reason is not None:
            raise RuntimeError(f"backend='native' cannot run here: {reason}")
    if not input.is_cpu:
        # The CUDA op reads (M, C) rows with unit class stride: spatial inputs cost one copy.
        input = as_rows(input)
        if input.stride(-1) != 1:
            input = input.contiguous()
    # (The CPU op takes (M, C) or (N, C, S) with any strides itself.)
    if isinstance(keep_ratio, Tensor):
        ratio, ratio_t = 0.0, keep_ratio
    else:
        ratio, ratio_t = float(keep_ratio), None
    out, losses, kept, k, threshold, _lse, _scale = torch.ops.fused_trim.trimmed_ce_fwd.default(
        input,
        target,
        weight,
        ratio,
        ratio_t,
        keep == "easiest",
        int(ignore_index),
        float(label_smoothing),
        _REDUCTION_CODES[reduction],
    )
    # losses and threshold are marked non-differentiable by the op's autograd (C++): no detach.
    return out, losses, kept, k, threshold
