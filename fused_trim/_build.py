"""Compiles the native op's sources (``csrc/``) into one shared library, cached per machine.

The library is built against the installed torch with the system C++ compiler (and ``nvcc`` for
the CUDA kernels, when torch has CUDA and a GPU is present) and cached under
``~/.cache/fused_trim`` (or ``$FUSED_TRIM_CACHE_DIR``), keyed by every source and header under
``csrc/`` (``*.cpp`` and ``*.cu`` at the top level are the translation units, ``*.h``/``*.cuh`` at any
depth are hashed), the flags, torch's and Python's versions and the CPU capability. Later
processes load the cached file in milliseconds; concurrent first builds on one machine wait on a
file lock and reuse the first one's result.

Why not ``torch.utils.cpp_extension.load``: it needs the ``ninja`` Python package (not a
dependency of torch, nor of this package), keeps one build folder per extension name (so two
torch versions or CPU capabilities sharing a cache folder rebuild each other's library in turn),
cannot fall back to a CPU-only library when ``nvcc`` fails on the ``.cu``, and gives no say on the
per-CPU-capability vector flags the kernels are tuned for. The commands here are the few that it
would run: one compile per translation unit (in parallel) and one link.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

__all__ = ["CSRC", "build", "cache_dir", "find_nvcc", "want_cuda"]

_PACKAGE_DIR = Path(__file__).resolve().parent
# The checkout's csrc/ (editable installs), else the copy that setup.py puts into wheels.
CSRC = next(
    (d for d in (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "_csrc") if (d / "trimmed_ce_cpu.cpp").exists()),
    _PACKAGE_DIR.parent / "csrc",
)
_KEY_VERSION = b"v2"


def _cpu_sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def _cuda_sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def _headers() -> list[Path]:
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh"))


def cache_dir() -> Path:
    """The folder of the cached libraries (``$FUSED_TRIM_CACHE_DIR``, else ``~/.cache/fused_trim``)."""
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
        return cap, [
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
            "-DCPU_CAPABILITY=AVX512",
            "-DCPU_CAPABILITY_AVX512",
        ]
    if cap == "AVX2":
        return cap, ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return "DEFAULT", ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]


def find_nvcc() -> str | None:
    """``$CUDA_HOME/bin/nvcc`` (or ``$CUDA_PATH``, ``/usr/local/cuda``), else ``nvcc`` on the PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    if os.path.exists(candidate):
        return candidate
    return shutil.which("nvcc")


def want_cuda() -> bool:
    """Whether a build includes the CUDA kernels: CUDA torch, a GPU, ``nvcc``, no ``FUSED_TRIM_NO_CUDA=1``."""
    return (
        torch.version.cuda is not None
        and torch.cuda.is_available()
        and os.environ.get("FUSED_TRIM_NO_CUDA") != "1"
        and find_nvcc() is not None
    )


def _torch_paths(with_cuda: bool) -> tuple[list[str], list[str]]:
    from torch.utils.cpp_extension import include_paths, library_paths

    device = "cuda" if with_cuda else "cpu"
    try:
        incs = include_paths(device_type=device)
    except TypeError:  # older signature: include_paths(cuda: bool)
        incs = include_paths(with_cuda)
    try:
        libs = library_paths(device_type=device)
    except TypeError:
        libs = library_paths(with_cuda)
    return incs, libs


