"""Where the Triton tests run: interpreted on the CPU (``TRITON_INTERPRET=1``, the default of
tests/conftest.py) or compiled on a CUDA GPU (``TRITON_INTERPRET=0``, as benchmarks/gpu_check.sh
runs them). One process runs one of the two: the interpreter replaces ``@triton.jit`` at import."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
COMPILED_ON_CUDA = HAS_TRITON and not INTERPRETED and torch.cuda.is_available()

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="a CPU check of the interpreted kernels (TRITON_INTERPRET=1); here they run compiled"
)
needs_cuda = pytest.mark.skipif(
    not COMPILED_ON_CUDA, reason="compiled Triton on a CUDA GPU (no GPU here, or TRITON_INTERPRET=1)"
)
any_target = pytest.mark.skipif(not (INTERPRETED or COMPILED_ON_CUDA), reason="Triton cannot run here")

# The backend names of tests/helpers.py: "triton" interpreted on the CPU, "triton@cuda" compiled.
TRITON_TARGETS = [
    pytest.param("triton", marks=needs_interpreter, id="interpreted-cpu"),
    pytest.param("triton@cuda", marks=needs_cuda, id="compiled-cuda"),
]


def target_device(backend: str) -> torch.device:
    """``"triton"`` -> cpu, ``"triton@cuda"`` -> cuda."""
    return torch.device(backend.partition("@")[2] or "cpu")


@pytest.fixture(params=TRITON_TARGETS)
def triton_backend(request) -> str:
    """Each Triton target in turn (the one this process cannot run is skipped with its reason)."""
    return request.param
