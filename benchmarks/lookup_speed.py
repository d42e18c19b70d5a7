"""Decoder lookups (`Bundle.lookup_layers`) at V=128,256 x h=2,048, 2 layers: ratios to numpy.take and memcpy.

Each bundle is written by the library's writer from random tables in a temp directory (dense fp16: random values;
int4 g64: random codes, scales and offsets, which are a valid int4 table), as safetensors and as HDF5 (tolcli's
chunked layout, and a gzip copy for the fallback path). The baselines run in the same process on the same bytes:

* ``numpy.take`` of the same rows from an in-memory fp16 table, once per layer (the single-token bound);
* a memcpy (``np.copyto``, into a preallocated buffer) of the stored bytes of the rows (dense) or of the decoded
  fp32 bytes (int4): the batch bound.

Lookups write into a reused ``out=`` buffer (what a decoder does); ``fresh`` rows allocate the result per call. Ids
are int64 torch tensors, as a decoder holds them. Run with ``OMP_NUM_THREADS=1`` on a shared machine; the load
average is printed before and after (figures move with it).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._util import best_of, row
from tolcli import convert_bundle, open_bundle
from tolcli.bundle.entries import TensorEntry
from tolcli.bundle.writer import write_bundle
from tolcli.testing import tiny_manifest

V, H, LAYERS, GROUP = 128_256, 2_048, 2, 64
BATCHES = (1, 4_096)
GOALS = {"dense 1": 1 / 3, "dense 4096": 0.5, "int4 4096": 0.3}  # ratio (bound time / lookup time) to reach


def _entry(name: str, dtype: str, arr: np.ndarray) -> TensorEntry:
    return TensorEntry(name, dtype, arr.shape, hashlib.sha256(arr.data).hexdigest(), lambda: iter([arr]))


def _tensors(codec: str, layer: int, g: np.random.Generator) -> dict[str, tuple[str, np.ndarray]]:
    """role -> (dtype, random stored tensor) of one layer."""
    if codec == "dense":
        return {"table": ("F16", g.standard_normal((V, H), dtype=np.float32).astype(np.float16))}
    return {
        "codes": ("U8", g.integers(0, 256, (V, H // 2), dtype=np.uint8)),
        "scales": ("F16", (g.random((V, H // GROUP), dtype=np.float32) * 0.01).astype(np.float16)),
        "offsets": ("F16", (-g.random((V, H // GROUP), dtype=np.float32) * 0.08).astype(np.float16)),
    }


def write_random_bundle(path: Path, codec: str, *, seed: int = 0) -> Path:
    """A ``LAYERS``-layer ``codec`` ("dense" fp16 or "int4" g64) bundle of random tables, by the library's writer."""
    g = np.random.default_rng(seed)
    m = tiny_manifest(V, H)
    m["model"]["num_layers"] = LAYERS
    params = {"dtype": "F16"} if codec == "dense" else {"bits": 4, "group_size": GROUP, "symmetric": False}
    entries, m["layers"] = [], []
    for i in range(LAYERS):
        roles = _tensors(codec, i, g)
        entries += [_entry(f"layers.{i}.{role}", dt, arr) for role, (dt, arr) in roles.items()]
        nbytes = sum(arr.nbytes for _, arr in roles.values())
        m["layers"].append(
            {
                "index": i,
                "status": "present",
                "codec": codec,
                "params": params,
                "tensors": {role: f"layers.{i}.{role}" for role in roles},
                "stored_bytes": nbytes,
                "bits_per_value": nbytes * 8 / (V * H),
            }
        )
    return write_bundle(path, entries, m)


def _ratio_rows(label: str, bound: float, t: float, goal: float | None) -> str:
    verdict = "" if goal is None else ("ok" if bound / t >= goal else "MISSED") + f" (goal >= {goal:.2f}x)"
    return row(label, f"{t * 1e6:10.1f} us", bound / t, verdict)


