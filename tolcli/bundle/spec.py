"""Bundle format v1: names, dtypes and limits. No I/O here (``docs/bundle-format.md`` is the prose).

A bundle holds, for each context-free layer ``i`` of a model, the tensors of that layer's codec, named
``layers.{i}.{role}`` (the dense codec's single role is ``table``: a [vocab, hidden] matrix), plus an
optional ``tokenizer`` (U8 bytes of ``tokenizer.json``) and a JSON manifest that describes everything.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

FORMAT_NAME = "tolcli.tol"
FORMAT_VERSION = 1

# safetensors: the manifest is one __metadata__ entry (canonical JSON); "format": "pt" as torch expects.
ST_MANIFEST_KEY = "tol.manifest"
ST_SUFFIXES = (".safetensors",)
# HDF5: the manifest is a root attribute; tensor ``layers.3.table`` is dataset ``/layers/3/table``.
H5_MANIFEST_ATTR = "tol.manifest"
H5_SUFFIXES = (".h5", ".hdf5")
CONTAINERS = ("safetensors", "hdf5")

TOKENIZER_TENSOR = "tokenizer"
LAYER_PREFIX = "layers."

# Bounds checked before anything is allocated from a file's header.
MAX_HEADER_BYTES = 100 << 20
MAX_TENSORS = 1 << 16
MAX_DIM = 1 << 31
MAX_MANIFEST_BYTES = 64 << 20


def layer_tensor(layer: int, role: str) -> str:
    return f"{LAYER_PREFIX}{layer}.{role}"


def parse_layer_tensor(name: str) -> tuple[int, str] | None:
    """``layers.12.table`` -> (12, "table"); None for other names."""
    if not name.startswith(LAYER_PREFIX):
        return None
    idx, _, role = name[len(LAYER_PREFIX) :].partition(".")
    if not idx.isdigit() or not role or (len(idx) > 1 and idx[0] == "0"):
        return None
    return int(idx), role


@dataclass(frozen=True)
class DType:
    """A stored element type. All multi-byte types are little-endian."""

    name: str  # safetensors spelling, also used in the manifest
    torch: torch.dtype
    numpy: np.dtype  # how the bytes are viewed in numpy / stored in HDF5 (bf16 as uint16)
    itemsize: int


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("F32", torch.float32, np.dtype("<f4"), 4),
        DType("F16", torch.float16, np.dtype("<f2"), 2),
        DType("BF16", torch.bfloat16, np.dtype("<u2"), 2),
        DType("U8", torch.uint8, np.dtype("u1"), 1),
        DType("I8", torch.int8, np.dtype("i1"), 1),
    )
}
TORCH_TO_DTYPE: dict[torch.dtype, DType] = {d.torch: d for d in DTYPES.values()}
# User-facing spellings of float storage types.
FLOAT_ALIASES: dict[str, str] = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("tolcli bundles are little-endian; this host is big-endian")


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """The exact stored bytes of a tensor (little-endian, C order)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def bytes_to_tensor(
    buf: bytes | bytearray | memoryview | np.ndarray, dtype: DType, shape: tuple[int, ...]
) -> torch.Tensor:
    arr = np.frombuffer(buf, dtype=dtype.numpy) if not isinstance(buf, np.ndarray) else buf.view(dtype.numpy)
    t = torch.from_numpy(arr.reshape(shape).copy())
    return t.view(torch.bfloat16) if dtype.name == "BF16" else t


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array of its storage dtype (bf16 viewed as uint16), without copying."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()
