"""The codec interface: how one layer's ToL table is stored.

A codec turns a [rows, width] fp32 table into named tensors (its *roles*) and decodes any set of rows
back from them. Its parameters live in the manifest (``layers[i].params``) and in its tensors, never in
names. Row-wise codecs (``row_wise = True``) encode each row independently, so a table can be encoded
in row batches and streamed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

from torch import Tensor

from tolcli.dtypes import DTYPES
from tolcli.errors import InputError, TolcliError


class TensorAccess(Protocol):
    """What a codec may read from a stored layer: some rows of a role's tensor, or all of it."""

    def rows(self, role: str, ids: Tensor) -> Tensor: ...

    def full(self, role: str) -> Tensor: ...


class Codec(ABC):
    """Encode a layer table; decode rows. Subclasses register themselves by ``name``."""

    name: ClassVar[str]
    row_wise: ClassVar[bool] = False
    registry: ClassVar[dict[str, type[Codec]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__:
            Codec.registry[cls.name] = cls

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Parameters recorded in the manifest; ``from_params(params())`` rebuilds the codec."""

    @classmethod
    @abstractmethod
    def from_params(cls, params: dict[str, Any]) -> Codec: ...

    @abstractmethod
    def tensor_specs(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """role -> (shape, dtype name) of every tensor this codec stores for a [rows, width] table."""

    @abstractmethod
    def encode(self, table: Tensor) -> dict[str, Tensor]:
        """role -> tensor, for a [rows, width] fp32 table (or a row batch, for row-wise codecs)."""

    @abstractmethod
    def decode_rows(self, access: TensorAccess, ids: Tensor) -> Tensor:
        """Rows ``ids`` of the table, as fp32 [len(ids), width]."""

    def stored_bytes(self, rows: int, width: int) -> int:
        total = 0
        for shape, dt in self.tensor_specs(rows, width).values():
            n = DTYPES[dt].itemsize
            for s in shape:
                n *= s
            total += n
        return total


def codec_from_manifest(name: str, params: dict[str, Any]) -> Codec:
    cls = Codec.registry.get(name)
    if cls is None:
        raise InputError(
            f"unknown codec {name!r}; this tolcli knows {', '.join(sorted(Codec.registry))}", hint="upgrade tolcli"
        )
    try:
        return cls.from_params(params)
    except TolcliError as e:
        raise InputError(f"codec {name!r} parameters {params!r} are invalid: {e.message}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"codec {name!r} parameters {params!r} are invalid ({type(e).__name__}: {e})") from None


class PrefixedAccess:
    """A view of a TensorAccess in which ``role`` means ``prefix + role`` (a codec nested in another)."""

    def __init__(self, inner: TensorAccess, prefix: str):
        self.inner, self.prefix = inner, prefix

    def rows(self, role: str, ids: Tensor) -> Tensor:
        return self.inner.rows(self.prefix + role, ids)

    def full(self, role: str) -> Tensor:
        return self.inner.full(self.prefix + role)


class DictAccess:
    """TensorAccess over in-memory tensors (``encode`` output): for tests and error measurement."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.tensors = tensors

    def rows(self, role: str, ids: Tensor) -> Tensor:
        return self.tensors[role][ids]

    def full(self, role: str) -> Tensor:
        return self.tensors[role]
