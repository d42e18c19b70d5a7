"""The codec interface: how one layer's ToL table is stored, and how a user chooses a codec (a spec).

A codec turns a [rows, width] fp32 table into named tensors (its *roles*) and decodes any set of rows
back from them. Its parameters live in the manifest (``layers[i].params``) and in its tensors, never in
names. Row-wise codecs (``row_wise = True``) encode each row independently, so a table can be encoded
in row batches and streamed.

A :class:`CodecSpec` is a codec *choice*: a frozen dataclass of user options (``Int4(group=32)``),
validated when constructed, that builds the codec for a table of a given width. Each spec class names
the codec it builds (``codec = Int4Codec``), which registers it: ``Codec.registry`` maps a codec name to
its class, and the class to its spec (``Int4Codec.spec``). A :class:`RankedSpec` is a spec whose codecs
have a rank, which ``compress`` chooses per layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self

import torch
from torch import Tensor

from tolcli._lazy import lazy_import
from tolcli.bundle.spec import layer_tensor
from tolcli.dtypes import DTYPES
from tolcli.errors import InputError, TolcliError, UsageError

if TYPE_CHECKING:
    import numpy as np

spec_strings = lazy_import("tolcli.codecs.spec")  # it imports this module

# Rows decoded per step by ``decode_into``: one block of fp32 output (and its temporaries) stays in a core's L2
# cache, so a batch is read from memory once and written once, whatever its size.
DECODE_BLOCK_BYTES = 256 << 10


class TensorAccess(Protocol):
    """What a codec may read from a stored layer: some rows of a role's tensor, or all of it."""

    def rows(self, role: str, ids: Tensor) -> Tensor: ...

    def full(self, role: str) -> Tensor: ...


class RowSource(Protocol):
    """A [rows, width] fp32 table read in row batches, as many times as asked: what streaming encoders read."""

    rows: int
    width: int

    def batches(self) -> Iterator[tuple[int, Tensor]]:
        """``(first row, fp32 [n, width] rows)`` in row order, covering the table once."""
        ...


class TableRows:
    """A :class:`RowSource` over an in-memory table, in batches of ``batch`` rows."""

    def __init__(self, table: Tensor, batch: int = 8192):
        if batch < 1:
            raise UsageError(f"`batch_rows` must be >= 1, got {batch}")
        self.table, self.batch = table, batch
        self.rows, self.width = table.shape

    def batches(self) -> Iterator[tuple[int, Tensor]]:
        for s in range(0, self.rows, self.batch):
            yield s, self.table[s : s + self.batch].float()


@dataclass
class BatchEncoder:
    """A codec fitted to a table, ready to encode it in row batches: ``encode_rows(batch)`` gives the per-row
    roles of those rows (in the order ``encode`` gives them), ``fixed`` the roles computed once (an SVD's ``B``)."""

    encode_rows: Callable[[Tensor], dict[str, Tensor]]
    fixed: dict[str, Tensor] = field(default_factory=dict)


class Codec(ABC):
    """Encode a layer table; decode rows. Subclasses register themselves by ``name``."""

    name: ClassVar[str]
    row_wise: ClassVar[bool] = False
    registry: ClassVar[dict[str, type[Codec]]] = {}
    spec: ClassVar[type[CodecSpec] | None] = None  # set by the CodecSpec subclass that builds this codec

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

    def decode_into(self, access: TensorAccess, ids: Tensor, out: Tensor) -> None:
        """Rows ``ids`` decoded into ``out`` (fp32 [len(ids), width], contiguous), the same values as
        :meth:`decode_rows`: what run-time lookups call. This default copies ``decode_rows``; the built-in codecs
        decode in place, block by block (:func:`row_blocks`)."""
        out.copy_(self.decode_rows(access, ids))

    def decode_into_shared(self, access: TensorAccess, ids: Tensor, out: Tensor, cache: dict[str, Tensor]) -> None:
        """:meth:`decode_into` for a lookup of several layers at once: ``cache`` (one per lookup) holds what layers
        sharing tensors decode once (a cross-layer SVD's ``A`` rows, by :meth:`shared_key`). The same values."""
        self.decode_into(access, ids, out)

    def tensor_name(self, layer: int, role: str) -> str:
        """The bundle tensor that holds ``role`` of layer ``layer``: ``layers.{layer}.{role}``, or for a role that
        several layers share (:meth:`shared_key`), ``shared.{group}.{role}``."""
        return layer_tensor(layer, role)

    def nested(self) -> dict[str, Codec]:
        """The codecs this one holds, by the key of their ``{"codec", "params"}`` in :meth:`params` (an svd's ``a``,
        ``b``, ``residual``); empty for codecs that hold none."""
        return {}

    def shared_key(self) -> str | None:
        """For a codec whose layers share tensors: what every layer reading them must agree on (canonical JSON of
        the parameters that shape the shared tensors), checked when a bundle is read; None for codecs that share
        nothing."""
        return None

    def nibble_pairs(self) -> tuple[np.ndarray, bool] | None:
        """For 4-bit codecs that decode as ``level[q] * scale (+ offset)`` from ``codes`` U8 [R, C/2] (two codes a
        byte, the low nibble first), ``scales`` F16 [R, C/g] (and ``offsets`` F16 [R, C/g]): the byte -> level pair
        table (:func:`tolcli.codecs.quant.nibble_pair_table`) and whether offsets are stored. Lookups of a few ids
        then take the reader's fast path (:meth:`tolcli.bundle.reader.Bundle.lookup_layers`); None otherwise."""
        return None

    def code_roles(self) -> dict[str, int]:
        """Roles that hold integer codes, with each code's width in bits: bytes whose rows are little-endian bit
        streams of codes of that width (8: one code a byte). What ``tolcli inspect --entropy`` counts; empty for
        codecs that store no codes (dense casts)."""
        return {}

    def encoder(self, source: RowSource) -> BatchEncoder | None:
        """A batch encoder for ``source`` (reading it as often as fitting needs), or None when this codec can
        only encode a whole table. Row-wise codecs encode each batch as it is."""
        return BatchEncoder(self.encode) if self.row_wise else None

    def stored_bytes(self, rows: int, width: int) -> int:
        return specs_bytes(self.tensor_specs(rows, width))


