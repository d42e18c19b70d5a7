"""The dense codec: the table itself in fp32, fp16 or bf16."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tolcli.codecs.base import Codec, TensorAccess
from tolcli.dtypes import DTYPES, FLOAT_ALIASES
from tolcli.errors import UsageError


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
