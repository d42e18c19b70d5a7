"""Row-wise quantisers: int4 (asymmetric or symmetric), nf4 and int8, group-wise along the hidden axis.

Pure function pairs (``quantize_*`` / ``dequantize_*``) do the math; one codec class per type stores
the results, and one spec per type chooses it (``int4(group=32,symmetric=true)``, ``nf4``, ``int8``).
Scales (and offsets) are fp16, rounded *outward* (offsets down, scales up) so that every
value lies inside its group's grid: the reconstruction error of int4/int8 is at most half a step.

Nibble order of packed 4-bit codes: byte ``k`` of a row holds element ``2k`` in bits 0-3 and element
``2k+1`` in bits 4-7.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from tolcli.codecs.base import Codec, CodecSpec, TensorAccess, row_blocks
from tolcli.errors import InputError, UsageError

GROUP_SIZES_4BIT = (32, 64, 128)

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=torch.float32,
)  # fmt: skip


# ---- fp16 rounding towards +-inf ------------------------------------------------------------------------
def f16_down(x: Tensor) -> Tensor:
    """The largest fp16 <= x (elementwise)."""
    y = x.to(torch.float16)
    return torch.where(y.float() > x, torch.nextafter(y, torch.full_like(y, float("-inf"))), y)


def f16_up(x: Tensor) -> Tensor:
    """The smallest fp16 >= x (elementwise)."""
    y = x.to(torch.float16)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _finite(t: Tensor, what: str) -> Tensor:
    if not torch.isfinite(t).all():
        raise InputError(
            f"{what} do not fit fp16 (values beyond 65504 or NaN in the table)",
            hint="quantise a bundle without NaN/Inf; use dense fp32/bf16 for such tables",
        )
    return t


# ---- nibble packing ----------------------------------------------------------------------------------------
def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes in 0..15, [..., 2n] -> packed bytes [..., n] (element 2k low nibble, 2k+1 high)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """packed bytes [..., n] -> uint8 codes [..., 2n]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def unpack_nibbles_into(packed: Tensor, out: Tensor) -> None:
    """packed bytes [R, n] -> the codes as fp32 values in ``out`` [R, 2n] (contiguous), without a uint8 copy."""
    pairs = out.view(*packed.shape, 2)
    pairs[..., 0].copy_(packed & 0x0F)
    pairs[..., 1].copy_(packed >> 4)


