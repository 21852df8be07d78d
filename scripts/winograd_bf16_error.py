"""Why easel's Winograd GEMMs stay f32 in a bf16 model (src/kernels/conv.rs, `winograd_tile`).

Simulates one 3x3 convolution layer (320 input channels, random N(0, 1) input and
N(0, 1/(9*cin)) weights) in float64 four ways and prints each one's error against the direct
convolution of the same bf16-rounded input and weights:
  F(2x2, 3x3) and F(4x4, 3x3) with the transformed operands kept exact (as f32 does), and
  with them rounded to bf16 (what a bf16 Winograd GEMM would multiply).
Also prints how far the bf16 direct convolution itself lands from the exact one.
Run: /work/venv/bin/python scripts/winograd_bf16_error.py   (~10 s; needs numpy and torch)
Measured: F(4x4) with bf16 operands rms 2.4e-2, ten times bf16's own 2.4e-3; F(2x2) 3.8e-3.
"""
import numpy as np
import torch

rng = np.random.default_rng(0)


def bf(x):
    t = torch.from_numpy(np.asarray(x, dtype=np.float32)).to(torch.bfloat16)
    return t.to(torch.float32).numpy().astype(np.float64)


# Lavin & Gray's F(4x4, 3x3) (points 0, 1, -1, 2, -2, inf) and F(2x2, 3x3).
BT4 = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], float)
G4 = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], float)
AT4 = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], float)
BT2 = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], float)
G2 = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], float)
AT2 = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], float)

CIN, COUT, TILES = 320, 64, 400


def direct(d, g, m):
    out = np.zeros((d.shape[0], g.shape[0], m, m))
    for y in range(m):
        for x in range(m):
            out[:, :, y, x] = np.einsum("tcij,ocij->to", d[:, :, y:y + 3, x:x + 3], g)
    return out


def rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max(), np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean())


def run(bt, g_, at, m):
    a = m + 2
    d = rng.standard_normal((TILES, CIN, a, a))
    g = rng.standard_normal((COUT, CIN, 3, 3)) / np.sqrt(9 * CIN)
    db, gb = bf(d), bf(g)
    ref = direct(db, gb, m)
    u = np.einsum("pi,ocij,qj->ocpq", g_, gb, g_)
    v = np.einsum("pi,tcij,qj->tcpq", bt, db, bt)
    for name, (uu, vv) in {"exact operands": (u, v), "bf16 operands": (bf(u), bf(v))}.items():
        y = np.einsum("ip,topq,jq->toij", at, np.einsum("ocpq,tcpq->topq", uu, vv), at)
        mx, rms = rel(y, ref)
        print(f"F({m}x{m},3x3) {name:15s}: vs bf16 direct max {mx:.2e} rms {rms:.2e}")
    mx, rms = rel(ref, direct(d, g, m))
    print(f"  bf16 direct vs exact direct: max {mx:.2e} rms {rms:.2e}")


run(BT2, G2, AT2, 2)
run(BT4, G4, AT4, 4)