def _commands(out: Path, workdir: Path, with_cuda: bool) -> tuple[list[list[str]], list[str]]:
    """(the compile commands, one per translation unit, independent; the link command)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    incs, libs = _torch_paths(with_cuda)
    inc_flags = [f"-I{p}" for p in incs] + [f"-I{CSRC}"]
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    _, cap_flags = _cpu_capability_flags()
    common = ["-O3", "-std=c++20", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *inc_flags]
    compiles, objects = [], []
    for src in _cpu_sources():
        obj = workdir / (src.name + ".o")
        compiles.append([cxx, *common, *cap_flags, "-c", str(src), "-o", str(obj)])
        objects.append(str(obj))
    link_libs = ["-lc10", "-ltorch_cpu", "-ltorch"]
    if with_cuda:
        nvcc = find_nvcc()
        major, minor = torch.cuda.get_device_capability()
        arch = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
        for src in _cuda_sources():
            obj = workdir / (src.name + ".o")
            compiles.append(
                [
                    nvcc,
                    "-O3",
                    "-std=c++20",
                    arch,
                    "--expt-relaxed-constexpr",
                    "-Xcompiler",
                    "-fPIC",
                    f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                    *inc_flags,
                    "-c",
                    str(src),
                    "-o",
                    str(obj),
                ]
            )
            objects.append(str(obj))
        cuda_home = str(Path(nvcc).resolve().parent.parent)
        link_libs += ["-lc10_cuda", "-ltorch_cuda", f"-L{cuda_home}/lib64", f"-Wl,-rpath,{cuda_home}/lib64", "-lcudart"]
    lib_flags = []
    for p in libs:
        lib_flags += [f"-L{p}", f"-Wl,-rpath,{p}"]
    link = [cxx, "-shared", "-fopenmp", *objects, "-o", str(out), *lib_flags, *link_libs]
    return compiles, link


def _build_key(with_cuda: bool) -> str:
    h = hashlib.sha256()
    files = _cpu_sources() + _headers() + (_cuda_sources() if with_cuda else [])
    for path in files:
        h.update(path.relative_to(CSRC).as_posix().encode())
        h.update(path.read_bytes())
    cap, flags = _cpu_capability_flags()
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(str(torch.version.cuda).encode())
    h.update(sys.version.encode())
    h.update(str(sysconfig.get_platform()).encode())
    if with_cuda:
        h.update(str(torch.cuda.get_device_capability()).encode())
    h.update(_KEY_VERSION)
    return f"{cap.lower()}{'-cuda' if with_cuda else ''}-{h.hexdigest()[:16]}"


def _failure(cmd: list[str], stderr: str) -> RuntimeError:
    errors = [ln for ln in stderr.splitlines() if "error" in ln.lower()]
    detail = "\n".join(errors[:5]) or stderr[-2000:]
    return RuntimeError(f"compiling the native op failed ({cmd[0]}):\n{detail}")


def _run_all(compiles: list[list[str]], link: list[str], verbose: bool) -> None:
    """The compiles side by side (each translation unit takes a core for tens of seconds), then the link."""
    procs = []
    try:
        for cmd in compiles:
            if verbose:
                print(" ".join(cmd), file=sys.stderr)
            try:
                procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
            except FileNotFoundError as exc:
                raise RuntimeError(f"no C++ compiler found ({exc})") from None
        for cmd, proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise _failure(cmd, err)
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if verbose:
        print(" ".join(link), file=sys.stderr)
    try:
        proc = subprocess.run(link, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise RuntimeError(f"no C++ compiler found ({exc})") from None
    if proc.returncode != 0:
        raise _failure(link, proc.stderr)


def build(
    force: bool = False, verbose: bool = False, allow_compile: bool = True, with_cuda: bool | None = None
) -> Path:
    """Compile the native op (or find it in the cache) and return the shared library's path.

    ``with_cuda=None`` builds the CUDA kernels too when :func:`want_cuda`. A compile says so once
    on stderr (it takes tens of seconds, once per machine). Raises ``RuntimeError`` with the
    compiler's errors when the build fails, or when ``allow_compile=False`` and nothing is cached.
    """
    if not (CSRC / "trimmed_ce_cpu.cpp").exists():
        raise RuntimeError(f"the C++ sources are not found (looked for trimmed_ce_cpu.cpp in {CSRC})")
    if with_cuda is None:
        with_cuda = want_cuda()
    key = _build_key(with_cuda)
    cache = cache_dir()
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
            what = "CPU and CUDA op" if with_cuda else "CPU op"
            print(f"fused_trim: compiling the native {what} (once per machine, ~25 s) ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                tmp_out = Path(tmp) / target.name
                compiles, link = _commands(tmp_out, Path(tmp), with_cuda)
                _run_all(compiles, link, verbose)
                os.replace(tmp_out, target)
        finally:
            fcntl.flock(lockfile, fcntl.LOCK_UN)
    return target
