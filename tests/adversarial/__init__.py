"""Builders of hostile inputs for ``tests/test_hostile_formats.py`` and ``tests/test_adversarial.py``.

- :func:`deadline`: a SIGALRM time limit, so that a hang is a test failure, not a stuck CI job;
- :func:`honest_bundle`: a small bundle of any codec mix, written through the real writer, with its tables;
- :func:`write_raw`: a bundle written straight through a container, *without* the writer's schema check, so that
  a manifest can lie with consistent hashes (every ``tensors.*.sha256`` recomputed from the bytes written);
- :func:`reference_lookup`: an independent reader that follows docs/bundle-format.md the way a C++ runtime would
  (tensors by their documented names, straight from the file with the stdlib JSON parser, numpy and h5py; every
  codec decoded from the spec's table), the oracle of "no wrong answer".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from tolcli.bundle import h5_format, st_format
from tolcli.bundle.entries import TensorEntry
from tolcli.bundle.manifest import canonical_json
from tolcli.bundle.sharded import INDEX_NAME
from tolcli.bundle.writer import WriteOptions, write_bundle
from tolcli.codecs import Codec
from tolcli.dtypes import DTYPES, tensor_to_numpy

# The 16 NF4 levels as docs/bundle-format.md lists them (typed from the doc, not imported).
NF4_DOC = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)  # fmt: skip

Arrays = dict[str, tuple[str, np.ndarray]]  # tensor name -> (dtype, storage array)


class Hang(Exception):
    """Raised by :func:`deadline` when the time is up."""


@contextlib.contextmanager
def deadline(seconds: float, what: str = "the call") -> Iterator[None]:
    """Fail (raise :class:`Hang`) when the block runs longer than ``seconds`` (SIGALRM; main thread only)."""

    def expired(signum: int, frame: Any) -> None:
        raise Hang(f"{what} ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    # Repeating: a Hang raised while a C extension calls back into Python can be swallowed there ("Exception
    # ignored"); the next tick raises it again, so the block cannot outlive the deadline by more than a tick or two.
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.25)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---- honest bundles --------------------------------------------------------------------------------------------
def manifest_for(V: int, h: int, layers: list[dict[str, Any]], *, tokenizer: bytes | None = None) -> dict[str, Any]:
    """A complete manifest (``tensors`` is filled in by the writers)."""
    return {
        "format": "tolcli.tol",
        "format_version": 1,
        "tolcli_version": "test",
        "source": {"checkpoint": "adversarial", "files": [], "config": {}},
        "model": {
            "type": "memoryllm",
            "vocab_size": V,
            "hidden_size": h,
            "num_layers": len(layers),
            "ffn_alpha": 1.0,
            "memory_norm_type": "layernorm",
        },
        "vocabulary": {
            "size": V,
            "embedded": tokenizer is not None,
            "tokenizer_sha256": None if tokenizer is None else hashlib.sha256(tokenizer).hexdigest(),
            "special_tokens": [],
        },
        "layers": layers,
        "tensors": {},
    }


def encode(
    codecs: list[Codec | None], V: int, h: int, *, seed: int = 0, scale: float = 1.0
) -> tuple[Arrays, list[dict[str, Any]], list[torch.Tensor | None]]:
    """Random tables encoded by ``codecs`` (None: a dropped layer): (arrays, layer entries, exact tables)."""
    g = torch.Generator().manual_seed(seed)
    arrays: Arrays = {}
    entries: list[dict[str, Any]] = []
    tables: list[torch.Tensor | None] = []
    for i, codec in enumerate(codecs):
        if codec is None:
            entries.append({"index": i, "status": "dropped"})
            tables.append(None)
            continue
        table = torch.randn(V, h, generator=g) * scale
        specs = codec.tensor_specs(V, h)
        tensors = codec.encode(table)
        names = {}
        for role, t in tensors.items():
            name = f"layers.{i}.{role}"
            arrays[name] = (specs[role][1], np.ascontiguousarray(tensor_to_numpy(t)))
            names[role] = name
        stored = codec.stored_bytes(V, h)
        entries.append(
            {
                "index": i,
                "status": "present",
                "codec": codec.name,
                "params": codec.params(),
                "tensors": names,
                "stored_bytes": stored,
                "bits_per_value": 8 * stored / (V * h),
                "rel_error": 0.0,
                "max_abs": float(table.abs().max()),
                "fp16_overflow": int((table.abs() > 65504).sum()),
            }
        )
        tables.append(table)
    return arrays, entries, tables


def tensor_entries(arrays: Arrays) -> list[TensorEntry]:
    out = []
    for name, (dtype, arr) in sorted(arrays.items()):
        arr = np.ascontiguousarray(arr, dtype=DTYPES[dtype].numpy)
        sha = hashlib.sha256(arr.tobytes()).hexdigest()
        out.append(TensorEntry(name, dtype, tuple(arr.shape), sha, lambda a=arr: iter([a])))
    return out


def tensors_section(arrays: Arrays) -> dict[str, Any]:
    return {
        e.name: {"dtype": e.dtype, "shape": list(e.shape), "bytes": e.nbytes, "sha256": e.sha256}
        for e in tensor_entries(arrays)
    }


def honest_bundle(
    path: Path,
    codecs: list[Codec | None],
    *,
    V: int = 37,
    h: int = 64,
    seed: int = 0,
    tokenizer: bytes | None = None,
    scale: float = 1.0,
    max_shard_size: int | None = None,
) -> tuple[Path, dict[str, Any], Arrays]:
    """A valid bundle through the real writer: (path, manifest as written, arrays)."""
    arrays, layers, _ = encode(codecs, V, h, seed=seed, scale=scale)
    if tokenizer is not None:
        arrays["tokenizer"] = ("U8", np.frombuffer(tokenizer, dtype=np.uint8).copy())
    manifest = manifest_for(V, h, layers, tokenizer=tokenizer)
    options = WriteOptions.make(
        path, container="hdf5" if path.suffix == ".h5" else None, max_shard_size=max_shard_size, force=True
    )
    write_bundle(path, tensor_entries(arrays), manifest, options)
    manifest["tensors"] = tensors_section(arrays)
    return path, manifest, arrays


def write_raw(path: Path, arrays: Arrays, manifest: dict[str, Any] | str, *, fill_tensors: bool = True) -> Path:
    """A single-file bundle straight through its container, no schema check: a manifest may lie, with every tensor
    hash consistent with the bytes written (``fill_tensors``: ``manifest["tensors"]`` recomputed from ``arrays``)."""
    if isinstance(manifest, dict):
        manifest = dict(manifest)
        if fill_tensors:
            manifest["tensors"] = tensors_section(arrays)
        text = canonical_json(manifest) if _json_safe(manifest) else json.dumps(manifest)
    else:
        text = manifest
    entries = tensor_entries(arrays)
    if path.suffix in (".h5", ".hdf5"):
        h5_format.write(path, entries, text)
    else:
        with open(path, "wb") as f:
            st_format.write(f, entries, text)
    return path


def _json_safe(doc: Any) -> bool:
    try:
        canonical_json(doc)
        return True
    except (ValueError, TypeError):
        return False


def safetensors_with_header(path: Path, header_text: str | bytes, data: bytes = b"") -> Path:
    """A safetensors file from a raw header (space-padded to 8 bytes) and data bytes."""
    raw = header_text.encode("utf-8") if isinstance(header_text, str) else header_text
    raw += b" " * (-(8 + len(raw)) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


# ---- the independent reference reader --------------------------------------------------------------------------
def _f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


class RawTensors:
    """Tensors of a bundle file (or sharded directory) by name, read without tolcli."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            index = json.loads((path / INDEX_NAME).read_text())
            self.manifest = index["manifest"]
            self.where = {name: path / shard for name, shard in index["weight_map"].items()}
        else:
            self.manifest = json.loads(self._manifest_text(path))
            self.where = dict.fromkeys(self.manifest["tensors"], path)

    @staticmethod
    def _manifest_text(path: Path) -> str:
        if path.read_bytes()[:8] == h5_format.SIGNATURE:
            with h5py.File(path, "r") as f:
                raw = f.attrs["tol.manifest"]
                return raw.decode() if isinstance(raw, bytes) else str(raw)
        return read_header(path)[1]["__metadata__"]["tol.manifest"]

    def get(self, name: str) -> np.ndarray:
        dtype = self.manifest["tensors"][name]["dtype"]
        f = self.where[name]
        if f.read_bytes()[:8] == h5_format.SIGNATURE:
            with h5py.File(f, "r") as h:
                return np.asarray(h["/" + name.replace(".", "/")][()])
        n, header = read_header(f)
        begin, end = header[name]["data_offsets"]
        raw = f.read_bytes()[8 + n + begin : 8 + n + end]
        return np.frombuffer(raw, dtype=DTYPES[dtype].numpy).reshape(header[name]["shape"])