def specs_bytes(specs: dict[str, tuple[tuple[int, ...], str]]) -> int:
    """The bytes of tensors of these ``(shape, dtype name)``."""
    total = 0
    for shape, dt in specs.values():
        n = DTYPES[dt].itemsize
        for s in shape:
            n *= s
        total += n
    return total


@dataclass(frozen=True)
class CodecSpec(ABC):
    """A codec and its options as a user chooses them (``Int4(group=32)``, ``int4(group=32)`` as a string).

    Subclasses are frozen dataclasses whose fields are the options (int, float, bool, str, optional ones,
    or a nested spec), validated in ``__post_init__`` (raising :class:`UsageError`); ``str(spec)`` is the
    spec string (:mod:`tolcli.codecs.spec`).
    """

    codec: ClassVar[type[Codec]]  # the codec this spec builds; setting it registers the spec

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "codec" in cls.__dict__:
            cls.codec.spec = cls

    @property
    def name(self) -> str:
        return self.codec.name

    @abstractmethod
    def build(self, width: int, *, weights: Tensor | None = None) -> Codec:
        """The codec for a [rows, width] table; ``weights`` (one per row) for codecs that fit the data."""

    @property
    def width_multiple(self) -> int:
        """Widths this spec's codecs can encode are multiples of this."""
        return 1

    def bytes_per_value(self) -> float:
        """Stored bytes per table value of a row-wise codec, on a table one ``width_multiple`` wide."""
        w = self.width_multiple
        return self.build(w).stored_bytes(1, w) / w

    def __str__(self) -> str:
        return spec_strings.format_spec(self)


