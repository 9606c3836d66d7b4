"""Test set-up: Triton runs in its interpreter on the CPU; hypothesis stays within CI's time."""

import os

# Must be set before any @triton.jit decorator runs (i.e. before fused_trim.triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def grid_select(monkeypatch):
    """Force Triton's multi-program select onto small problems, which the interpreter can run."""
    from fused_trim.triton import function

    monkeypatch.setattr(function, "SINGLE_PROGRAM_MAX_ROWS", 0)
    monkeypatch.setattr(function, "GRID_BLOCK", 64)
