#!/usr/bin/env python3
"""Fits the polynomial for 2^f on [-1/2, 1/2] that src/kernels/attention.rs (`exp2_16`, the bf16
softmax) uses: minimax in the relative error, by iteratively reweighted least squares (Lawson's
method) on a dense grid, then checked with f32 arithmetic as the kernel evaluates it (Horner).

    python scripts/fit_exp2.py [degree]      # default 3: prints the coefficients, highest first
"""
import sys

import numpy as np


def fit(deg, iters=60):
    f = np.linspace(-0.5, 0.5, 20001)
    y = 2.0 ** f
    w = np.ones_like(f)
    for _ in range(iters):
        a = np.vander(f, deg + 1) * (w / y)[:, None]
        c, *_ = np.linalg.lstsq(a, w, rcond=None)
        err = np.abs(np.polyval(c, f) / y - 1)
        w = w * (1 + err / err.max()) ** 2
        w /= w.max()
    c32, f32 = c.astype(np.float32), f.astype(np.float32)
    p = np.full_like(f32, c32[0])
    for cc in c32[1:]:
        p = (p * f32 + cc).astype(np.float32)
    return c32, np.abs(p.astype(np.float64) / 2.0 ** f32.astype(np.float64) - 1).max()


if __name__ == "__main__":
    deg = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    c, err = fit(deg)
    print("coefficients (highest power first):", ", ".join(f"{x:.9g}" for x in c))
    print(f"max relative error with f32 Horner: {err:.3g}")