@dataclass(frozen=True)
class RankedSpec(CodecSpec):
    """A spec whose codecs have a rank, chosen by ``compress``: the same for every layer (``rank``, or the
    rank whose bytes are ``ratio`` of dense fp16), or per layer under a byte ``budget`` (a fraction of
    dense fp16 such as ``0.25``, or bytes such as ``12MB``) or keeping a fraction ``energy`` of each layer's
    squared norm. Ranks are multiples of :meth:`rank_step`, within ``min_rank`` .. ``max_rank``."""

    rank: int | None = None
    ratio: float | None = None
    budget: str | None = None
    energy: float | None = None
    min_rank: int | None = None
    max_rank: int | None = None
    rank_multiple: int = 8

    def __post_init__(self) -> None:
        if self.budget is not None:
            object.__setattr__(self, "budget", str(self.budget))  # 0.25 -> "0.25", as a spec string gives it
        given = [k for k in ("rank", "ratio", "budget", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            got = " and ".join(given) or "none"
            raise UsageError(f"{self.name} needs exactly one of rank, ratio, budget and energy, got {got}")
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"{self.name} rank must be >= 1, got {self.rank}")
        if self.ratio is not None and not 0 < self.ratio <= 4:
            raise UsageError(f"{self.name} ratio must be in (0, 4], got {self.ratio}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise UsageError(f"{self.name} energy must be in (0, 1], got {self.energy}")
        if self.rank_multiple < 1:
            raise UsageError(f"{self.name} rank multiple must be >= 1, got {self.rank_multiple}")

    @property
    def adaptive(self) -> bool:
        """Whether ranks differ per layer (``budget`` or ``energy``)."""
        return self.budget is not None or self.energy is not None

    def with_rank(self, rank: int) -> Self:
        """This spec at one given rank (what ``build`` needs)."""
        return replace(self, rank=rank, ratio=None, budget=None, energy=None)

    def rank_step(self) -> int:
        """Ranks are multiples of this: ``rank_multiple``, and whatever the factor codecs need."""
        return self.rank_multiple

    @abstractmethod
    def spectrum(self, table: Tensor | RowSource, weights: Tensor | None) -> Tensor:
        """The squared error each unit of rank removes, in rank order (non-increasing), for adaptive ranks;
        ``table`` is a tensor or a :class:`RowSource` read in row batches."""


def codec_from_manifest(name: str, params: dict[str, Any]) -> Codec:
    cls = Codec.registry.get(name)
    if cls is None:
        raise InputError(
            f"unknown codec {name!r}; this tolcli knows {', '.join(sorted(Codec.registry))}", hint="upgrade tolcli"
        )
    try:
        return cls.from_params(params)
    except TolcliError as e:  # the reason first: the parameters may be long, and messages are cut
        raise InputError(f"codec {name!r} parameters are invalid: {e.message}; parameters {params!r}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(
            f"codec {name!r} parameters are invalid ({type(e).__name__}: {e}); parameters {params!r}"
        ) from None


def row_blocks(rows: int, width: int) -> Iterator[slice]:
    """Slices covering ``range(rows)`` in blocks of about :data:`DECODE_BLOCK_BYTES` of fp32 output."""
    step = max(1, DECODE_BLOCK_BYTES // (4 * max(1, width)))
    for s in range(0, rows, step):
        yield slice(s, min(s + step, rows))


FIT_CHUNK_VALUES = 1 << 18  # values a scale search fits at once: its temporaries stay in a core's L2 cache


def fit_chunks(rows: int, width: int) -> Iterator[slice]:
    """Slices covering ``range(rows)`` in blocks of about :data:`FIT_CHUNK_VALUES` values of a [rows, width] table.

    The clipping searches (:func:`tolcli.codecs.quant.fit_mse`, :func:`tolcli.codecs.mixed.fit_group_codes`) make
    dozens of passes over their input; on blocks that fit in L2 they run 4-5x faster at h = 2,048 than on a
    whole 4,096-row batch (``benchmarks/fit_chunks.py``), with identical results: every group is fitted alone.
    No rows give one empty slice, so a caller always has a block to take its result's shape from."""
    if rows == 0:
        yield slice(0, 0)
        return
    step = max(1, FIT_CHUNK_VALUES // max(1, width))
    for s in range(0, rows, step):
        yield slice(s, min(s + step, rows))


def fit_in_blocks(fit: Callable[..., tuple[Any, ...]], xg: Tensor, *aligned: Tensor | None) -> tuple[Any, ...]:
    """``fit(block of xg, matching blocks of aligned)`` over :func:`fit_chunks` of ``xg``'s rows, the results joined
    along the rows (a None result, or a None ``aligned``, stays None): what the scale searches run in."""
    width = xg[0].numel() if xg.shape[0] else 1
    parts = [fit(xg[c], *(None if a is None else a[c] for a in aligned)) for c in fit_chunks(xg.shape[0], width)]
    if len(parts) == 1:
        return parts[0]
    return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True))


def array_view(access: TensorAccess, role: str) -> np.ndarray | None:
    """A role's whole stored tensor as a read-only-by-contract numpy array without a copy (a bundle's memory map,
    an in-memory tensor), or None where the access has none: what compiled decoders read rows from."""
    get = getattr(access, "view", None)
    return None if get is None else get(role)


def full_f32(access: TensorAccess, role: str) -> Tensor:
    """A whole role's tensor as fp32: cached by accesses that have ``full_f32`` (a bundle's), converted otherwise."""
    cached = getattr(access, "full_f32", None)
    return cached(role) if cached is not None else access.full(role).float()


class PrefixedAccess:
    """A view of a TensorAccess in which ``role`` means ``prefix + role`` (a codec nested in another)."""

    def __init__(self, inner: TensorAccess, prefix: str):
        self.inner, self.prefix = inner, prefix
        # a bundle's views are its memory map's: codecs may cache what they derive from them (per access object)
        self.stable_views = bool(getattr(inner, "stable_views", False))

    def rows(self, role: str, ids: Tensor) -> Tensor:
        return self.inner.rows(self.prefix + role, ids)

    def view(self, role: str) -> np.ndarray | None:
        return array_view(self.inner, self.prefix + role)

    def full(self, role: str) -> Tensor:
        return self.inner.full(self.prefix + role)

    def full_f32(self, role: str) -> Tensor:
        return full_f32(self.inner, self.prefix + role)


class DictAccess:
    """TensorAccess over in-memory tensors (``encode`` output): for tests and error measurement."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.tensors = tensors

    def rows(self, role: str, ids: Tensor) -> Tensor:
        t = self.tensors[role]
        if ids.dim() == 1 and t.dim() >= 1 and str(ids.dtype) in ("torch.int64", "torch.int32"):
            return t.index_select(0, ids)  # a plain gather of rows: several times faster than indexing
        return t[ids]

    def full(self, role: str) -> Tensor:
        return self.tensors[role]

    def view(self, role: str) -> np.ndarray | None:
        """A role's whole tensor as a numpy array sharing its memory (None: not a CPU, contiguous numpy dtype)."""
        t = self.tensors.get(role)
        if t is None or t.device.type != "cpu" or not t.is_contiguous() or t.dtype == torch.bfloat16 or t.requires_grad:
            return None
        return t.numpy()
