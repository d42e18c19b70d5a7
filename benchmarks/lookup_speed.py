"""Bundle row lookups (uniform and Zipf-distributed token ids) vs a plain memcpy of the same bytes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks._util import best_of, row
from tolcli import convert_bundle, open_bundle
from tolcli.bundle.entries import TensorEntry
from tolcli.bundle.writer import write_bundle


def _bundle(path: Path, V: int, H: int) -> Path:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(V, H, generator=g).half().numpy()
    import hashlib

    e = TensorEntry("layers.0.table", "F16", (V, H), hashlib.sha256(table.tobytes()).hexdigest(), lambda: iter([table]))
    manifest = {
        "format": "tolcli.tol",
        "format_version": 1,
        "tolcli_version": "bench",
        "source": {"checkpoint": "synthetic", "files": [], "config": {}},
        "model": {
            "type": "memoryllm",
            "vocab_size": V,
            "hidden_size": H,
            "num_layers": 1,
            "ffn_alpha": 1.0,
            "memory_norm_type": "layernorm",
        },
        "vocabulary": {"size": V, "embedded": False, "tokenizer_sha256": None, "special_tokens": []},
        "layers": [
            {
                "index": 0,
                "status": "present",
                "codec": "dense",
                "params": {"dtype": "F16"},
                "tensors": {"table": "layers.0.table"},
                "stored_bytes": V * H * 2,
                "bits_per_value": 16.0,
            }
        ],
    }
    return write_bundle(path, [e], manifest)


def run() -> list[str]:
    V, H, N = 65536, 1024, 32768
    out = [
        f"dense fp16 table {V:,} x {H} ({V * H * 2 / 1e6:.0f} MB, in the page cache); {N:,} ids per call; "
        "GB/s of stored (fp16) bytes; ratio vs a memcpy of the same bytes into new memory"
    ]
    g = np.random.default_rng(0)
    ids = {
        "uniform ids": torch.from_numpy(g.integers(0, V, N)),
        "Zipf ids (s=1.1)": torch.from_numpy(np.minimum(g.zipf(1.1, N) - 1, V - 1)),
    }
    src = np.ones(N * H * 2, dtype=np.uint8)
    dst = np.empty_like(src)
    nbytes = N * H * 2
    t_pre = best_of(lambda: np.copyto(dst, src), repeat=5)
    t_copy = best_of(lambda: src.copy(), repeat=5)  # what any call returning fresh memory pays (page faults)
    out.append(row("memcpy into a preallocated buffer", f"{nbytes / t_pre / 1e9:.2f} GB/s"))
    out.append(row("memcpy into new memory (the baseline)", f"{nbytes / t_copy / 1e9:.2f} GB/s"))
    with tempfile.TemporaryDirectory() as d:
        st = _bundle(Path(d) / "t.safetensors", V, H)
        h5 = convert_bundle(st, Path(d) / "t.h5")
        for label, path in (("safetensors (mmap)", st), ("HDF5 (chunked)", h5)):
            with open_bundle(path) as b:
                for name, x in ids.items():
                    raw = best_of(lambda x=x, b=b: b._rows("layers.0.table", x), repeat=3)
                    t = best_of(lambda x=x, b=b: b.lookup(0, x), repeat=3)
                    out.append(
                        row(f"{label}, {name}: gather fp16 rows", f"{nbytes / raw / 1e9:.2f} GB/s", t_copy / raw)
                    )
                    out.append(row(f"{label}, {name}: lookup() to fp32", f"{nbytes / t / 1e9:.2f} GB/s", t_copy / t))
    return out
