"""Exact (Gram + eigh; fp64 or fp32 Gram products) vs randomized SVD: time and squared error at several ranks."""

from __future__ import annotations

import torch

from benchmarks._models import decaying_table
from benchmarks._util import best_of, row
from tolcli.codecs.svd import factorize


def run() -> list[str]:
    V, H = 16384, 512
    t = decaying_table(V, H)
    out = [f"table {V:,} x {H} fp32 with a decaying spectrum; ratio = exact time / randomized time"]
    for r in (16, 64, 128):
        a, b = factorize(t, r)
        e_exact = float((a @ b - t).double().pow(2).sum())
        t_exact = best_of(lambda r=r: factorize(t, r), repeat=2)
        ar, br = factorize(t, r, method="randomized")
        e_rand = float((ar @ br - t).double().pow(2).sum())
        t_rand = best_of(lambda r=r: factorize(t, r, method="randomized"), repeat=2)
        out.append(row(f"rank {r}: exact (fp64 Gram products)", f"{t_exact:.2f} s"))
        a32, b32 = factorize(t, r, gram="fp32")
        e32 = float((a32 @ b32 - t).double().pow(2).sum())
        t32 = best_of(lambda r=r: factorize(t, r, gram="fp32"), repeat=2)
        goal = f"error {e32 / e_exact:.6f}x fp64"
        out.append(row(f"rank {r}: exact (fp32 Gram products)", f"{t32:.2f} s", t_exact / t32, goal))
        out.append(
            row(
                f"rank {r}: randomized (p=10, q=2)",
                f"{t_rand:.2f} s",
                t_exact / t_rand,
                f"error {e_rand / e_exact:.4f}x exact",
            )
        )
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out
