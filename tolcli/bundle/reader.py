"""Read bundles: the single way anything in tolcli reads ToLs.

``open_bundle(path)`` validates the container header, the manifest (schema, then against the stored
tensors), and returns a :class:`Bundle` whose :meth:`Bundle.lookup` decodes rows on demand: through a
memory map for safetensors, through chunked reads for HDF5.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tolcli.bundle.container import ContainerReader, container_of
from tolcli.bundle.entries import TensorEntry, rows_per_block
from tolcli.bundle.manifest import check_against_tensors, parse_manifest
from tolcli.bundle.sharded import ShardedReader
from tolcli.bundle.spec import TOKENIZER_TENSOR
from tolcli.codecs import Codec, codec_from_manifest
from tolcli.dtypes import DTYPES
from tolcli.errors import InputError, VerifyError


@dataclass(frozen=True)
class LayerInfo:
    index: int
    codec: Codec
    tensors: dict[str, str]  # role -> tensor name
    entry: dict[str, Any]  # the manifest entry


class _Access:
    """TensorAccess for one layer: rows/full reads of its roles' tensors."""

    def __init__(self, bundle: Bundle, layer: LayerInfo):
        self.bundle, self.layer = bundle, layer

    def rows(self, role: str, ids: Tensor) -> Tensor:
        return self.bundle._rows(self.layer.tensors[role], ids)

    def full(self, role: str) -> Tensor:
        return self.bundle.tensor(self.layer.tensors[role])


def nonfinite_counts(arr: np.ndarray, dtype: str) -> tuple[int, int]:
    """``(NaN count, Inf count)`` of a block in its storage dtype (BF16 is stored as uint16 bit patterns:
    exponent bits all ones, with a zero mantissa for Inf); ``(0, 0)`` for integer dtypes."""
    if dtype in ("F32", "F16"):
        return int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
    if dtype == "BF16":
        special = (arr & 0x7F80) == 0x7F80
        mantissa = (arr & 0x007F) != 0
        return int((special & mantissa).sum()), int((special & ~mantissa).sum())
    return 0, 0


