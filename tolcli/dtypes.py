"""Stored element types: the one table every module agrees on (names as safetensors spells them).

No I/O, and no torch at import time (``tolcli schema`` and ``--version`` stay fast): a type's torch dtype is
looked up when first asked for.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """A stored element type. All multi-byte types are little-endian."""

    name: str  # safetensors spelling, also used in the manifest
    torch_name: str  # the attribute of the torch module
    numpy: np.dtype  # how the bytes are viewed in numpy / stored in HDF5 (bf16 as uint16)
    itemsize: int

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.torch_name)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("F32", "float32", np.dtype("<f4"), 4),
        DType("F16", "float16", np.dtype("<f2"), 2),
        DType("BF16", "bfloat16", np.dtype("<u2"), 2),
        DType("U8", "uint8", np.dtype("u1"), 1),
        DType("I8", "int8", np.dtype("i1"), 1),
    )
}
# User-facing spellings of float storage types.
FLOAT_ALIASES: dict[str, str] = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
# torch's names -> the spelling every command prints and takes (fp32, fp16, bf16): one vocabulary in output.
_USER_NAMES = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def user_dtype_name(dtype: object) -> str:
    """How output spells a dtype: ``torch.float16`` or ``"float16"`` -> ``"fp16"``; ``int64`` stays ``int64``.

    Example:
        >>> user_dtype_name("torch.bfloat16"), user_dtype_name("float32"), user_dtype_name("int64")
        ('bf16', 'fp32', 'int64')
    """
    name = str(dtype).removeprefix("torch.")
    return _USER_NAMES.get(name, name)


if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("tolcli bundles are little-endian; this host is big-endian")


def __getattr__(name: str) -> Any:
    if name == "TORCH_TO_DTYPE":  # {torch.dtype: DType}, built on first use (PEP 562)
        return {d.torch: d for d in DTYPES.values()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array of its storage dtype (bf16 viewed as uint16), without copying."""
    import torch

    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()