def _nibbles(codes: np.ndarray) -> np.ndarray:
    return np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(codes.shape[0], -1)


def _decode(raw: RawTensors, codec: str, params: dict[str, Any], prefix: str, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of one codec's table, per the table in docs/bundle-format.md."""

    def t(role: str) -> np.ndarray:
        return raw.get(prefix + role)

    if codec == "dense":
        return _f32(t("table")[ids], params["dtype"])
    if codec in ("int4", "nf4", "int8"):
        g = params["group_size"]
        scales = t("scales")[ids].astype(np.float32)
        q = _nibbles(t("codes")[ids]).astype(np.float32) if codec != "int8" else t("codes")[ids].astype(np.float32)
        rows, width = q.shape
        qg = q.reshape(rows, width // g, g)
        s = scales[:, :, None]
        if codec == "nf4":
            x = NF4_DOC[qg.astype(np.int64)] * s
        elif codec == "int8":
            x = qg * s
        elif params["symmetric"] is True:
            x = (qg - 8.0) * s
        else:
            x = qg * s + t("offsets")[ids].astype(np.float32)[:, :, None]
        return x.reshape(rows, width)
    if codec == "svd":
        a = _decode(raw, params["a"]["codec"], params["a"]["params"], prefix + "A.", ids)
        b = _f32(t("B"), params["b_dtype"])
        return a @ b
    raise ValueError(f"the reference reader does not know codec {codec!r}")


def reference_lookup(path: Path, layer: int, ids: np.ndarray) -> np.ndarray:
    """Layer ``layer``'s decoded rows ``ids`` as a runtime following the spec reads them: tensors by their
    documented names ``layers.{i}.{role}``, never through the manifest's tensor map."""
    raw = RawTensors(path)
    e = raw.manifest["layers"][layer]
    return _decode(raw, e["codec"], e["params"], f"layers.{layer}.", ids)


def table_bytes(V: int, h: int, dtype: str) -> int:
    return V * h * DTYPES[dtype].itemsize


def prod(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