def measure(directory: Path, repeat: int = 20) -> list[dict[str, Any]]:
    """Every (codec, container, batch) case: lookup times and their bounds, in seconds."""
    g = np.random.default_rng(1)
    memory = g.standard_normal((V, H), dtype=np.float32).astype(np.float16)  # numpy.take's in-memory table
    out: list[dict[str, Any]] = []
    for codec in ("dense", "int4"):
        st = write_random_bundle(directory / f"{codec}.safetensors", codec)
        paths = {"safetensors": st, "HDF5": convert_bundle(st, directory / f"{codec}.h5")}
        if codec == "int4":  # the fallback path (h5py's chunk reads); gzip of 1 GB of dense fp16 alone takes a minute
            paths["HDF5 gzip"] = convert_bundle(st, directory / f"{codec}-gz.h5", compression="gzip")
        for container, path in paths.items():
            with open_bundle(path) as b:
                for n in BATCHES:
                    idn = g.integers(0, V, n)
                    ids = torch.from_numpy(idn)
                    stored = n * LAYERS * (H * 2 if codec == "dense" else H // 2 + 2 * 2 * H // GROUP)
                    decoded = n * LAYERS * H * 4
                    src = np.ones(stored if codec == "dense" else decoded, np.uint8)
                    dst = np.empty_like(src)
                    buf = b.lookup_layers(ids)
                    reps = repeat if n == 1 else max(3, repeat // 4)

                    def take(ids: np.ndarray = idn) -> object:
                        return [np.take(memory, ids, axis=0) for _ in range(LAYERS)]

                    out.append(
                        {
                            "codec": codec,
                            "container": container,
                            "batch": n,
                            "lookup": best_of(lambda b=b, ids=ids, buf=buf: b.lookup_layers(ids, out=buf), reps),
                            "fresh": best_of(lambda b=b, ids=ids: b.lookup_layers(ids), reps),
                            "per_layer": best_of(lambda b=b, ids=ids: [b.lookup(i, ids) for i in range(LAYERS)], reps),
                            "take": best_of(take, reps),
                            "memcpy": best_of(lambda src=src, dst=dst: np.copyto(dst, src), reps),
                        }
                    )
    return out


def run() -> list[str]:
    lines = [
        f"{LAYERS} layers of {V:,} x {H:,}, random tables in the page cache; one lookup_layers call per row, "
        "into a reused out= buffer; ratio = bound time / lookup time (numpy.take: from memory, once per layer; "
        "memcpy: preallocated, of the stored bytes (dense) or the decoded fp32 bytes (int4))"
    ]
    lines.append("load average before: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    with tempfile.TemporaryDirectory() as d:
        cases = measure(Path(d))
    lines.append("load average after: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    st = {(c["codec"], c["batch"]): c["lookup"] for c in cases if c["container"] == "safetensors"}
    for c in cases:
        name = f"{c['codec']:<5} {c['container']:<11} {c['batch']:>5} ids"
        if c["batch"] == 1:
            goal = GOALS.get(f"{c['codec']} 1") if c["container"] == "safetensors" else None
            lines.append(_ratio_rows(f"{name}: vs numpy.take", c["take"], c["lookup"], goal))
        else:
            goal = GOALS.get(f"{c['codec']} {c['batch']}") if c["container"] == "safetensors" else None
            lines.append(_ratio_rows(f"{name}: vs memcpy", c["memcpy"], c["lookup"], goal))
        lines.append(_ratio_rows(f"{name}: fresh result vs out=", c["lookup"], c["fresh"], None))
        lines.append(_ratio_rows(f"{name}: per-layer lookup() vs out=", c["lookup"], c["per_layer"], None))
        if c["container"] != "safetensors":
            base = st[(c["codec"], c["batch"])]
            goal = 0.5 if c["container"] == "HDF5" else None
            lines.append(_ratio_rows(f"{name}: vs safetensors", base, c["lookup"], goal))
    return lines