def _grouped(out: Tensor, group: int) -> Tensor:
    return out.view(out.shape[0], out.shape[1] // group, group)


def _decode_blocks(
    access: TensorAccess, ids: Tensor, out: Tensor, roles: tuple[str | None, ...], block_fn: Callable[..., None]
) -> None:
    """Gather each role's rows once, then decode them into ``out`` block by block (:func:`row_blocks`):
    ``block_fn(out_block, *role_blocks)``; a role absent from the codec (None in ``roles``) passes None."""
    got = [None if r is None else access.rows(r, ids) for r in roles]
    for b in row_blocks(ids.numel(), out.shape[1]):
        block_fn(out[b], *(None if t is None else t[b] for t in got))


# ---- int4 ------------------------------------------------------------------------------------------------
def quantize_int4(x: Tensor, group: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """x [R, C] fp32 -> (packed codes U8 [R, C/2], scales F16 [R, C/group], offsets F16 [R, C/group] | None)."""
    R, C = x.shape
    xg = x.float().reshape(R, C // group, group)
    if symmetric:
        scale = _finite(f16_up(xg.abs().amax(-1) / 7.0), "int4 scales")
        s = scale.float().unsqueeze(-1)
        q = torch.where(s > 0, torch.round(xg / s.clamp_min(1e-30)), 0.0).clamp(-8, 7) + 8
        offset = None
    else:
        offset = _finite(f16_down(xg.amin(-1)), "int4 offsets")
        o = offset.float().unsqueeze(-1)
        scale = _finite(f16_up((xg.amax(-1) - offset.float()) / 15.0), "int4 scales")
        s = scale.float().unsqueeze(-1)
        q = torch.where(s > 0, torch.round((xg - o) / s.clamp_min(1e-30)), 0.0).clamp(0, 15)
    codes = pack_nibbles(q.reshape(R, C).to(torch.uint8))
    return codes, scale, offset


def dequantize_int4_into(out: Tensor, codes: Tensor, scale: Tensor, offset: Tensor | None, group: int) -> None:
    """:func:`dequantize_int4` into ``out`` [R, C] fp32 (contiguous), operation for operation the same values."""
    unpack_nibbles_into(codes, out)
    og = _grouped(out, group)
    if offset is None:
        og.sub_(8.0).mul_(scale.float().unsqueeze(-1))
    else:
        og.mul_(scale.float().unsqueeze(-1)).add_(offset.float().unsqueeze(-1))


def dequantize_int4(codes: Tensor, scale: Tensor, offset: Tensor | None, group: int) -> Tensor:
    q = unpack_nibbles(codes).float()  # (R, C)
    R, C = q.shape
    qg = q.reshape(R, C // group, group)
    s = scale.float().unsqueeze(-1)
    x = (qg - 8.0) * s if offset is None else qg * s + offset.float().unsqueeze(-1)
    return x.reshape(R, C)


# ---- nf4 --------------------------------------------------------------------------------------------------
_NF4_MID = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


def quantize_nf4(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    R, C = x.shape
    xg = x.float().reshape(R, C // group, group)
    scale = _finite(f16_up(xg.abs().amax(-1)), "nf4 scales")
    s = scale.float().unsqueeze(-1)
    normed = torch.where(s > 0, xg / s.clamp_min(1e-30), 0.0)
    q = torch.bucketize(normed, _NF4_MID).to(torch.uint8)  # nearest level
    return pack_nibbles(q.reshape(R, C)), scale


def dequantize_nf4_into(out: Tensor, codes: Tensor, scale: Tensor, group: int) -> None:
    """:func:`dequantize_nf4` into ``out`` [R, C] fp32 (contiguous)."""
    torch.index_select(NF4_LEVELS, 0, unpack_nibbles(codes).reshape(-1).to(torch.int32), out=out.view(-1))
    _grouped(out, group).mul_(scale.float().unsqueeze(-1))


def dequantize_nf4(codes: Tensor, scale: Tensor, group: int) -> Tensor:
    q = unpack_nibbles(codes).long()
    R, C = q.shape
    return (NF4_LEVELS[q].reshape(R, C // group, group) * scale.float().unsqueeze(-1)).reshape(R, C)


# ---- int8 -------------------------------------------------------------------------------------------------
def quantize_int8(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    R, C = x.shape
    xg = x.float().reshape(R, C // group, group)
    scale = _finite(f16_up(xg.abs().amax(-1) / 127.0), "int8 scales")
    s = scale.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(xg / s.clamp_min(1e-30)), 0.0).clamp(-127, 127)
    return q.reshape(R, C).to(torch.int8), scale


def dequantize_int8_into(out: Tensor, codes: Tensor, scale: Tensor, group: int) -> None:
    """:func:`dequantize_int8` into ``out`` [R, C] fp32 (contiguous)."""
    out.copy_(codes)
    _grouped(out, group).mul_(scale.float().unsqueeze(-1))


def dequantize_int8(codes: Tensor, scale: Tensor, group: int) -> Tensor:
    R, C = codes.shape
    return (codes.float().reshape(R, C // group, group) * scale.float().unsqueeze(-1)).reshape(R, C)


# ---- codecs -----------------------------------------------------------------------------------------------
class _GroupCodec(Codec):
    row_wise = True
    allowed_groups: ClassVar[tuple[int, ...] | None] = GROUP_SIZES_4BIT

    def __init__(self, group_size: int):
        if self.allowed_groups is not None and group_size not in self.allowed_groups:
            raise UsageError(f"{self.name} group size must be one of {self.allowed_groups}, got {group_size}")
        if group_size < 1:
            raise UsageError(f"group size must be positive, got {group_size}")
        self.group_size = group_size

    def _check_width(self, width: int) -> None:
        if width % self.group_size:
            raise UsageError(
                f"{self.name}: width {width} is not a multiple of the group size {self.group_size}",
                hint="pick a group size that divides the hidden size (or the rank)",
            )

    def encode(self, table: Tensor) -> dict[str, Tensor]:
        self._check_width(table.shape[1])
        return self._encode(table)

    def _encode(self, table: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError


class Int4Codec(_GroupCodec):
    """4-bit codes per group of ``group_size`` values along a row; fp16 scale (+ offset when asymmetric).

    Roles: ``codes`` U8 [R, C/2], ``scales`` F16 [R, C/g], ``offsets`` F16 [R, C/g] (asymmetric only).
    Decode: asymmetric ``q * scale + offset``; symmetric ``(q - 8) * scale``.
    """

    name = "int4"

    def __init__(self, group_size: int = 64, symmetric: bool = False):
        super().__init__(group_size)
        self.symmetric = symmetric

    def params(self) -> dict[str, Any]:
        return {"bits": 4, "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Int4Codec:
        return cls(int(params["group_size"]), bool(params.get("symmetric", False)))

    def tensor_specs(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], str]]:
        self._check_width(width)
        specs = {"codes": ((rows, width // 2), "U8"), "scales": ((rows, width // self.group_size), "F16")}
        if not self.symmetric:
            specs["offsets"] = ((rows, width // self.group_size), "F16")
        return specs

    def _encode(self, table: Tensor) -> dict[str, Tensor]:
        codes, scales, offsets = quantize_int4(table, self.group_size, self.symmetric)
        out = {"codes": codes, "scales": scales}
        if offsets is not None:
            out["offsets"] = offsets
        return out

    def decode_rows(self, access: TensorAccess, ids: Tensor) -> Tensor:
        offsets = None if self.symmetric else access.rows("offsets", ids)
        return dequantize_int4(access.rows("codes", ids), access.rows("scales", ids), offsets, self.group_size)

    def decode_into(self, access: TensorAccess, ids: Tensor, out: Tensor) -> None:
        roles = ("codes", "scales", None if self.symmetric else "offsets")
        _decode_blocks(access, ids, out, roles, lambda o, c, s, z: dequantize_int4_into(o, c, s, z, self.group_size))


class NF4Codec(_GroupCodec):
    """4-bit NormalFloat: the nearest of 16 fixed levels times an fp16 absmax scale per group.

    Roles: ``codes`` U8 [R, C/2], ``scales`` F16 [R, C/g]. Decode: ``NF4_LEVELS[q] * scale``.
    """

    name = "nf4"

    def __init__(self, group_size: int = 64):
        super().__init__(group_size)

    def params(self) -> dict[str, Any]:
        return {"bits": 4, "group_size": self.group_size}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> NF4Codec:
        return cls(int(params["group_size"]))

    def tensor_specs(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], str]]:
        self._check_width(width)
        return {"codes": ((rows, width // 2), "U8"), "scales": ((rows, width // self.group_size), "F16")}

    def _encode(self, table: Tensor) -> dict[str, Tensor]:
        codes, scales = quantize_nf4(table, self.group_size)
        return {"codes": codes, "scales": scales}

    def decode_rows(self, access: TensorAccess, ids: Tensor) -> Tensor:
        return dequantize_nf4(access.rows("codes", ids), access.rows("scales", ids), self.group_size)

    def decode_into(self, access: TensorAccess, ids: Tensor, out: Tensor) -> None:
        _decode_blocks(
            access, ids, out, ("codes", "scales"), lambda o, c, s: dequantize_nf4_into(o, c, s, self.group_size)
        )


class Int8Codec(_GroupCodec):
    """Symmetric 8-bit codes with an fp16 scale per group (``group_size`` = the width: one per row).

    Roles: ``codes`` I8 [R, C], ``scales`` F16 [R, C/g]. Decode: ``q * scale``.
    """

    name = "int8"
    allowed_groups = None

    def __init__(self, group_size: int):
        super().__init__(group_size)

    def params(self) -> dict[str, Any]:
        return {"bits": 8, "group_size": self.group_size}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Int8Codec:
        return cls(int(params["group_size"]))

    def tensor_specs(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], str]]:
        self._check_width(width)
        return {"codes": ((rows, width), "I8"), "scales": ((rows, width // self.group_size), "F16")}

    def _encode(self, table: Tensor) -> dict[str, Tensor]:
        codes, scales = quantize_int8(table, self.group_size)
        return {"codes": codes, "scales": scales}

    def decode_rows(self, access: TensorAccess, ids: Tensor) -> Tensor:
        return dequantize_int8(access.rows("codes", ids), access.rows("scales", ids), self.group_size)

    def decode_into(self, access: TensorAccess, ids: Tensor, out: Tensor) -> None:
        _decode_blocks(
            access, ids, out, ("codes", "scales"), lambda o, c, s: dequantize_int8_into(o, c, s, self.group_size)
        )


# ---- specs ------------------------------------------------------------------------------------------------
class _GroupSpec(CodecSpec):
    """A spec with a ``group`` field (values per scale; ``None``: one group per row)."""

    group: int | None

    def __post_init__(self) -> None:
        if self.group is not None:
            self.build(self.group)  # the codec validates its group size

    @property
    def width_multiple(self) -> int:
        return self.group or 1


@dataclass(frozen=True)
class Int4(_GroupSpec):
    """``int4(group=64,symmetric=false)``: :class:`Int4Codec`; ``group`` is 32, 64 or 128.

    Example:
        >>> str(Int4(group=32, symmetric=True)), Int4().bytes_per_value()
        ('int4(group=32,symmetric=true)', 0.5625)
    """

    codec: ClassVar[type[Codec]] = Int4Codec
    group: int = 64
    symmetric: bool = False

    def build(self, width: int, *, weights: Tensor | None = None) -> Int4Codec:
        return Int4Codec(self.group, self.symmetric)


@dataclass(frozen=True)
class NF4(_GroupSpec):
    """``nf4(group=64)``: :class:`NF4Codec`; ``group`` is 32, 64 or 128."""

    codec: ClassVar[type[Codec]] = NF4Codec
    group: int = 64

    def build(self, width: int, *, weights: Tensor | None = None) -> NF4Codec:
        return NF4Codec(self.group)


@dataclass(frozen=True)
class Int8(_GroupSpec):
    """``int8(group=G)``: :class:`Int8Codec`; by default one group (one scale) per row."""

    codec: ClassVar[type[Codec]] = Int8Codec
    group: int | None = None

    def build(self, width: int, *, weights: Tensor | None = None) -> Int8Codec:
        return Int8Codec(self.group or width)
