"""safetensors container: a strict, bounded reader and a streaming writer (no model knowledge here).

Layout (https://github.com/huggingface/safetensors): ``u64 little-endian N``, ``N`` bytes of JSON header
(space-padded so the data starts 8-byte aligned), then the tensors' bytes, contiguous, in header offset
order. tolcli's header holds ``__metadata__ = {"format": "pt", "tol.manifest": <canonical JSON>}``.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tolcli._lazy import lazy_import
from tolcli.bundle.entries import TensorEntry, data_order
from tolcli.bundle.manifest import canonical_json
from tolcli.bundle.spec import MAX_DIM, MAX_HEADER_BYTES, MAX_NDIM, MAX_TENSORS, ST_MANIFEST_KEY
from tolcli.dtypes import DTYPES
from tolcli.errors import InputError, VerifyError
from tolcli.jsonsafe import loads, regular_file, short

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # (h5_format.SIGNATURE; h5_format imports this module's registry peers)
registry = lazy_import("tolcli.bundle.container")  # the registry imports this module


def release_map(mapped: np.ndarray | None) -> None:
    """Hand every page of a read-only ``numpy.memmap`` of a file back to the kernel (``madvise(MADV_DONTNEED)``):
    the pages stay in the page cache and are faulted in again when read, but no longer count in this process's
    resident memory, so a pass over a large file in batches keeps VmHWM at one batch. A no-op where the platform or
    the array has no such mapping."""
    raw = getattr(mapped, "_mmap", None)  # numpy.memmap's mmap.mmap object
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if isinstance(raw, mmap.mmap) and advice is not None and not raw.closed:
        raw.madvise(advice)


def header_bytes(entries: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for e in data_order(entries):
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = canonical_json(header).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write(f: BinaryIO, entries: list[TensorEntry], manifest_json: str | None) -> None:
    """Write a complete safetensors file to ``f``; tensors stream block by block. With ``manifest_json``
    None the file is a plain safetensors file (a checkpoint), else a bundle."""
    metadata = {"format": "pt"} if manifest_json is None else {"format": "pt", ST_MANIFEST_KEY: manifest_json}
    f.write(header_bytes(entries, metadata))
    for e in data_order(entries):
        written = 0
        for block in e.blocks():
            buf = memoryview(np.ascontiguousarray(block, dtype=DTYPES[e.dtype].numpy)).cast("B")
            f.write(buf)
            written += buf.nbytes
        if written != e.nbytes:  # pragma: no cover - a bug in a block producer
            raise AssertionError(f"{e.name}: wrote {written} bytes, expected {e.nbytes}")


def not_safetensors_reason(start: bytes) -> str | None:
    """Say what a file that should be safetensors is instead, from its first bytes (None: no idea)."""
    if start.startswith(b"version https://git-lfs"):
        return "this is a Git LFS pointer, not the file itself (run `git lfs pull`)"
    if start.lstrip()[:1] == b"<":
        return "this looks like HTML (a download error page?), not a safetensors file"
    other = registry.sniff(start)
    if other is not None and other.name != SafetensorsReader.container:
        return f"this is an {other.label} file; name it {other.suffixes[0]}"
    if start.startswith(b"PK\x03\x04"):
        return "this is a zip archive (a torch .pt/.bin file?), not safetensors"
    return None


class SafetensorsReader:
    """Validates the header before touching data; tensors are read through a read-only memory map."""

    container = "safetensors"

    def __init__(self, path: Path, *, shard: bool = False):
        """``shard=True``: a shard of a sharded bundle, which holds tensors but no manifest."""
        self.path = path
        size = regular_file(path, what="safetensors file").st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"not a safetensors file ({size} bytes)", path=path)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n < 2:
                raise InputError(self._not_st(f, f"header length {n}"), path=path)
            if 8 + n > size:
                raise VerifyError(f"file is truncated: header needs {8 + n} bytes, file has {size}", path=path)
            raw = f.read(n)
        if raw[:1] != b"{":
            raise InputError(f"not a safetensors file (header does not start with '{{': {raw[:16]!r})", path=path)
        header = loads(raw, path=path, what="corrupted safetensors header", max_bytes=MAX_HEADER_BYTES)
        if not isinstance(header, dict):
            raise InputError("corrupted safetensors header (not an object)", path=path)
        meta = header.pop("__metadata__", None)
        if not shard and (not isinstance(meta, dict) or not isinstance(meta.get(ST_MANIFEST_KEY), str)):
            raise InputError(f"no {ST_MANIFEST_KEY!r} in the safetensors metadata: not a tolcli bundle", path=path)
        self.manifest_text: str = "" if shard else meta[ST_MANIFEST_KEY]  # type: ignore[index]
        if len(header) > MAX_TENSORS:
            raise InputError(f"header declares {len(header)} tensors (limit {MAX_TENSORS})", path=path)
        self.data_start = 8 + n
        self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        spans = []
        for name, info in header.items():
            dtype, shape, begin, end = self._entry(name, info)
            self.tensors[name] = (dtype, shape, begin, end)
            spans.append((begin, end, name))
        spans.sort()
        pos = 0
        for begin, end, name in spans:
            if begin != pos:
                raise InputError(
                    f"tensor {short(name)} starts at {begin}, expected {pos} (overlapping or non-contiguous offsets)",
                    path=path,
                )
            pos = end
        data_size = size - self.data_start
        if pos > data_size:
            raise VerifyError(f"file is truncated: tensors need {pos} data bytes, file has {data_size}", path=path)
        if pos < data_size:
            raise InputError(f"{data_size - pos} unexpected bytes after the last tensor", path=path)
        self._refuse_polyglot(size)
        self._mm: np.memmap | None = None

    def _refuse_polyglot(self, size: int) -> None:
        """HDF5 libraries look for their signature at byte 0, 512, 1024, 2048, ...: a safetensors file holding it at
        one of those offsets is also an HDF5 file, which another reader would read differently."""
        with open(self.path, "rb") as f:
            offset = 512
            while offset + len(HDF5_SIGNATURE) <= size:
                f.seek(offset)
                if f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                    raise InputError(
                        f"this safetensors file is also an HDF5 file (HDF5 signature at byte {offset}); "
                        "refusing an ambiguous file",
                        path=self.path,
                    )
                offset *= 2

    def _not_st(self, f: BinaryIO, what: str) -> str:
        f.seek(0)
        return not_safetensors_reason(f.read(64)) or f"not a safetensors file ({what})"

    def _entry(self, name: str, info: Any) -> tuple[str, tuple[int, ...], int, int]:
        ok = isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}
        if ok:
            dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
            ok = (
                isinstance(dtype, str)
                and isinstance(shape, list)
                and len(shape) <= MAX_NDIM
                and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM for s in shape)
                and isinstance(offs, list)
                and len(offs) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)
            )
        if not ok:
            raise InputError(f"corrupted header entry for tensor {short(name)}", path=self.path)
        if dtype not in DTYPES:
            raise InputError(
                f"tensor {short(name)} has dtype {short(dtype, 40)}, not one tolcli bundles use", path=self.path
            )
        n = DTYPES[dtype].itemsize * math.prod(shape)
        begin, end = offs
        if end - begin != n:
            raise InputError(
                f"tensor {short(name)}: offsets span {end - begin} bytes but {dtype}{shape} needs {n}", path=self.path
            )
        return dtype, tuple(shape), begin, end

    def stored(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {k: (v[0], v[1]) for k, v in self.tensors.items()}

    def array(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of a tensor, in its storage numpy dtype."""
        dtype, shape, begin, end = self.tensors[name]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self.data_start + begin : self.data_start + end]
        return raw.view(DTYPES[dtype].numpy).reshape(shape)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        return np.take(self.view(name), ids, axis=0)

    def view(self, name: str) -> np.ndarray:
        """A tensor as a plain read-only ndarray over the memory map (no copy; ``np.memmap``'s per-call
        overhead and subclass wrapping dropped): what the run-time lookup path gathers from."""
        return self.array(name).view(np.ndarray)

    def blocks(self, name: str, rows: int) -> Iterator[np.ndarray]:
        arr = self.array(name)
        if arr.ndim == 0 or arr.shape[0] == 0:
            yield np.asarray(arr)
            return
        for s in range(0, arr.shape[0], rows):
            yield np.asarray(arr[s : s + rows])

    def release(self) -> None:
        """Hand the memory-mapped pages read so far back to the kernel (:func:`release_map`)."""
        release_map(self._mm)

    def close(self) -> None:
        self._mm = None


class Safetensors:
    """The safetensors :class:`~tolcli.bundle.container.Container`."""

    name = SafetensorsReader.container
    label = "safetensors"
    suffixes = (".safetensors",)
    compressions = ()

    def sniff(self, head: bytes) -> bool:
        """No magic number: a plausible header length, then the header's ``{``."""
        return len(head) > 8 and 2 <= struct.unpack("<Q", head[:8])[0] <= MAX_HEADER_BYTES and head[8:9] == b"{"

    def open(self, path: Path, *, shard: bool = False) -> SafetensorsReader:
        return SafetensorsReader(path, shard=shard)

    def write(self, path: Path, entries: list[TensorEntry], manifest_json: str | None, compression: str | None) -> None:
        with open(path, "wb") as f:
            write(f, entries, manifest_json)