class Bundle:
    """An open, validated ToL bundle. Use :func:`open_bundle`."""

    def __init__(self, path: Path, reader: ContainerReader):
        self.path = path
        self._reader = reader
        self.container: str = reader.container
        self.manifest: dict[str, Any] = parse_manifest(reader.manifest_text, where=str(path))
        check_against_tensors(self.manifest, reader.stored(), where=str(path))
        self.vocab_size: int = self.manifest["model"]["vocab_size"]
        self.hidden_size: int = self.manifest["model"]["hidden_size"]
        self.num_layers: int = self.manifest["model"]["num_layers"]
        self.layers: dict[int, LayerInfo] = {
            e["index"]: LayerInfo(e["index"], codec_from_manifest(e["codec"], e["params"]), dict(e["tensors"]), e)
            for e in self.manifest["layers"]
            if e["status"] == "present"
        }
        self._full_cache: dict[str, Tensor] = {}

    # ---- reading -----------------------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return sorted(self.manifest["tensors"])

    def tensor(self, name: str) -> Tensor:
        """A whole stored tensor, as a torch tensor of its stored dtype (cached: codecs' small factors)."""
        if name not in self._full_cache:
            info = self.manifest["tensors"][name]
            arr = np.ascontiguousarray(self._reader.array(name))
            t = torch.from_numpy(arr.copy())
            self._full_cache[name] = t.view(torch.bfloat16) if info["dtype"] == "BF16" else t
        return self._full_cache[name]

    def _rows(self, name: str, ids: Tensor) -> Tensor:
        info = self.manifest["tensors"][name]
        arr = self._reader.rows(name, ids.cpu().numpy().astype(np.int64, copy=False))
        t = torch.from_numpy(np.ascontiguousarray(arr))
        return t.view(torch.bfloat16) if info["dtype"] == "BF16" else t

    def lookup(self, layer: int, token_ids: Tensor | list[int]) -> Tensor:
        """Decoded ToL rows of ``layer`` for ``token_ids`` (any shape): fp32, shape (*ids.shape, hidden)."""
        info = self.layers.get(layer)
        if info is None:
            status = "dropped" if 0 <= layer < self.num_layers else "out of range"
            raise InputError(f"layer {layer} is {status} in this bundle", path=self.path)
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.vocab_size):
            raise InputError(f"token id outside the vocabulary [0, {self.vocab_size})", path=self.path)
        rows = info.codec.decode_rows(_Access(self, info), flat)
        return rows.reshape(*ids.shape, self.hidden_size)

    def dense_layer(self, layer: int) -> Tensor:
        """A whole decoded layer table [vocab, hidden] in fp32."""
        return self.lookup(layer, torch.arange(self.vocab_size))

    def tokenizer_bytes(self) -> bytes | None:
        if TOKENIZER_TENSOR not in self.manifest["tensors"]:
            return None
        return bytes(np.asarray(self._reader.array(TOKENIZER_TENSOR)).tobytes())

    def tokenizer(self):
        """The embedded ``tokenizers.Tokenizer``, or None."""
        from tokenizers import Tokenizer

        raw = self.tokenizer_bytes()
        return None if raw is None else Tokenizer.from_str(raw.decode("utf-8"))

    def entry(self, name: str) -> TensorEntry:
        """A stored tensor as a :class:`TensorEntry` streaming its exact bytes (for convert, drop, ...)."""
        info = self.manifest["tensors"][name]
        shape = tuple(info["shape"])
        row = info["bytes"] // shape[0] if shape and shape[0] else info["bytes"]
        return TensorEntry(
            name, info["dtype"], shape, info["sha256"], lambda: self._reader.blocks(name, rows_per_block(row))
        )

    # ---- integrity ---------------------------------------------------------------------------------
    def verify(self, progress=None) -> int:
        """Recompute every tensor's sha256 and check its values (:meth:`check_values`) in one pass over the
        data; raise VerifyError naming the first bad tensor or layer. Returns the bytes read."""
        counts: dict[str, tuple[int, int]] = {}
        total = 0
        for name in self.tensor_names:
            digest, nbytes, counts[name] = self._scan(name, hashing=True, progress=progress)
            total += nbytes
            want = self.manifest["tensors"][name]["sha256"]
            if digest != want:
                raise VerifyError(
                    f"tensor {name!r}: sha256 {digest[:16]}... does not match the manifest ({want[:16]}...)",
                    path=self.path,
                )
        self._judge_values(counts)
        return total

    def check_values(self) -> dict[str, int]:
        """Count NaN and Inf in every float tensor. NaN never belongs in a bundle; Inf only where the layer
        records fp16 overflow. Raises VerifyError naming the layer and the counts; returns Inf counts."""
        return self._judge_values({n: self._scan(n, hashing=False)[2] for n in self.tensor_names})

    def _scan(self, name: str, *, hashing: bool, progress=None) -> tuple[str, int, tuple[int, int]]:
        """One read of a tensor: (sha256 or "", bytes, (NaN count, Inf count)); counts are 0 for integers."""
        dtype = self.manifest["tensors"][name]["dtype"]
        h = hashlib.sha256()
        nbytes = nan = inf = 0
        for block in self.entry(name).blocks():
            arr = np.ascontiguousarray(block, dtype=DTYPES[dtype].numpy)
            if hashing:
                h.update(memoryview(arr).cast("B"))
            n_nan, n_inf = nonfinite_counts(arr, dtype)
            nan += n_nan
            inf += n_inf
            nbytes += arr.nbytes
            if progress is not None:
                progress(arr.nbytes)
        return (h.hexdigest() if hashing else ""), nbytes, (nan, inf)

    def _judge_values(self, counts: dict[str, tuple[int, int]]) -> dict[str, int]:
        infs: dict[str, int] = {}
        for e in self.manifest["layers"]:
            if e["status"] != "present":
                continue
            nan = sum(counts[n][0] for n in e["tensors"].values())
            inf = sum(counts[n][1] for n in e["tensors"].values())
            if nan or inf > e.get("fp16_overflow", 0):
                raise VerifyError(
                    f"layer {e['index']}: {nan:,} NaN and {inf:,} Inf values in its tensors"
                    f" (the manifest accounts for {e.get('fp16_overflow', 0):,} fp16 overflows)",
                    path=self.path,
                )
            if inf:
                infs[f"layer {e['index']}"] = inf
        return infs

    def as_source(self):
        """A :class:`tolcli.model.ContextFreeSource` that reads this bundle (dropped layers give zero)."""
        return BundleSource(self)

    def close(self) -> None:
        self._full_cache.clear()
        self._reader.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BundleSource:
    """Feeds a model's context-free terms from a bundle's lookups."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle

    def __call__(self, layer: int, token_ids: Tensor, x0: Tensor) -> Tensor | None:
        if layer not in self.bundle.layers:
            return None
        return self.bundle.lookup(layer, token_ids.cpu()).to(device=x0.device, dtype=x0.dtype)


def open_bundle(path: str | Path, *, verify: bool = False) -> Bundle:
    """Open and validate a ToL bundle: a container file such as ``.safetensors`` or ``.h5``/``.hdf5`` (told apart
    by content, :func:`~tolcli.bundle.container.container_of`), or a sharded bundle directory (``tol.index.json`` +
    shards).

    ``verify=True`` also recomputes every tensor's sha256 before returning.

    Example:
        >>> import tempfile, pathlib
        >>> from tolcli import open_bundle, precompute, demo_checkpoint_path
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "demo.safetensors"
        >>> _ = precompute(demo_checkpoint_path(), out, dtype="fp16")
        >>> b = open_bundle(out)
        >>> b.lookup(0, [1, 2, 3]).shape
        torch.Size([3, 128])
    """
    path = Path(path)
    if not path.exists():
        raise InputError("bundle not found", path=path)
    reader: ContainerReader = ShardedReader(path) if path.is_dir() else container_of(path).open(path)
    try:
        bundle = Bundle(path, reader)
        if verify:
            bundle.verify()
    except BaseException:
        reader.close()
        raise
    return bundle
