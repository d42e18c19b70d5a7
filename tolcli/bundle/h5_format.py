"""HDF5 container: a streaming writer and a strict reader (no model knowledge here).

Tensor ``layers.3.table`` is dataset ``/layers/3/table``; ``tokenizer`` is ``/tokenizer``. Datasets are
row-chunked (about 256 KiB per chunk, so a row gather reads little more than it needs), stored in the
element type's little-endian numpy form (bf16 as ``uint16``), each with a ``tol.dtype`` attribute; the
manifest is the root attribute ``tol.manifest``. The writer never creates links, external storage or
virtual datasets, and the reader refuses them.

The reader walks the file once before anything is read: every object is visited once (by its identity, so a file
of hard links forming a DAG or a cycle is refused at the first object reached twice, instead of walking 2^40 paths),
at most :data:`~tolcli.bundle.spec.MAX_H5_OBJECTS` of them; a name holding a ``.`` (``/layers.0.table``, which would
shadow ``/layers/0/table``) is refused; and every dataset's declared size is bounded by what the file stores: a
contiguous dataset must store exactly its bytes, a chunked one every chunk (no sparse datasets), and compressed data
may not expand beyond :data:`~tolcli.bundle.spec.MAX_H5_EXPANSION` times its stored size (past a floor), so no read
runs for hours or allocates what the file does not hold.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from tolcli.bundle.entries import TensorEntry, data_order
from tolcli.bundle.spec import (
    H5_MANIFEST_ATTR,
    MAX_DIM,
    MAX_H5_CHUNK_BYTES,
    MAX_H5_EXPANSION,
    MAX_H5_OBJECTS,
    MAX_MANIFEST_BYTES,
    MAX_NDIM,
    MAX_TENSORS,
    MIN_H5_EXPANSION_BYTES,
)
from tolcli.bundle.st_format import release_map
from tolcli.dtypes import DTYPES
from tolcli.errors import InputError, TolcliError, VerifyError
from tolcli.jsonsafe import cut, regular_file, short

CHUNK_TARGET_BYTES = 256 << 10
CHUNK_CACHE_BYTES = 32 << 20
COMPRESSIONS = ("gzip", "lzf")
SIGNATURE = b"\x89HDF\r\n\x1a\n"
_NUMPY_TO_DTYPE = {"<f4": "F32", "<f2": "F16", "<u2": "BF16", "|u1": "U8", "|i1": "I8"}


def dataset_path(name: str) -> str:
    return "/" + name.replace(".", "/")


def chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...] | None:
    """Whole rows, about CHUNK_TARGET_BYTES per chunk (64 KiB - 1 MiB for any realistic width). 1-D
    tensors (the tokenizer) are always read whole: contiguous, so no partly empty edge chunk is stored."""
    if len(shape) < 2 or 0 in shape:
        return None
    row = itemsize * math.prod(shape[1:])
    rows = max(1, min(shape[0], CHUNK_TARGET_BYTES // max(1, row)))
    return (rows, *shape[1:])


def write(path: Path, entries: list[TensorEntry], manifest_json: str | None, compression: str | None = None) -> None:
    """Write an HDF5 bundle (or, with ``manifest_json`` None, a shard of a sharded bundle)."""
    if compression is not None and compression not in COMPRESSIONS:
        raise InputError(f"HDF5 compression must be one of {', '.join(COMPRESSIONS)}")
    with h5py.File(path, "w", libver="earliest", track_order=False) as f:
        if manifest_json is not None:
            f.attrs.create(H5_MANIFEST_ATTR, manifest_json, dtype=h5py.string_dtype("utf-8"))
        for e in data_order(entries):
            dt = DTYPES[e.dtype]
            chunks = chunk_shape(e.shape, dt.itemsize)
            ds = f.create_dataset(
                dataset_path(e.name),
                shape=e.shape,
                dtype=dt.numpy,
                chunks=chunks,
                compression=compression if chunks else None,
                track_times=False,
            )
            ds.attrs.create("tol.dtype", e.dtype, dtype=h5py.string_dtype("ascii"))
            pos = 0
            for block in e.blocks():
                if e.shape == ():
                    ds[()] = block
                    continue
                ds[pos : pos + block.shape[0]] = block
                pos += block.shape[0]


# What h5py raises on damaged files, besides crashing (it has not crashed on 1,200+ fuzzed files).
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, UnicodeDecodeError, AttributeError, IndexError)


@contextlib.contextmanager
def _guard(path: Path, what: str) -> Iterator[None]:
    """h5py failures on a damaged file become one VerifyError naming the file and the step."""
    try:
        yield
    except TolcliError:
        raise
    except H5_ERRORS as e:
        raise VerifyError(
            f"corrupted HDF5 file: cannot {what} ({type(e).__name__}: {cut(str(e), 200)})", path=path
        ) from None


class HDF5Reader:
    container = "hdf5"

    def __init__(self, path: Path, *, shard: bool = False):
        """``shard=True``: a shard of a sharded bundle, which holds tensors but no manifest."""
        self.path = path
        self.file_size = regular_file(path, what="HDF5 file").st_size
        self._mm: np.memmap | None = None  # the whole file, mapped on the first zero-copy view
        self._chunk_maps: dict[str, tuple[np.ndarray, np.ndarray, int, int] | None] = {}
        with open(path, "rb") as fh:
            sig = fh.read(8)
        if sig != SIGNATURE:
            raise InputError("not an HDF5 file (bad signature)", path=path)
        with _guard(path, "open it"):
            self.file = h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=10007, rdcc_w0=0.75)
        try:
            with _guard(path, "read the manifest attribute"):
                raw = self.file.attrs.get(H5_MANIFEST_ATTR)
                if raw is None and not shard:
                    raise InputError(f"no {H5_MANIFEST_ATTR!r} root attribute: not a tolcli bundle", path=path)
                text = "" if raw is None else raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            if len(text) > MAX_MANIFEST_BYTES:
                raise InputError("manifest attribute is too large", path=path)
            self.manifest_text = text
            self.datasets: dict[str, h5py.Dataset] = {}
            self._visited: dict[h5py.h5o.ObjectID, str] = {}
            self._inflated = 0  # declared bytes of compressed datasets, all together
            with _guard(path, "walk its groups"):
                self._visited[self.file["/"].id] = "/"
                self._walk(self.file["/"], "")
        except BaseException:
            self.close()
            raise

    def _walk(self, root: h5py.Group, prefix: str) -> None:
        """Visit every object once, iteratively (no recursion: depth is bounded by the object count)."""
        todo: list[tuple[h5py.Group, str]] = [(root, prefix)]
        while todo:
            group, prefix = todo.pop()
            if len(self._visited) + len(group) > MAX_H5_OBJECTS:
                raise InputError(f"more than {MAX_H5_OBJECTS:,} groups and datasets", path=self.path)
            for key in sorted(group.keys()):
                where = f"{group.name.rstrip('/')}/{key}"
                if not key or "." in key:
                    raise InputError(
                        f"{short(where)}: an HDF5 name holding '.' would alias a tensor name "
                        f"(tensor layers.0.table is /layers/0/table)",
                        path=self.path,
                    )
                link = group.get(key, getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    raise InputError(f"{where} is an external link; bundles must be self-contained", path=self.path)
                if isinstance(link, h5py.SoftLink):
                    raise InputError(f"{where} is a soft link; bundles hold no links", path=self.path)
                obj = group[key]
                if obj.id in self._visited:
                    raise InputError(
                        f"{where} is a second hard link to {self._visited[obj.id]}; bundles hold each object once",
                        path=self.path,
                    )
                self._visited[obj.id] = where
                name = f"{prefix}{key}"
                if isinstance(obj, h5py.Group):
                    todo.append((obj, name + "."))
                elif isinstance(obj, h5py.Dataset):
                    self._add_dataset(name, where, obj)
                else:
                    raise InputError(
                        f"{where} is a {type(obj).__name__}; bundles hold groups and datasets", path=self.path
                    )

    def _add_dataset(self, name: str, where: str, ds: h5py.Dataset) -> None:
        if ds.is_virtual:
            raise InputError(f"{where} is a virtual dataset; bundles must be self-contained", path=self.path)
        if ds.external:
            raise InputError(f"{where} uses external storage; bundles must be self-contained", path=self.path)
        if len(self.datasets) >= MAX_TENSORS or len(ds.shape) > MAX_NDIM or any(s > MAX_DIM for s in ds.shape):
            raise InputError(f"{where}: too many tensors or a dimension out of bounds", path=self.path)
        self._check_storage(where, ds)
        self.datasets[name] = ds

    def _check_storage(self, where: str, ds: h5py.Dataset) -> None:
        """The declared size against what the file stores, before anything is read (see the module docstring)."""
        declared = ds.dtype.itemsize * math.prod(ds.shape)
        stored = ds.id.get_storage_size()
        if stored > self.file_size:
            raise VerifyError(
                f"{where} claims {stored:,} stored bytes, more than the file's {self.file_size:,}", path=self.path
            )
        if ds.chunks is None:  # contiguous or compact: exactly the declared bytes, inside the file
            if stored != declared:
                raise VerifyError(
                    f"{where} declares {declared:,} bytes but stores {stored:,} (a sparse or damaged dataset)",
                    path=self.path,
                )
            return
        chunk_bytes = ds.dtype.itemsize * math.prod(ds.chunks)
        if chunk_bytes > MAX_H5_CHUNK_BYTES:
            raise InputError(
                f"{where} has chunks of {chunk_bytes:,} bytes (limit {MAX_H5_CHUNK_BYTES:,})", path=self.path
            )
        expected = math.prod(-(-s // c) for s, c in zip(ds.shape, ds.chunks, strict=True))
        if expected > self.file_size:  # every chunk takes at least a byte: refused before the chunk index is walked
            raise VerifyError(
                f"{where} declares {declared:,} bytes in {expected:,} chunks, more than the file's "
                f"{self.file_size:,} bytes can hold (a sparse dataset)",
                path=self.path,
            )
        held = ds.id.get_num_chunks() if expected else 0
        if held != expected:
            raise VerifyError(
                f"{where} declares {declared:,} bytes in {expected:,} chunks but stores {held:,} (a sparse dataset)",
                path=self.path,
            )
        if ds.id.get_create_plist().get_nfilters() == 0:
            if stored != expected * chunk_bytes:
                raise VerifyError(
                    f"{where}: {expected:,} uncompressed chunks need {expected * chunk_bytes:,} bytes, "
                    f"the file stores {stored:,}",
                    path=self.path,
                )
            return
        self._inflated += declared
        limit = max(MIN_H5_EXPANSION_BYTES, MAX_H5_EXPANSION * self.file_size)
        if declared > max(MIN_H5_EXPANSION_BYTES, MAX_H5_EXPANSION * stored) or self._inflated > limit:
            raise InputError(
                f"{where}: {stored:,} compressed bytes would expand to {declared:,} "
                f"(more than {MAX_H5_EXPANSION}x; refusing a decompression bomb)",
                path=self.path,
            )

    def stored(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        out = {}
        with _guard(self.path, "read dataset attributes"):
            for name, ds in self.datasets.items():
                declared = ds.attrs.get("tol.dtype")
                declared = declared.decode() if isinstance(declared, bytes) else declared
                by_numpy = _NUMPY_TO_DTYPE.get(ds.dtype.str, ds.dtype.str)
                dtype = declared if declared in DTYPES and DTYPES[declared].numpy == ds.dtype else by_numpy
                out[name] = (dtype, tuple(ds.shape))
        return out

    def array(self, name: str) -> np.ndarray:
        with _guard(self.path, f"read tensor {name!r}"):
            return self.datasets[name][()]

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows in any order, with repeats. Unfiltered chunked datasets are gathered from a memory map of the file
        through their chunks' offsets (:meth:`_chunk_map`); otherwise each chunk holding a requested row is read once
        through HDF5 (h5py's point selection is far slower), or the whole dataset when most chunks are needed."""
        ds = self.datasets[name]
        mapped = self._chunk_map(name)
        if mapped is not None and ids.size:
            if int(ids.min()) < 0 or int(ids.max()) >= ds.shape[0]:
                raise InputError(f"row ids outside [0, {ds.shape[0]}) of {dataset_path(name)}", path=self.path)
            windows, starts, per, step = mapped
            got = windows[starts[ids // per] + (ids % per) * step]
            return got.view(ds.dtype).reshape(len(ids), *ds.shape[1:])
        uniq, inverse = np.unique(ids, return_inverse=True)
        with _guard(self.path, f"read rows of {name!r}"):
            if not len(uniq):
                return ds[0:0]
            per = ds.chunks[0] if ds.chunks else ds.shape[0]
            chunk_of = uniq // per
            starts = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1]])
            if len(starts) * per >= ds.shape[0] // 2:
                got = ds[()][uniq]
            else:
                got = np.empty((len(uniq), *ds.shape[1:]), dtype=ds.dtype)
                bounds = [*starts.tolist(), len(uniq)]
                for a, b in itertools.pairwise(bounds):
                    c0 = int(chunk_of[a]) * per
                    block = ds[c0 : min(c0 + per, ds.shape[0])]
                    got[a:b] = block[uniq[a:b] - c0]
        return got[inverse]

    def view(self, name: str) -> np.ndarray | None:
        """A dataset as a zero-copy, read-only ndarray over a memory map of the file, where its bytes lie in the file
        as one run of little-endian rows: a contiguous dataset (``id.get_offset()``), or an unfiltered chunked one
        whose whole-row chunks lie in row order, back to back (tolcli's writer does so up to 64 chunks; HDF5 puts an
        index node after each 64). None otherwise (filtered, compact or scattered chunks, big-endian or unknown
        element types): :meth:`rows` reads those, through the chunks' offsets where unfiltered.

        The run must lie inside the file as it was validated; a file that shrank since is refused."""
        ds = self.datasets[name]
        if ds.ndim == 0 or ds.size == 0 or ds.dtype.str not in _NUMPY_TO_DTYPE:
            return None
        with _guard(self.path, f"locate tensor {name!r}"):
            start = _run_start(ds)
        if start is None:
            return None
        nbytes = ds.dtype.itemsize * math.prod(ds.shape)
        if not 0 <= start <= self.file_size - nbytes:
            raise VerifyError(
                f"{dataset_path(name)}: its {nbytes:,} bytes at offset {start:,} lie outside the file's "
                f"{self.file_size:,}",
                path=self.path,
            )
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[start : start + nbytes]
        if raw.size != nbytes:
            raise VerifyError(f"the file shrank below {start + nbytes:,} bytes while open", path=self.path)
        return raw.view(np.ndarray).view(ds.dtype).reshape(ds.shape)

    def _chunk_map(self, name: str) -> tuple[np.ndarray, np.ndarray, int, int] | None:
        """For an unfiltered dataset chunked by whole rows whose every chunk lies inside the file: ``(windows,
        starts, rows per chunk, step)``, where ``windows`` is a read-only [n, row bytes] view of the memory-mapped
        file whose window ``i`` starts at byte ``i * g`` (``g`` divides the row size and every chunk offset), so row
        ``t`` is window ``starts[t // per] + (t % per) * step``. None for other layouts (cached)."""
        if name not in self._chunk_maps:
            with _guard(self.path, f"locate the chunks of {name!r}"):
                self._chunk_maps[name] = self._make_chunk_map(self.datasets[name])
        return self._chunk_maps[name]

    def _make_chunk_map(self, ds: h5py.Dataset) -> tuple[np.ndarray, np.ndarray, int, int] | None:
        plist = ds.id.get_create_plist()
        if ds.chunks is None or plist.get_nfilters() or ds.ndim < 1 or ds.size == 0 or ds.chunks[1:] != ds.shape[1:]:
            return None
        if ds.dtype.str not in _NUMPY_TO_DTYPE:
            return None
        per, row = ds.chunks[0], ds.dtype.itemsize * math.prod(ds.shape[1:])
        chunk_bytes, n = per * row, -(-ds.shape[0] // per)
        found: dict[int, tuple[int, int, int]] = {}
        ds.id.chunk_iter(lambda c: found.__setitem__(c.chunk_offset[0], (c.byte_offset, c.size, c.filter_mask)))
        offsets = np.array([found.get(k * per, (-1, 0, 1))[0] for k in range(n)], dtype=np.int64)
        ok = len(found) == n and all(found.get(k * per, (-1, 0, 1))[1:] == (chunk_bytes, 0) for k in range(n))
        if not ok or offsets.min() < 0 or offsets.max() > self.file_size - chunk_bytes:
            raise VerifyError(
                f"{ds.name}: chunk offsets or sizes outside the file or the declared layout", path=self.path
            )
        g = math.gcd(row, *offsets.tolist())
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        mm = self._mm.view(np.ndarray)
        if mm.size != self.file_size:
            raise VerifyError("the file changed size while open", path=self.path)
        windows = np.lib.stride_tricks.as_strided(
            mm, shape=((self.file_size - row) // g + 1, row), strides=(g, 1), writeable=False
        )
        return windows, offsets // g, per, row // g

    def blocks(self, name: str, rows: int) -> Iterator[np.ndarray]:
        ds = self.datasets[name]
        with _guard(self.path, f"read tensor {name!r}"):
            if ds.ndim == 0 or ds.shape[0] == 0:
                yield ds[()]
                return
            for s in range(0, ds.shape[0], rows):
                yield ds[s : s + rows]

    def release(self) -> None:
        """Hand the memory-mapped pages read so far back to the kernel (:func:`.st_format.release_map`)."""
        release_map(self._mm)

    def close(self) -> None:
        self._mm = None
        self._chunk_maps.clear()
        with contextlib.suppress(Exception):  # closing a corrupted file may fail; nothing to keep
            self.file.close()


def _run_start(ds: h5py.Dataset) -> int | None:
    """The file offset at which ``ds``'s rows lie back to back (see :meth:`HDF5Reader.view`), or None."""
    plist = ds.id.get_create_plist()
    layout = plist.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        return ds.id.get_offset()  # None when unallocated
    if layout != h5py.h5d.CHUNKED or plist.get_nfilters() or ds.chunks[1:] != ds.shape[1:]:
        return None
    per, chunk_bytes = ds.chunks[0], ds.dtype.itemsize * math.prod(ds.chunks)
    found: dict[int, tuple[int, int, int]] = {}
    ds.id.chunk_iter(lambda c: found.__setitem__(c.chunk_offset[0], (c.byte_offset, c.size, c.filter_mask)))
    n = -(-ds.shape[0] // per)
    base = found.get(0, (0, 0, 0))[0]
    want = {k * per: (base + k * chunk_bytes, chunk_bytes, 0) for k in range(n)}
    return base if found == want else None


class HDF5:
    """The HDF5 :class:`~tolcli.bundle.container.Container`."""

    name = HDF5Reader.container
    label = "HDF5"
    suffixes = (".h5", ".hdf5")
    compressions = COMPRESSIONS

    def sniff(self, head: bytes) -> bool:
        return head.startswith(SIGNATURE)

    def open(self, path: Path, *, shard: bool = False) -> HDF5Reader:
        return HDF5Reader(path, shard=shard)

    def write(self, path: Path, entries: list[TensorEntry], manifest_json: str | None, compression: str | None) -> None:
        write(path, entries, manifest_json, compression)
