"""Fits the odd polynomial of the Triton kernels' fp32 ``tanh`` (``fused_trim/triton/_ce.py``):
``tanh(a) ~ a + a s q(s)``, ``s = a**2``, ``q`` of degree 4, on ``0 <= a <= 0.6``, by iteratively
reweighted least squares towards the minimax relative error, against mpmath's ``tanh``; prints the
coefficients (highest first) and the fp32 evaluation's largest error in ulp.

    python scripts/fit_tanh.py
"""

from __future__ import annotations

import mpmath
import numpy as np

LIMIT = 0.6  # above it the kernels use (1 - e) / (1 + e), e = exp(-2a), without cancellation


def fit(degree: int = 4, points: int = 20001, rounds: int = 60) -> np.ndarray:
    a = np.linspace(1e-6, LIMIT, points)
    s = a * a
    q_exact = np.array([float((mpmath.tanh(mpmath.mpf(x)) - x) / x**3) for x in a])
    vander = np.vander(s, degree + 1, increasing=True)
    weight = np.ones_like(a)
    for _ in range(rounds):
        root = np.sqrt(weight)
        coef, *_ = np.linalg.lstsq(vander * root[:, None], q_exact * root, rcond=None)
        err = np.abs(a**3 * (vander @ coef - q_exact) / np.tanh(a))
        weight = weight * (1.0 + err / err.max())
    return coef


def fp32_ulp_error(coef: np.ndarray, points: int = 20001) -> float:
    a = np.linspace(1e-6, LIMIT, points).astype(np.float32)
    s = a * a
    c = coef.astype(np.float32)
    q = np.float32(c[-1])
    for k in range(len(c) - 2, -1, -1):
        q = (q * s + c[k]).astype(np.float32)
    t = ((q * s) * a + a).astype(np.float32)
    exact = np.array([float(mpmath.tanh(mpmath.mpf(float(x)))) for x in a])
    return float(np.max(np.abs(t.astype(np.float64) - exact) / np.spacing(exact.astype(np.float32))))


if __name__ == "__main__":
    coef = fit()
    print("coefficients of q, highest power first:", ", ".join(f"{c:.11e}" for c in coef[::-1]))
    print(f"largest fp32 error on [0, {LIMIT}]: {fp32_ulp_error(coef):.2f} ulp")
