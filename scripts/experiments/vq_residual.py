"""Prototype, not a codec: the sweep's 2.5-bit cross-layer SVD with its residual re-coded by a menu that adds
vector-quantised classes (docs/compression.md, "A residual": "Vector-quantised residual classes").

Each layer's residual ``T_l - A B_l`` (from the shipped bundle's decoded factors) is centred on its mean row; a row may
take any class of the ``mixed`` menu or a VQ class: its values 8 at a time against 256 codewords, in 1 to 3 residual
stages (1 to 3 bits per value), scaled by the row's RMS (fp16). The codebooks (fp16) are fitted once by weighted
k-means on every layer's normalised residual and charged to the layers in equal shares. Rows are allocated as
``mixed`` allocates them (the same weights, the same bisection of lambda) within the bytes the shipped residual
stores, twice: with ``mixed``'s side information (2-byte positions), and with a compact index in its place (a 5-bit
class id per row plus per-64-row class counts). The decoded tables are written as dense fp32 bundles and compared
with the shipped bundle by ``eval-ppl`` on the held-out and the calibration text.

    python scripts/demo_corpus.py --calibration calib.txt
    python scripts/experiments/vq_residual.py --calibration calib.txt --work /tmp/vq

About a minute on 2 cores. Prints each variant's perplexity change and mean KL on both texts.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tolcli import CompressOptions, compress, demo_checkpoint_path, eval_ppl, open_bundle, precompute  # noqa: E402
from tolcli.bundle.entries import TensorEntry  # noqa: E402
from tolcli.bundle.writer import write_bundle  # noqa: E402
from tolcli.choices import cross_svd_spec  # noqa: E402
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
from tolcli.compress import load_weights  # noqa: E402
from tolcli.progress import NullProgress  # noqa: E402

DIM, CODEWORDS, STAGES = 8, 256, 3
KMEANS_ITERS = 30
HELDOUT = ROOT / "tolcli" / "demo" / "heldout.txt"


def kmeans(x: torch.Tensor, w: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means of the rows of ``x``: (fp16-rounded codewords [k, d], each row's nearest codeword)."""
    g = torch.Generator().manual_seed(seed)
    c = x[torch.multinomial(w, k, replacement=False, generator=g)].clone()
    for _ in range(KMEANS_ITERS):
        a = nearest(x, c)
        num = torch.zeros_like(c).index_add_(0, a, x * w[:, None])
        den = torch.zeros(k).index_add_(0, a, w)
        c = torch.where(den[:, None] > 0, num / den.clamp_min(1e-30)[:, None], c)
    c = c.half().float()
    return c, nearest(x, c)


def nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)).argmin(1)


