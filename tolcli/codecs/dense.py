"""The dense codec: the table itself in fp32, fp16 or bf16 (spec ``dense(dtype=fp16)``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from tolcli.codecs.base import Codec, CodecSpec, TensorAccess
from tolcli.dtypes import DTYPES, FLOAT_ALIASES
from tolcli.errors import UsageError

_ALIAS = {v: k for k, v in FLOAT_ALIASES.items()}  # "F16" -> "fp16"


class DenseCodec(Codec):
    """The table itself, in fp32, fp16 or bf16: role ``table`` [rows, width]."""

    name = "dense"
    row_wise = True

    def __init__(self, dtype: str = "F32"):
        dtype = FLOAT_ALIASES.get(dtype, dtype)
        if dtype not in ("F32", "F16", "BF16"):
            raise UsageError(f"dense dtype must be fp32, fp16 or bf16, got {dtype!r}")
        self.dtype = dtype

    def params(self) -> dict[str, Any]:
        return {"dtype": self.dtype}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> DenseCodec:
        return cls(str(params.get("dtype")))

    def tensor_specs(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"table": ((rows, width), self.dtype)}

    def encode(self, table: Tensor) -> dict[str, Tensor]:
        return {"table": table.to(DTYPES[self.dtype].torch)}

    def decode_rows(self, access: TensorAccess, ids: Tensor) -> Tensor:
        return access.rows("table", ids).to(torch.float32)

    def decode_into(self, access: TensorAccess, ids: Tensor, out: Tensor) -> None:
        out.copy_(access.rows("table", ids))  # one gather, one widening copy into the caller's memory


@dataclass(frozen=True)
class Dense(CodecSpec):
    """``dense(dtype=fp32)``: the table cast to ``dtype`` (fp32, fp16 or bf16).

    Example:
        >>> Dense("F16"), str(Dense("fp16")), Dense().bytes_per_value()
        (Dense(dtype='fp16'), 'dense(dtype=fp16)', 4.0)
    """

    codec: ClassVar[type[Codec]] = DenseCodec
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _ALIAS.get(self.dtype, self.dtype))
        DenseCodec(self.dtype)  # validates

    def build(self, width: int, *, weights: Tensor | None = None) -> DenseCodec:
        return DenseCodec(self.dtype)
