"""Benchmarks of fused_trim: a pytest-benchmark suite and ``python -m benchmarks.run``.

Shared case and backend definitions live in :mod:`benchmarks.cases`.
"""