def normalised(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred rows -> (their 8-value vectors divided by the row's fp16 RMS, that RMS [R, 1])."""
    s = x.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12).half().float()
    return (x / s).reshape(-1, DIM), s


def write_dense(template: Path, path: Path, tables: list[torch.Tensor]) -> Path:
    """``tables`` as a dense fp32 bundle with ``template``'s manifest and tokenizer."""
    with open_bundle(template) as b:
        manifest, raw = copy.deepcopy(b.manifest), np.frombuffer(b.tokenizer_bytes(), dtype=np.uint8).copy()
    manifest["tensors"] = {}
    entries = []
    for i, t in enumerate(tables):
        a = np.ascontiguousarray(t.numpy().astype(np.float32))
        sha = hashlib.sha256(a.data).hexdigest()
        entries.append(TensorEntry(f"layers.{i}.table", "F32", a.shape, sha, lambda a=a: iter([a])))
    sha = hashlib.sha256(raw.data).hexdigest()
    entries.append(TensorEntry("tokenizer", "U8", raw.shape, sha, lambda a=raw: iter([a])))
    return write_bundle(path, entries, manifest)


def demo_bundles(work: Path, calibration: str, bits: float) -> tuple[Path, Path, dict[int, torch.Tensor]]:
    """``work``'s dense fp32 bundle of the demo and the sweep's cross-layer SVD of it at ``bits`` (each made unless
    there already), and the per-layer token weights that SVD was allocated with."""
    work.mkdir(parents=True, exist_ok=True)
    dense, shipped = work / "dense.safetensors", work / "cross-svd.safetensors"
    if not dense.exists():
        precompute(demo_checkpoint_path(), dense, dtype="fp32")
    opts = CompressOptions(codec=cross_svd_spec(bits), sensitivity="demo", calibration=calibration)
    if not shipped.exists():
        compress(dense, shipped, opts)
    with open_bundle(dense) as b:
        weights, _ = load_weights(opts.weighting(), b, NullProgress())
    assert weights is not None
    return dense, shipped, weights


def print_eval(tols: list[Path], calibration: Path, width: int = 40) -> None:
    """Each bundle's perplexity change and mean KL against the demo's own FFNs, on the held-out text and on
    ``calibration`` (``--ctx 128 --stride 64``)."""
    for text in (HELDOUT, calibration):
        report = eval_ppl(demo_checkpoint_path(), [text], tols=tols, ctx=128, stride=64)
        print(f"{text.name}:")
        for v in report.variants:
            change = "" if v["ppl_change_pct"] is None else f"{v['ppl_change_pct']:+.2f}%"
            print(f"  {v['name']:{width}s} ppl {v['ppl']:8.3f} {change:>8}  KL {v['mean_kl']:.3e}")


def recode(shipped: Path, dense: Path, weights: dict[int, torch.Tensor]) -> dict[bool, list[torch.Tensor]]:
    """Every layer decoded: ``A B_l`` as shipped plus the residual re-coded with the VQ classes in the menu, by
    whether the compact index's side information is charged instead of ``mixed``'s (the errors of every class,
    and the codebooks, computed once for both)."""
    with open_bundle(shipped) as b, open_bundle(dense) as d:
        layers, V, h = sorted(b.layers), b.vocab_size, b.hidden_size
        base, resid, budgets = [], [], []
        for i in layers:
            codec, access = b.layers[i].codec, b._accesses[i]
            full = b.dense_layer(i)
            base.append(full - codec.residual.decode_rows(codec.sub_access(access, "R."), torch.arange(V)))
            resid.append(d.read_rows(i, 0, V).float() - base[-1])
            budgets.append(codec.residual.stored_bytes(V, h))  # what the shipped residual stores
    w = {i: row_weights(weights[i], V, DEFAULT_FLOOR) for i in layers}
    means = [_mean_row(TableRows(r)) for r in resid]
    vecs = [normalised(r - m) for r, m in zip(resid, means, strict=True)]
    left = torch.cat([z for z, _ in vecs])
    wv = torch.cat([w[i].float().repeat_interleave(h // DIM) for i in layers])
    books = []
    for st in range(STAGES):  # each stage codes what the stages before it left
        c, a = kmeans(left, wv, CODEWORDS, seed=st)
        books.append(c)
        left = left - c[a]
    book_bytes = STAGES * CODEWORDS * DIM * 2 // len(layers)
    menu = class_menu(h)
    nbytes = torch.tensor(
        [row_bytes(bits, g, h) for bits, g in menu] + [s * h // DIM + 2 for s in range(1, STAGES + 1)]
    )
    sides = {  # what the index and the fp32 mean row cost: mixed's positions (2 bytes a row here), or compact
        False: V * 2 + 4 * h,
        True: math.ceil(V * 5 / 8) + 2 * (len(menu) + STAGES) * math.ceil(V / 64) + 4 * h,
    }
    out: dict[bool, list[torch.Tensor]] = {compact: [] for compact in sides}
    for k, i in enumerate(layers):
        x, (z, s) = resid[k] - means[k], vecs[k]
        rec, vq_rows, vq_err = torch.zeros_like(z), [], []
        for c in books:
            rec = rec + c[nearest(z - rec, c)]
            vq_rows.append(rec.reshape(V, h) * s)
            vq_err.append((x - vq_rows[-1]).double().pow(2).sum(1))
        err = torch.cat([_class_errors(TableRows(resid[k]), means[k], menu), torch.stack(vq_err, 1)], 1)
        for compact, side in sides.items():
            choice = allocate(err, w[i], nbytes, budgets[k] - side - book_bytes)
            dec = means[k].repeat(V, 1)
            for j, (bits, g) in enumerate(menu):
                sel = (choice == j).nonzero().squeeze(1)
                if bits and sel.numel():
                    dec[sel] = dequantize_class(*quantize_class(x[sel], bits, g), bits, g) + means[k]
            for j, rows in enumerate(vq_rows):
                sel = (choice == len(menu) + j).nonzero().squeeze(1)
                dec[sel] = rows[sel] + means[k]
            vq, used = int((choice >= len(menu)).sum()), int(nbytes[choice].sum()) + side + book_bytes
            assert used <= budgets[k], (used, budgets[k])  # the same bytes as the shipped residual, or fewer
            what = "compact index" if compact else "positions"
            print(f"layer {i} ({what}): {vq:,} of {V:,} rows in VQ classes; {used:,} of {budgets[k]:,} bytes")
            out[compact].append(base[k] + dec)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", required=True, help="calibration text (scripts/demo_corpus.py --calibration)")
    ap.add_argument("--work", type=Path, required=True, help="scratch directory for the bundles")
    ap.add_argument("--bits", type=float, default=2.5, help="bits per value of the cross-layer SVD (2.5)")
    a = ap.parse_args()
    torch.manual_seed(0)
    dense, shipped, weights = demo_bundles(a.work, a.calibration, a.bits)
    tols = [shipped]
    for compact, tables in recode(shipped, dense, weights).items():
        tols.append(write_dense(dense, a.work / f"vq{'-compact-index' if compact else ''}.safetensors", tables))
    print_eval(tols, Path(a.calibration))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
