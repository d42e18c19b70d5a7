"""Compress peak memory per scheme (ratio to one fp32 layer table) and exact-SVD time (ratio to torch.mm + eigh).

Shape: ``TOLCLI_BENCH_SHAPE=VxH`` (default 32768x512; the paper's is 128256x2048), 2 layers. Each scheme runs in a
fresh interpreter that reports its peak anonymous memory (RssAnon, sampled every millisecond) and VmHWM, which also
counts the input's memory-mapped pages (reclaimable page cache).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._util import best_of, row
from tolcli.bundle.entries import TensorEntry
from tolcli.bundle.writer import write_bundle
from tolcli.codecs.base import TableRows
from tolcli.codecs.svd import SVDCodec
from tolcli.compress import default_batch_rows
from tolcli.testing import memory_probe_script

SCHEMES = (("int4", {}), ("nf4", {}), ("svd", {"rank": 256}), ("svd+int4", {"rank": 256}))
PEAK = memory_probe_script(
    setup="from tolcli import CompressOptions, compress",
    body="""
    rank = int(sys.argv[4])
    opts = CompressOptions(sys.argv[3], rank=rank) if rank else CompressOptions(sys.argv[3])
    compress(sys.argv[1], sys.argv[2], opts, force=True)
    """,
)


def shape() -> tuple[int, int]:
    v, h = os.environ.get("TOLCLI_BENCH_SHAPE", "32768x512").lower().split("x")
    return int(v), int(h)


def _table(V: int, h: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V, h, generator=g) * torch.linspace(2.0, 0.05, h)).numpy()


def write_input(path: Path, V: int, h: int, layers: int = 2) -> Path:
    """A dense fp32 bundle of ``layers`` random tables, written block by block (no table held twice)."""
    entries, entry_list = [], []
    for i in range(layers):
        arr = _table(V, h, i)
        sha = hashlib.sha256(arr).hexdigest()
        entries.append(TensorEntry(f"layers.{i}.table", "F32", (V, h), sha, lambda a=arr: iter([a])))
        entry_list.append(
            {"index": i, "status": "present", "codec": "dense", "params": {"dtype": "F32"},
             "tensors": {"table": f"layers.{i}.table"}, "stored_bytes": V * h * 4, "bits_per_value": 32.0}
        )  # fmt: skip
    manifest = {
        "format": "tolcli.tol",
        "format_version": 1,
        "tolcli_version": "bench",
        "source": {"checkpoint": "synthetic", "files": [], "config": {}},
        "model": {"type": "memoryllm", "vocab_size": V, "hidden_size": h, "num_layers": layers, "ffn_alpha": 1.0,
                  "memory_norm_type": "layernorm"},
        "vocabulary": {"size": V, "embedded": False, "tokenizer_sha256": None, "special_tokens": []},
        "layers": entry_list,
        "tensors": {},
    }  # fmt: skip
    return write_bundle(path, entries, manifest)


def peaks(src: Path, out: Path, scheme: str, rank: int) -> tuple[int, int, int]:
    """(RSS before compress, peak anonymous RSS, VmHWM) of one compress run in a fresh interpreter."""
    r = subprocess.run(
        [sys.executable, "-c", PEAK, str(src), str(out), scheme, str(rank)], capture_output=True, text=True, check=True
    )
    base, anon, hwm = (int(x) for x in r.stdout.split())
    return base, anon, hwm


def svd_time(V: int, h: int, rank: int) -> list[str]:
    """Exact SVD (streamed fp32-product Gram, eigh, A = T V_r) against torch.mm(T^T, T) + eigh, side by side."""
    t = torch.from_numpy(_table(V, h, 0))
    batch = default_batch_rows(h)

    def bound() -> None:
        torch.linalg.eigh(torch.mm(t.T, t).double())

    def fit() -> None:
        SVDCodec(rank).encoder(TableRows(t, batch))

    def fit_and_project() -> None:
        SVDCodec(rank).encoder(TableRows(t, batch)).encode_rows(t)

    tb = best_of(bound, repeat=2)
    tf = best_of(fit, repeat=2)
    tp = best_of(fit_and_project, repeat=2)
    return [
        row("bound: torch.mm(T^T, T) fp32 + eigh", f"{tb:.2f} s"),
        row(f"exact SVD basis (streamed Gram, {batch}-row batches) + eigh", f"{tf:.2f} s", tf / tb, "goal <= 1.5x"),
        row(f"  ... + A = T V_r (rank {rank}) encoded fp16", f"{tp:.2f} s", tp / tb),
    ]


def run() -> list[str]:
    V, h = shape()
    table = V * h * 4
    out = [f"input: 2 layers of {V:,} x {h} fp32 ({table / 1e6:.0f} MB per table); ratios are to one table"]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        src = write_input(Path(d) / "dense.safetensors", V, h)
        out.append(row("write the input", f"{time.perf_counter() - t0:.1f} s"))
        for scheme, kw in SCHEMES:
            rank = int(kw.get("rank", 0))
            if rank > min(V, h):
                continue
            base, anon, hwm = peaks(src, Path(d) / "out.safetensors", scheme, rank)
            label = f"{scheme}" + (f" rank {rank}" if rank else "")
            grown = anon - base
            out.append(row(f"{label}: peak anonymous RSS - start", f"{grown / 1e6:.0f} MB", grown / table))
            out.append(row(f"{label}: VmHWM (with the mapped input)", f"{hwm / 1e6:.0f} MB", hwm / table))
    out += svd_time(V, h, min(256, h // 2))
    return out
