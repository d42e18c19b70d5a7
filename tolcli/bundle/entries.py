"""A tensor on its way into a container: name, dtype, shape, and its bytes as row blocks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from tolcli.bundle.spec import parse_layer_tensor
from tolcli.dtypes import DTYPES


@dataclass(frozen=True)
class TensorEntry:
    """``blocks()`` yields numpy arrays (storage dtype) whose concatenation along axis 0 is the tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str
    blocks: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return DTYPES[self.dtype].itemsize * math.prod(self.shape)

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


def rows_per_block(row_bytes: int, target: int = 4 << 20) -> int:
    """Rows per I/O block of about ``target`` bytes."""
    return max(1, target // max(1, row_bytes))


def data_order(entries: list[TensorEntry]) -> list[TensorEntry]:
    """The order tensors are laid out in a file: wider element types first (so every tensor's offset is a
    multiple of its element size), then by layer index, then by name."""

    def key(e: TensorEntry) -> tuple[int, int, str]:
        parsed = parse_layer_tensor(e.name)
        return (-DTYPES[e.dtype].itemsize, parsed[0] if parsed else 1 << 40, e.name)

    return sorted(entries, key=key)
