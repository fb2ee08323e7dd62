"""Fit the rational erf that ``cogvlm2/kernels/gelu.h`` evaluates: erf(z) = z P(z^2) / Q(z^2), Q(0) = 1,
P of degree 6 and Q of degree 5 in z^2, on 0 <= z <= 4 (erf(4) = 1 - 1.5e-8; beyond it the kernel clamps).

Linearised least squares (P(s) z - erf(z) Q(s) = 0 on Chebyshev points), reweighted towards the worst
points for a few rounds, in float64. Prints the coefficients in the kernel's order and the fit's largest
absolute error (1.5e-9; the kernel evaluates in double, so its GELU is float32-rounded from that).

    python tools/fit_erf.py
"""
import numpy as np
from scipy.special import erf

P_DEGREE, Q_DEGREE, Z_MAX, ROUNDS = 6, 5, 4.0, 30


def fit():
    z = np.cos(np.linspace(0, np.pi, 20001)) * Z_MAX / 2 + Z_MAX / 2
    s, f = z * z, erf(z)
    a = np.hstack([z[:, None] * s[:, None] ** np.arange(P_DEGREE + 1),
                   -f[:, None] * s[:, None] ** np.arange(1, Q_DEGREE + 1)])
    weights, q_values = np.ones_like(z), np.ones_like(z)
    for _ in range(ROUNDS):
        scale = weights / np.abs(q_values)
        c, *_ = np.linalg.lstsq(a * scale[:, None], f * scale, rcond=None)
        p, q = c[:P_DEGREE + 1], np.concatenate([[1.0], c[P_DEGREE + 1:]])
        q_values = np.polyval(q[::-1], s)
        error = z * np.polyval(p[::-1], s) / q_values - f
        weights = weights * (1 + 0.5 * np.abs(error) / np.abs(error).max())
    return p, q, float(np.abs(error).max())


if __name__ == "__main__":
    p, q, worst = fit()
    print("P (s^0 .. s^6):", ", ".join(repr(float(v)) for v in p))
    print("Q (s^0 .. s^5):", ", ".join(repr(float(v)) for v in q))
    print(f"largest |error| on [0, {Z_MAX}]: {worst:.2e}")
