"""Prototype, not a codec: entropy-coded rows (uniform scalar codes with a Huffman code per class) in place of
``mixed``'s fixed-rate rows, for the sweep's 2.5-bit cross-layer SVD (docs/compression.md, "Entropy-coded rows").

Each row of a centred table (the residual ``T_l - A B_l``, or ``A`` itself) is divided by its RMS (fp16) and
coded on a uniform grid of step ``d`` (one class per step, 30 steps from 0.04 to 6.1 times the row RMS;
reconstruction at the grid point); a row may also take no bits (the mean row). Each class has a Huffman code
fitted to the codes of the rows that chose it (four rounds of allocation and refit), its code lengths stored (a
byte per symbol). Bytes charged per coded row: its Huffman-coded values plus a fixed overhead (4 bytes unless
said otherwise: the fp16 RMS and a 2-byte offset, which O(1) row addressing needs), plus a class byte for every
row and the fp32 mean row. Rows are allocated as ``mixed`` allocates them (the same weights, lambda bisected)
within the bytes ``mixed`` stores for the same table.

Prints, against the shipped bundle (``mixed`` rows throughout):
1. the residual alone re-coded (A and B as shipped), its loss-weighted error, with 4, 2 and 0 bytes per row and
   with ideal code lengths (-log2 p) in place of Huffman's;
2. ``A`` alone (fitted to the stored B by least squares, then coded), its weighted error;
3. both re-coded end to end (the residual refitted to the decoded ``A``), with ``A``'s bytes at 1.0, 0.85 and 0.7
   of the shipped ``A``'s and the rest given to the residuals; each written as a dense fp32 bundle and evaluated on
   the held-out and the calibration text.

    python scripts/demo_corpus.py --calibration calib.txt
    python scripts/experiments/entropy_coded.py --calibration calib.txt --work /tmp/ecsq

About 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "experiments"))

from vq_residual import demo_bundles, print_eval, write_dense  # noqa: E402

from tolcli import open_bundle  # noqa: E402
from tolcli.codecs.base import TableRows  # noqa: E402
from tolcli.codecs.mixed import (  # noqa: E402
    DEFAULT_FLOOR,
    _class_errors,
    _mean_row,
    allocate,
    class_menu,
    dequantize_class,
    quantize_class,
    row_bytes,
    row_weights,
)

STEPS = [0.04 * 2 ** (j / 4) for j in range(30)]  # grid step / row RMS
KMAX = 40  # codes -40 .. 40 (81 symbols; larger values clamp)
ROUNDS = 4  # allocation, then Huffman codes refitted to the rows that chose each class


def huffman_lengths(counts: list[float]) -> torch.Tensor:
    """Code lengths (bits) of a Huffman code for symbols with these (positive) counts."""
    lengths = [0] * len(counts)
    heap = [(c, i, [i]) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    tie = len(counts)
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        for s in a[2] + b[2]:
            lengths[s] += 1
        heapq.heappush(heap, (a[0] + b[0], tie, a[2] + b[2]))
        tie += 1
    return torch.tensor(lengths, dtype=torch.float64)


def bisect(cost: torch.Tensor, nbytes: torch.Tensor, room: float) -> torch.Tensor:
    """Per row, the column minimising ``cost + lambda * nbytes`` (row-dependent bytes) for the smallest lambda
    whose rows fit in ``room`` bytes (column 0 costs no bytes)."""

    def pick(lam: float) -> torch.Tensor:
        return (cost + lam * nbytes).argmin(1)

    def used(c: torch.Tensor) -> float:
        return float(nbytes.gather(1, c[:, None]).sum())

    lo, hi = 1e-30, float(((cost[:, :1] - cost) / nbytes.clamp_min(1e-9)).max()) * 2 + 1e-30
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if used(pick(mid)) <= room else (mid, hi)
    return pick(hi)


def entropy_coded(x: torch.Tensor, w: torch.Tensor, budget: int, overhead: float, ideal: bool) -> torch.Tensor:
    """Rows of ``x`` (not centred) coded within ``budget`` bytes (side information included): the decoded rows."""
    mean = _mean_row(TableRows(x))
    z = x - mean
    V, h = z.shape
    s = z.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12).half().float()
    codes, recs = [], []
    for d in STEPS:
        q = torch.round(z / s / d).clamp(-KMAX, KMAX)
        codes.append(q.long() + KMAX)
        recs.append(s * d * q)
    err = torch.stack([z.double().pow(2).sum(1)] + [(z - r).double().pow(2).sum(1) for r in recs], 1)
    cost = w[:, None] * err
    room0 = budget - V - 4 * h  # a class byte per row, the fp32 mean row
    choice = None
    for _ in range(ROUNDS):
        nbytes, tables = [torch.zeros(V, dtype=torch.float64)], 0
        for k, q in enumerate(codes):
            mine = None if choice is None else choice == k + 1
            rows = q if mine is None or not bool(mine.any()) else q[mine]
            counts = torch.bincount(rows.flatten(), minlength=2 * KMAX + 1).double()
            if ideal:
                p = (counts + 0.5) / (counts + 0.5).sum()
                lengths = -torch.log2(p)
            else:
                lengths = huffman_lengths((counts + 1e-3).tolist())  # every symbol codable
            tables += 0 if mine is None or not bool(mine.any()) else 2 * KMAX + 1  # a length byte per symbol
            nbytes.append(lengths[q].sum(1) / 8 + overhead)
        choice = bisect(cost, torch.stack(nbytes, 1), room0 - tables)
    out = mean.repeat(V, 1)
    for k, r in enumerate(recs):
        sel = choice == k + 1
        out[sel] = r[sel] + mean
    return out


def mixed_coded(x: torch.Tensor, w: torch.Tensor, budget: int) -> torch.Tensor:
    """Rows of ``x`` as ``mixed`` codes them within ``budget`` bytes (its 2-byte positions and mean row included)."""
    V, h = x.shape
    mean = _mean_row(TableRows(x))
    menu = class_menu(h)
    err = _class_errors(TableRows(x), mean, menu)
    nbytes = torch.tensor([row_bytes(b, g, h) for b, g in menu])
    choice = allocate(err, w, nbytes, budget - (2 * V + 4 * h))
    out = mean.repeat(V, 1)
    for j, (bits, g) in enumerate(menu):
        sel = (choice == j).nonzero().squeeze(1)
        if bits and sel.numel():
            out[sel] = dequantize_class(*quantize_class(x[sel] - mean, bits, g), bits, g) + mean
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", required=True, help="calibration text (scripts/demo_corpus.py --calibration)")
    ap.add_argument("--work", type=Path, required=True, help="scratch directory for the bundles")
    a = ap.parse_args()
    torch.manual_seed(0)
    dense, shipped, weights = demo_bundles(a.work, a.calibration, 2.5)
    with open_bundle(shipped) as b, open_bundle(dense) as d:
        layers, V, h = sorted(b.layers), b.vocab_size, b.hidden_size
        T = [d.read_rows(i, 0, V).float() for i in layers]
        B = [b.layers[i].codec.b_f32(b._accesses[i]) for i in layers]
        shipped_T = [b.dense_layer(i).float() for i in layers]
        res_budget = [b.layers[i].codec.residual.stored_bytes(V, h) for i in layers]
        r = B[0].shape[0]
        a_budget = b.layers[layers[0]].codec.a_codec.stored_bytes(V, r)
    w = [row_weights(weights[i], V, DEFAULT_FLOOR) for i in layers]
    w_a = row_weights(torch.stack([weights[i] for i in layers]).mean(0), V, DEFAULT_FLOOR)

    def weighted(tables: list[torch.Tensor]) -> float:
        return sum(float((wl * (t - o).double().pow(2).sum(1)).sum()) for wl, t, o in zip(w, T, tables, strict=True))

    ref = weighted(shipped_T)
    print(f"shipped bundle: loss-weighted error {ref:.4e}; A {V:,} x {r} in {a_budget:,} bytes")
    # 1. the residual alone
    with open_bundle(shipped) as b:
        base = []
        for i in layers:
            codec = b.layers[i].codec
            resid = codec.residual.decode_rows(codec.sub_access(b._accesses[i], "R."), torch.arange(V))
            base.append(b.dense_layer(i).float() - resid)
    for over, ideal in ((4.0, False), (4.0, True), (2.0, False), (0.0, False)):
        tables = [
            bl + entropy_coded(t - bl, wl, bud, over, ideal)
            for bl, t, wl, bud in zip(base, T, w, res_budget, strict=True)
        ]
        what = "ideal lengths" if ideal else "Huffman"
        print(f"1. residual entropy-coded ({what}, {over:g} bytes a row): {ref / weighted(tables):.3f}x lower error")
    # 2. A alone
    A = torch.cat(T, 1) @ torch.linalg.pinv(torch.cat(B, 1))
    err_m = float((w_a * (A - mixed_coded(A, w_a, a_budget)).double().pow(2).sum(1)).sum())
    err_e = float((w_a * (A - entropy_coded(A, w_a, a_budget, 4.0, False)).double().pow(2).sum(1)).sum())
    print(f"2. A entropy-coded (Huffman, 4 bytes a row): {err_m / err_e:.3f}x lower weighted error than mixed's A")
    # 3. end to end
    tols = [shipped]
    for share in (1.0, 0.85, 0.7):
        budget = int(a_budget * share)
        extra = (a_budget - budget) // len(layers)
        a_hat = entropy_coded(A, w_a, budget, 4.0, False)
        tables = []
        for bl, t, wl, bud in zip(B, T, w, res_budget, strict=True):
            f = a_hat @ bl
            tables.append(f + entropy_coded(t - f, wl, bud + extra, 4.0, False))
        print(f"3. A at {share:.2f} of its bytes, both entropy-coded: {ref / weighted(tables):.3f}x lower error")
        tols.append(write_dense(dense, a.work / f"entropy-coded-a{share:.2f}.safetensors", tables))
    print_eval(tols, Path(a.calibration), width=48)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
