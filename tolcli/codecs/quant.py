"""Row-wise quantisers: int4 (asymmetric or symmetric), nf4, int8, int3 and int2, group-wise along the hidden axis.

Pure function pairs (``quantize_*`` / ``dequantize_*``) do the math; one codec class per type stores
the results, and one spec per type chooses it (``int4(group=32,symmetric=true)``, ``nf4``, ``int8``).
Two ways to fit a group's scale (and offset), chosen by ``fit``; the decode formula is the same:

- ``minmax``: the group's range, fp16 rounded *outward* (offsets down, scales up) so that every value lies
  inside its group's grid: the asymmetric int4 / int8 error is at most half a step (symmetric int4 follows
  llama.cpp's Q4_0 rule: the value of largest magnitude gets level -8, its opposite may clip by one step);
- ``mse``: a clipping search plus least-squares scale/offset per group (:func:`fit_mse`), never worse.

Packed codes: each row is a little-endian bit stream (:func:`pack_bits`); for 4 bits, byte ``k`` of a row
holds element ``2k`` in bits 0-3 and element ``2k+1`` in bits 4-7.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from tolcli.choices import FITS
from tolcli.codecs.base import (
    BatchEncoder,
    Codec,
    CodecSpec,
    RowSource,
    TableRows,
    TensorAccess,
    fit_in_blocks,
    full_f32,
    row_blocks,
)
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


def _decode_whole(
    access: TensorAccess, ids: Tensor, out: Tensor, roles: tuple[str | None, ...], fn: Callable[..., None]
) -> None:
    """Gather each role's rows once and decode them in one call, ``fn(out, *role_rows)`` (None for an absent
    role), for decoders that block their own work (:func:`decode_pairs_into`)."""
    fn(out, *(None if r is None else access.rows(r, ids) for r in roles))


# ---- int4 ------------------------------------------------------------------------------------------------
def quantize_int4(x: Tensor, group: int, symmetric: bool, fit: str = "minmax") -> tuple[Tensor, Tensor, Tensor | None]:
    """x [R, C] fp32 -> (packed codes U8 [R, C/2], scales F16 [R, C/group], offsets F16 [R, C/group] | None).

    Min-max rule: asymmetric offset = group min (rounded down), scale = (max - offset) / 15 (rounded up);
    symmetric: llama.cpp's Q4_0 rule, scale = (the group's value of largest magnitude, with its sign) / -8
    (its magnitude rounded up), so that value gets code 0 (level -8) and all 16 levels are used.
    ``fit="mse"``: :func:`fit_mse` from there."""
    R, C = x.shape
    xg = x.float().reshape(R, C // group, group)
    if symmetric:
        scale, offset = _q4_0_scale(xg), None
        s = scale.float().unsqueeze(-1)
        q = torch.where(s != 0, torch.round(xg / torch.where(s != 0, s, 1.0)), 0.0).clamp(-8, 7) + 8
    else:
        offset = _finite(f16_down(xg.amin(-1)), "int4 offsets")
        o = offset.float().unsqueeze(-1)
        scale = _finite(f16_up((xg.amax(-1) - offset.float()) / 15.0), "int4 scales")
        s = scale.float().unsqueeze(-1)
        q = torch.where(s > 0, torch.round((xg - o) / s.clamp_min(1e-30)), 0.0).clamp(0, 15)
    if fit != "minmax":
        q, scale, offset = fit_mse(xg, INT4_SYM_LEVELS if symmetric else uniform_levels(4), scale, offset, "int4")
    codes = pack_nibbles(q.reshape(R, C).to(torch.uint8))
    return codes, scale, offset


def _q4_0_scale(xg: Tensor) -> Tensor:
    """llama.cpp Q4_0's scale per group of ``xg`` [R, G, g]: (the value of largest magnitude) / -8, as fp16 with
    its magnitude rounded up (so no value needs a level beyond -8 .. 8)."""
    m = xg.gather(-1, xg.abs().argmax(-1, keepdim=True)).squeeze(-1)
    return _finite(torch.where(m > 0, -f16_up(m / 8.0), f16_up(-m / 8.0)), "int4 scales")


def nibble_pair_table(levels: Tensor) -> np.ndarray:
    """Byte ``b`` -> ``(levels[b & 15], levels[b >> 4])`` (element 2k from the low nibble), the two float32 values
    viewed as one uint64: [256]. One gather through it unpacks and maps a block of packed 4-bit codes."""
    lv, b = levels.to(torch.float32).numpy(), np.arange(256)
    return np.ascontiguousarray(np.stack([lv[b & 15], lv[b >> 4]], axis=1), dtype=np.float32).view(np.uint64)[:, 0]


def decode_pairs_into(
    out: Tensor, codes: Tensor, pairs: np.ndarray, scale: Tensor, offset: Tensor | None, group: int
) -> bool:
    """``out`` [R, C] = ``pairs[codes]`` * scale (+ offset) per group, computed in numpy block by block
    (:func:`row_blocks`, so each block stays in cache): one gather, one multiply, one add; the scales are widened
    once per call. The same values as the torch formulas (one rounding per operation). False, doing nothing, unless
    ``out`` is a contiguous CPU fp32 tensor (callers then use the torch path)."""
    if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous() or out.requires_grad:
        return False
    o, c = out.numpy(), np.ascontiguousarray(codes.numpy())
    s = scale.float().numpy()
    z = None if offset is None else offset.float().numpy()
    for b in row_blocks(out.shape[0], out.shape[1]):
        block = o[b]
        np.take(pairs, c[b], out=block.view(np.uint64), mode="clip")  # uint8 indices: always inside the 256
        grouped = block.reshape(block.shape[0], -1, group)
        np.multiply(grouped, s[b, :, None], out=grouped)
        if z is not None:
            np.add(grouped, z[b, :, None], out=grouped)
    return True


def dequantize_int4_into(out: Tensor, codes: Tensor, scale: Tensor, offset: Tensor | None, group: int) -> None:
    """:func:`dequantize_int4` into ``out`` [R, C] fp32 (contiguous), operation for operation the same values:
    through :data:`INT4_PAIRS` / :data:`INT4_SYM_PAIRS` (:func:`decode_pairs_into`) on the CPU, else in torch."""
    if decode_pairs_into(out, codes, INT4_PAIRS if offset is not None else INT4_SYM_PAIRS, scale, offset, group):
        return
    unpack_nibbles_into(codes, out)
    og = _grouped(out, group)
    if offset is None:
        og.sub_(8.0).mul_(scale.float().unsqueeze(-1))
    else:
        og.mul_(scale.float().unsqueeze(-1)).add_(offset.float().unsqueeze(-1))


# Byte -> decoded nibble pairs: int4 codes as they are, symmetric int4 centred (q - 8, exact in fp32).
INT4_PAIRS = nibble_pair_table(torch.arange(16.0))
INT4_SYM_PAIRS = nibble_pair_table(torch.arange(16.0) - 8.0)


def dequantize_int4(codes: Tensor, scale: Tensor, offset: Tensor | None, group: int) -> Tensor:
    q = unpack_nibbles(codes).float()  # (R, C)
    R, C = q.shape
    qg = q.reshape(R, C // group, group)
    s = scale.float().unsqueeze(-1)
    x = (qg - 8.0) * s if offset is None else qg * s + offset.float().unsqueeze(-1)
    return x.reshape(R, C)


# ---- nf4 --------------------------------------------------------------------------------------------------
_NF4_MID = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


def quantize_nf4(x: Tensor, group: int, fit: str = "minmax") -> tuple[Tensor, Tensor]:
    R, C = x.shape
    xg = x.float().reshape(R, C // group, group)
    scale = _finite(f16_up(xg.abs().amax(-1)), "nf4 scales")
    s = scale.float().unsqueeze(-1)
    normed = torch.where(s > 0, xg / s.clamp_min(1e-30), 0.0)
    q = torch.bucketize(normed, _NF4_MID).to(torch.uint8)  # nearest level
    if fit != "minmax":
        q, scale, _ = fit_mse(xg, NF4_LEVELS, scale, None, "nf4")
    return pack_nibbles(q.reshape(R, C).to(torch.uint8)), scale


def dequantize_nf4_into(out: Tensor, codes: Tensor, scale: Tensor, group: int) -> None:
    """:func:`dequantize_nf4` into ``out`` [R, C] fp32 (contiguous): through :data:`NF4_PAIRS` on the CPU."""
    if decode_pairs_into(out, codes, NF4_PAIRS, scale, None, group):
        return
    torch.index_select(NF4_LEVELS, 0, unpack_nibbles(codes).reshape(-1).to(torch.int32), out=out.view(-1))
    _grouped(out, group).mul_(scale.float().unsqueeze(-1))


NF4_PAIRS = nibble_pair_table(NF4_LEVELS)


def dequantize_nf4(codes: Tensor, scale: Tensor, group: int) -> Tensor:
    q = unpack_nibbles(codes).long()
    R, C = q.shape
    return (NF4_LEVELS[q].reshape(R, C // group, group) * scale.float().unsqueeze(-1)).reshape(R, C)


# ---- int8 -------------------------------------------------------------------------------------------------
def quantize_int8(x: Tensor, group: int, fit: str = "minmax") -> tuple[Tensor, Tensor]:
    R, C = x.shape
    xg = x.float().reshape(R, C // group, group)
    scale = _finite(f16_up(xg.abs().amax(-1) / 127.0), "int8 scales")
    s = scale.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(xg / s.clamp_min(1e-30)), 0.0).clamp(-127, 127)
    if fit != "minmax":
        idx, scale, _ = fit_mse(xg, INT8_LEVELS, scale, None, "int8")
        q = idx.float() - 127.0
    return q.reshape(R, C).to(torch.int8), scale


def dequantize_int8_into(out: Tensor, codes: Tensor, scale: Tensor, group: int) -> None:
    """:func:`dequantize_int8` into ``out`` [R, C] fp32 (contiguous)."""
    out.copy_(codes)
    _grouped(out, group).mul_(scale.float().unsqueeze(-1))


def dequantize_int8(codes: Tensor, scale: Tensor, group: int) -> Tensor:
    R, C = codes.shape
    return (codes.float().reshape(R, C // group, group) * scale.float().unsqueeze(-1)).reshape(R, C)


# ---- scale fitting: clipping search + least squares ---------------------------------------------------------
DEFAULT_FIT = FITS[0]  # what specs (and so `compress`) use; a codec read from a manifest without `fit`: min-max
# Clipping ratios tried by ``fit="mse"``: each shrinks the min-max grid about its centre before least squares.
CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(15))  # 1.0, 0.95, ..., 0.3
LS_ROUNDS = 2  # alternations of (nearest codes, least-squares scale/offset) per clipping ratio
INT4_SYM_LEVELS = torch.arange(-8.0, 8.0)
INT8_LEVELS = torch.arange(-127.0, 128.0)


def uniform_levels(bits: int) -> Tensor:
    """The levels ``0 .. 2**bits - 1`` of an asymmetric code (decoded as ``q * scale + offset``)."""
    return torch.arange(0.0, float(1 << bits))


def check_fit(fit: str) -> None:
    if fit not in FITS:
        raise UsageError(f"`fit` must be one of {', '.join(FITS)}, got {fit!r}")


def _uniform_low(levels: Tensor) -> float | None:
    """The lowest level when ``levels`` are consecutive integers (every uniform code), else None (NF4)."""
    n = levels.numel()
    if n > 1 and bool((levels[1:] - levels[:-1] == 1).all()):
        return float(levels[0])
    return None


def _nearest_uniform(y: Tensor, lo: float, n: int) -> Tensor:
    """Index (as fp32) of the level ``lo + i`` nearest each value of ``y``, a tie going to the lower level: a
    rounding within one of the answer (the subtraction may round), then one exact correction each way against the
    midpoints ``lo + i +- 0.5``, which are exact in fp32. The same indices as ``torch.bucketize`` on the midpoints
    at a fraction of its cost (the clipping search calls this 45 times per batch); no integer tensors, no gathers."""
    idx = torch.ceil(y - (lo + 0.5)).clamp_(0, n - 1)
    idx = torch.where((idx > 0) & (y <= idx + (lo - 0.5)), idx - 1, idx)
    return torch.where((idx < n - 1) & (y > idx + (lo + 0.5)), idx + 1, idx)


def _nearest(y: Tensor, levels: Tensor) -> Tensor:
    """The index of the level nearest each value of ``y`` (levels ascending; a tie goes to the lower level)."""
    lo = _uniform_low(levels)
    if lo is not None:
        return _nearest_uniform(y, lo, levels.numel()).long()
    return torch.bucketize(y, (levels[1:] + levels[:-1]) / 2)


def _scaled(xg: Tensor, s: Tensor, o: Tensor | None) -> Tensor:
    """``(xg - o) / s`` per group, 0 where ``s`` is 0."""
    zero = s == 0
    if not bool(zero.any()):  # the usual case: no select over the whole block
        return xg / s if o is None else (xg - o).div_(s)
    y = xg if o is None else xg - o
    return torch.where(zero, 0.0, y / torch.where(zero, 1.0, s))


def _codes_for(xg: Tensor, levels: Tensor, s: Tensor, o: Tensor | None) -> Tensor:
    """Nearest-level indices of ``xg`` [R, G, g] under per-group scale ``s`` and offset ``o`` ([R, G, 1], fp32)."""
    return _nearest(_scaled(xg, s, o), levels)


def _values_for(xg: Tensor, levels: Tensor, s: Tensor, o: Tensor | None) -> Tensor:
    """``levels[_codes_for(...)]``, the nearest level values themselves (fp32): for uniform levels ``lo + index``,
    with no integer index tensor and no gather."""
    lo = _uniform_low(levels)
    if lo is None:
        return levels[_codes_for(xg, levels, s, o)]
    return _nearest_uniform(_scaled(xg, s, o), lo, levels.numel()).add_(lo)


def _least_squares(
    xg: Tensor, v: Tensor, s: Tensor, o: Tensor | None, mx: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The scale (and offset) minimising ``sum (x - v * s - o)^2`` per group for fixed levels ``v`` (``mx``: the
    groups' means of ``xg``, needed with an offset); a group whose levels do not determine them keeps ``s`` (and
    gets the best offset for it)."""
    if o is None:
        den = (v * v).sum(-1, keepdim=True)
        return torch.where(den > 0, (xg * v).sum(-1, keepdim=True) / den.clamp_min(1e-30), s), None
    assert mx is not None
    mv = v.mean(-1, keepdim=True)
    var = (v * v).mean(-1, keepdim=True) - mv * mv
    cov = (v * xg).mean(-1, keepdim=True) - mv * mx
    s = torch.where(var > 1e-6, cov / var.clamp_min(1e-6), s)
    return s, mx - s * mv


def _stored(s: Tensor, o: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Scale and offset as they will be stored (fp16, nearest), back in fp32."""
    return s.half().float(), None if o is None else o.half().float()


def _group_error(xg: Tensor, v: Tensor, s: Tensor, o: Tensor | None) -> Tensor:
    """Squared error per group of decoding the level values ``v`` as ``v * s (+ o)``."""
    rec = v * s if o is None else (v * s).add_(o)
    return rec.sub_(xg).pow_(2).sum(-1, keepdim=True)


def fit_mse(
    xg: Tensor, levels: Tensor, scale0: Tensor, offset0: Tensor | None, what: str
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Codes, scales and offsets per group of ``xg`` [R, G, g] minimising the squared error for a quantiser that
    decodes ``levels[q] * scale (+ offset)``; the decode formula is unchanged, so readers need nothing new.

    Starting from the min-max grid (``scale0``, ``offset0``: fp16 [R, G]), each ratio ``c`` of
    :data:`CLIP_RATIOS` shrinks it about its centre (scale ``c * scale0``; offset moved so the grid stays centred),
    then :data:`LS_ROUNDS` times: nearest codes, then the least-squares scale (and offset) for them. The scale and
    offset are rounded to fp16 and the codes recomputed for them; per group the candidate (the min-max grid
    included) with the smallest squared error is kept, so the error is never above min-max's. Returns
    (level indices uint8 [R, G, g], scales F16 [R, G], offsets F16 [R, G] | None).

    The search carries level values, not indices (for uniform codes ``value = lowest level + index``), and turns
    the winners into indices once at the end. Rows are fitted in blocks (:func:`fit_in_blocks`)."""
    return fit_in_blocks(  # type: ignore[return-value]
        lambda block, s0, o0: _fit_mse_block(block, levels, s0, o0, what), xg, scale0, offset0
    )


def _fit_mse_block(
    xg: Tensor, levels: Tensor, scale0: Tensor, offset0: Tensor | None, what: str
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`fit_mse` on one block of rows. The candidates keep only their scales, offsets and errors; the
    winners' level values are recomputed once from the winning scales and offsets (the same values, by
    construction). The block is made contiguous first: the group sums then add in the same order whatever the
    caller's layout."""
    xg = xg.contiguous()
    s0 = scale0.float().unsqueeze(-1)
    o0 = None if offset0 is None else offset0.float().unsqueeze(-1)
    mx = None if o0 is None else xg.mean(-1, keepdim=True)
    best_s, best_o = s0, o0
    best_err = _group_error(xg, _values_for(xg, levels, s0, o0), s0, o0)
    centre = None if o0 is None else o0 + s0 * (levels[0] + levels[-1]) / 2
    for c in CLIP_RATIOS:
        s = s0 * c
        o = None if centre is None else centre - s * (levels[0] + levels[-1]) / 2
        for _ in range(LS_ROUNDS):
            s, o = _least_squares(xg, _values_for(xg, levels, s, o), s, o, mx)
        s, o = _stored(s, o)
        err = _group_error(xg, _values_for(xg, levels, s, o), s, o)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_o = None if o is None else torch.where(better, o, best_o)
    best_v = _values_for(xg, levels, best_s, best_o)
    scale = _finite(best_s.squeeze(-1).half(), f"{what} scales")
    offset = None if best_o is None else _finite(best_o.squeeze(-1).half(), f"{what} offsets")
    lo = _uniform_low(levels)
    idx = _nearest(best_v, levels) if lo is None else best_v.sub_(lo)  # a level value -> its own index
    return idx.to(torch.uint8), scale, offset


# ---- codecs -----------------------------------------------------------------------------------------------
class _GroupCodec(Codec):
    row_wise = True
    allowed_groups: ClassVar[tuple[int, ...] | None] = GROUP_SIZES_4BIT

    def __init__(self, group_size: int, fit: str = "minmax", center: bool = False):
        if self.allowed_groups is not None and group_size not in self.allowed_groups:
            raise UsageError(f"{self.name} group size must be one of {self.allowed_groups}, got {group_size}")
        if group_size < 1:
            raise UsageError(f"group size must be positive, got {group_size}")
        check_fit(fit)
        self.group_size, self.fit, self.center = group_size, fit, bool(center)
        if self.center:  # one mean row for all rows: encoded from two passes, decoded through the general path
            self.row_wise = False  # type: ignore[misc]

    def _fit_params(self) -> dict[str, Any]:
        """``{"fit": "mse"}`` when not the min-max rule (absent: min-max, as every bundle before it was written), and
        ``{"center": true}`` when the table was centred on its mean row (absent: not)."""
        return ({} if self.fit == "minmax" else {"fit": self.fit}) | ({"center": True} if self.center else {})

    def code_roles(self) -> dict[str, int]:
        return {"codes": int(self.params()["bits"])}

    def tensor_specs(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], str]]:
        specs = self._tensor_specs(rows, width)
        if self.center:
            specs["mean"] = ((1, width), "F32")
        return specs

    def _tensor_specs(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], str]]:
        raise NotImplementedError

    def encoder(self, source: RowSource) -> BatchEncoder | None:
        """Row batches encoded as they come; centred (``center``): one pass more first, for the mean row (the fp64
        sum of the rows over their count, rounded to fp32), which every row has subtracted before it is coded."""
        if not self.center:
            return BatchEncoder(self.encode)
        self._check_width(source.width)
        total = torch.zeros(1, source.width, dtype=torch.float64)
        for _, rows in source.batches():
            total += rows.double().sum(0, keepdim=True)
        mean = (total / max(source.rows, 1)).float()
        return BatchEncoder(lambda rows: self._encode(rows.float() - mean), {"mean": mean})

    def decode_rows(self, access: TensorAccess, ids: Tensor) -> Tensor:
        rows = self._decode_rows(access, ids)
        return rows + full_f32(access, "mean") if self.center else rows

    def decode_into(self, access: TensorAccess, ids: Tensor, out: Tensor) -> None:
        self._decode_into(access, ids, out)
        if self.center:
            out += full_f32(access, "mean")

    def _decode_rows(self, access: TensorAccess, ids: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode_into(self, access: TensorAccess, ids: Tensor, out: Tensor) -> None:
        raise NotImplementedError

    def _check_width(self, width: int) -> None:
        if width % self.group_size:
            raise UsageError(
                f"{self.name}: width {width} is not a multiple of the group size {self.group_size}",
                hint="pick a group size that divides the hidden size (or the rank)",
            )

    def encode(self, table: Tensor) -> dict[str, Tensor]:
        self._check_width(table.shape[1])
        if self.center:  # the same mean row as a streamed encode of the table in one batch
            enc = self.encoder(TableRows(table, max(table.shape[0], 1)))
            assert enc is not None
            return {**enc.encode_rows(table), **enc.fixed}
        return self._encode(table)

    def _encode(self, table: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError


class Int4Codec(_GroupCodec):
    """4-bit codes per group of ``group_size`` values along a row; fp16 scale (+ offset when asymmetric).

    Roles: ``codes`` U8 [R, C/2], ``scales`` F16 [R, C/g], ``offsets`` F16 [R, C/g] (asymmetric only).
    Decode: asymmetric ``q * scale + offset``; symmetric ``(q - 8) * scale``.
    """

    name = "int4"

    def __init__(self, group_size: int = 64, symmetric: bool = False, fit: str = "minmax", center: bool = False):
        super().__init__(group_size, fit, center)
        self.symmetric = symmetric

    def params(self) -> dict[str, Any]:
        return {"bits": 4, "group_size": self.group_size, "symmetric": self.symmetric, **self._fit_params()}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Int4Codec:
        fit, center = params.get("fit", "minmax"), bool(params.get("center", False))
        return cls(int(params["group_size"]), bool(params.get("symmetric", False)), fit, center)

    def _tensor_specs(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], str]]:
        self._check_width(width)
        specs = {"codes": ((rows, width // 2), "U8"), "scales": ((rows, width // self.group_size), "F16")}
        if not self.symmetric:
            specs["offsets"] = ((rows, width // self.group_size), "F16")
        return specs

    def _encode(self, table: Tensor) -> dict[str, Tensor]:
        codes, scales, offsets = quantize_int4(table, self.group_size, self.symmetric, self.fit)
        out = {"codes": codes, "scales": scales}
        if offsets is not None:
            out["offsets"] = offsets
        return out

    def _decode_rows(self, access: TensorAccess, ids: Tensor) -> Tensor:
        offsets = None if self.symmetric else access.rows("offsets", ids)
        return dequantize_int4(access.rows("codes", ids), access.rows("scales", ids), offsets, self.group_size)

    def nibble_pairs(self) -> tuple[np.ndarray, bool] | None:
        if self.center:
            return None
        return (INT4_SYM_PAIRS, False) if self.symmetric else (INT4_PAIRS, True)

    def _decode_into(self, access: TensorAccess, ids: Tensor, out: Tensor) -> None:
        roles = ("codes", "scales", None if self.symmetric else "offsets")
        _decode_whole(access, ids, out, roles, lambda o, c, s, z: dequantize_int4_into(o, c, s, z, self.group_size))


class NF4Codec(_GroupCodec):
    """4-bit NormalFloat: the nearest of 16 fixed levels times an fp16 absmax scale per group.

    Roles: ``codes`` U8 [R, C/2], ``scales`` F16 [R, C/g]. Decode: ``NF4_LEVELS[q] * scale``.
    """

    name = "nf4"

    def __init__(self, group_size: int = 64, fit: str = "minmax", center: bool = False):
        super().__init__(group_size, fit, center)

    def params(self) -> dict[str, Any]:
        return {"bits": 4, "group_size": self.group_size, **self._fit_params()}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> NF4Codec:
        return cls(int(params["group_size"]), params.get("fit", "minmax"), bool(params.get("center", False)))

    def _tensor_specs(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], str]]:
        self._check_width(width)
        return {"codes": ((rows, width // 2), "U8"), "scales": ((rows, width // self.group_size), "F16")}

    def _encode(self, table: Tensor) -> dict[str, Tensor]:
        codes, scales = quantize_nf4(table, self.group_size, self.fit)
        return {"codes": codes, "scales": scales}

    def _decode_rows(self, access: TensorAccess, ids: Tensor) -> Tensor:
        return dequantize_nf4(access.rows("codes", ids), access.rows("scales", ids), self.group_size)

    def nibble_pairs(self) -> tuple[np.ndarray, bool] | None:
        return None if self.center else (NF4_PAIRS, False)

    def _decode_into(self, access: TensorAccess, ids: Tensor, out: Tensor) -> None:
        _decode_whole(
            access, ids, out, ("codes", "scales"), lambda o, c, s: dequantize_nf4_into(o, c, s, self.group_size)
        )


class Int8Codec(_GroupCodec):
    """Symmetric 8-bit codes with an fp16 scale per group (``group_size`` = the width: one per row).

    Roles: ``codes`` I8 [R, C], ``scales`` F16 [R, C/g]. Decode: ``q * scale``.
    """

    name = "int8"
    allowed_groups = None

    def __init__(self, group_size: int, fit: str = "minmax", center: bool = False):
        super().__init__(group_size, fit, center)

    def params(self) -> dict[str, Any]:
        return {"bits": 8, "group_size": self.group_size, **self._fit_params()}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Int8Codec:
        return cls(int(params["group_size"]), params.get("fit", "minmax"), bool(params.get("center", False)))

    def _tensor_specs(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], str]]:
        self._check_width(width)
        return {"codes": ((rows, width), "I8"), "scales": ((rows, width // self.group_size), "F16")}

    def _encode(self, table: Tensor) -> dict[str, Tensor]:
        codes, scales = quantize_int8(table, self.group_size, self.fit)
        return {"codes": codes, "scales": scales}

    def _decode_rows(self, access: TensorAccess, ids: Tensor) -> Tensor:
        return dequantize_int8(access.rows("codes", ids), access.rows("scales", ids), self.group_size)

    def _decode_into(self, access: TensorAccess, ids: Tensor, out: Tensor) -> None:
        _decode_blocks(
            access, ids, out, ("codes", "scales"), lambda o, c, s: dequantize_int8_into(o, c, s, self.group_size)
        )


# ---- int3 / int2: bit-packed asymmetric codes ----------------------------------------------------------------
def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes below ``2**bits``, [R, n] (``n`` a multiple of 8) -> bytes [R, n * bits / 8]: each row's codes
    as one little-endian bit stream (code ``j`` in stream bits ``j*bits .. j*bits+bits-1``, least significant
    first; stream bit ``i`` is bit ``i % 8`` of byte ``i // 8``). For 4 bits this is :func:`pack_nibbles`."""
    R, n = codes.shape
    c = codes.reshape(R, n // 8, 8).long()
    word = (c << (torch.arange(8) * bits)).sum(-1, keepdim=True)  # 8 codes -> `bits` bytes
    return ((word >> (torch.arange(bits) * 8)) & 0xFF).to(torch.uint8).reshape(R, n * bits // 8)


def unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """bytes [R, m] (``m`` a multiple of ``bits``) -> uint8 codes [R, m * 8 / bits] (:func:`pack_bits` reversed)."""
    R, m = packed.shape
    word = (packed.reshape(R, m // bits, bits).long() << (torch.arange(bits) * 8)).sum(-1, keepdim=True)
    return ((word >> (torch.arange(8) * bits)) & ((1 << bits) - 1)).to(torch.uint8).reshape(R, m * 8 // bits)


def quantize_lowbit(x: Tensor, group: int, bits: int, fit: str = "minmax") -> tuple[Tensor, Tensor, Tensor]:
    """x [R, C] fp32 -> (bit-packed codes U8 [R, C*bits/8], scales F16 [R, C/group], offsets F16 [R, C/group]).

    Min-max rule as asymmetric int4's, with ``2**bits - 1`` steps: offset = group min rounded down to fp16,
    scale = (max - offset) / (2**bits - 1) rounded up, codes = clamp(rint((x - offset) / scale)).
    ``fit="mse"``: :func:`fit_mse` from there."""
    R, C = x.shape
    top = (1 << bits) - 1
    xg = x.float().reshape(R, C // group, group)
    what = f"int{bits}"
    offset = _finite(f16_down(xg.amin(dim=-1)), f"{what} offsets")
    o = offset.float().unsqueeze(-1)
    scale = _finite(f16_up((xg.amax(-1) - offset.float()) / top), f"{what} scales")
    s = scale.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round((xg - o) / s.clamp_min(1e-30)), 0.0).clamp(0, top)
    if fit != "minmax":
        q, scale, offset = fit_mse(xg, uniform_levels(bits), scale, offset, what)  # type: ignore[assignment]
    return pack_bits(q.reshape(R, C).to(torch.uint8), bits), scale, offset  # type: ignore[return-value]


def dequantize_lowbit(codes: Tensor, scale: Tensor, offset: Tensor, group: int, bits: int) -> Tensor:
    """Bit-packed codes [R, C*bits/8] -> fp32 [R, C]: ``q * scale + offset`` per group."""
    q = unpack_bits(codes, bits).float()
    R, C = q.shape
    x = q.reshape(R, C // group, group) * scale.float().unsqueeze(-1) + offset.float().unsqueeze(-1)
    return x.reshape(R, C)


class _LowBitCodec(_GroupCodec):
    """``bits``-bit asymmetric codes per group of ``group_size`` values, bit-packed; fp16 scale and offset.

    Roles: ``codes`` U8 [R, C*bits/8], ``scales`` F16 [R, C/g], ``offsets`` F16 [R, C/g].
    Decode: ``q * scale + offset`` (:func:`unpack_bits`: each row a little-endian bit stream).
    """

    bits: ClassVar[int]

    def __init__(self, group_size: int = 64, fit: str = "minmax", center: bool = False):
        super().__init__(group_size, fit, center)

    def params(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, **self._fit_params()}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> _LowBitCodec:
        return cls(int(params["group_size"]), params.get("fit", "minmax"), bool(params.get("center", False)))

    def _tensor_specs(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], str]]:
        self._check_width(width)
        groups = width // self.group_size
        return {
            "codes": ((rows, width * self.bits // 8), "U8"),
            "scales": ((rows, groups), "F16"),
            "offsets": ((rows, groups), "F16"),
        }

    def _encode(self, table: Tensor) -> dict[str, Tensor]:
        codes, scales, offsets = quantize_lowbit(table, self.group_size, self.bits, self.fit)
        return {"codes": codes, "scales": scales, "offsets": offsets}

    def _decode_rows(self, access: TensorAccess, ids: Tensor) -> Tensor:
        roles = [access.rows(r, ids) for r in ("codes", "scales", "offsets")]
        return dequantize_lowbit(*roles, self.group_size, self.bits)

    def _decode_into(self, access: TensorAccess, ids: Tensor, out: Tensor) -> None:
        def block(o: Tensor, c: Tensor, s: Tensor, z: Tensor) -> None:
            o.copy_(dequantize_lowbit(c, s, z, self.group_size, self.bits))

        _decode_blocks(access, ids, out, ("codes", "scales", "offsets"), block)


class Int3Codec(_LowBitCodec):
    """3-bit codes (``bits`` = 3): 8 codes in 3 bytes."""

    name = "int3"
    bits = 3


class Int2Codec(_LowBitCodec):
    """2-bit codes (``bits`` = 2): 4 codes a byte."""

    name = "int2"
    bits = 2


# ---- specs ------------------------------------------------------------------------------------------------
class _GroupSpec(CodecSpec):
    """A spec with a ``group`` field (values per scale; ``None``: one group per row)."""

    group: int | None

    def __post_init__(self) -> None:
        check_fit(getattr(self, "fit", "minmax"))
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
    fit: str = DEFAULT_FIT
    center: bool = False

    def build(self, width: int, *, weights: Tensor | None = None) -> Int4Codec:
        return Int4Codec(self.group, self.symmetric, self.fit, self.center)


@dataclass(frozen=True)
class NF4(_GroupSpec):
    """``nf4(group=64)``: :class:`NF4Codec`; ``group`` is 32, 64 or 128."""

    codec: ClassVar[type[Codec]] = NF4Codec
    group: int = 64
    fit: str = DEFAULT_FIT
    center: bool = False

    def build(self, width: int, *, weights: Tensor | None = None) -> NF4Codec:
        return NF4Codec(self.group, self.fit, self.center)


@dataclass(frozen=True)
class Int8(_GroupSpec):
    """``int8(group=G)``: :class:`Int8Codec`; by default one group (one scale) per row."""

    codec: ClassVar[type[Codec]] = Int8Codec
    group: int | None = None
    fit: str = DEFAULT_FIT
    center: bool = False

    def build(self, width: int, *, weights: Tensor | None = None) -> Int8Codec:
        return Int8Codec(self.group or width, self.fit, self.center)


@dataclass(frozen=True)
class _LowBitSpec(_GroupSpec):
    """``int3(group=64)`` / ``int2(group=64)``: :class:`Int3Codec` (3.5 bits per value at group 64) /
    :class:`Int2Codec` (2.5); ``group`` is 32, 64 or 128."""

    group: int = 64
    fit: str = DEFAULT_FIT
    center: bool = False

    def build(self, width: int, *, weights: Tensor | None = None) -> _LowBitCodec:
        return self.codec(self.group, self.fit, self.center)  # type: ignore[call-arg,return-value]


@dataclass(frozen=True)
class Int3(_LowBitSpec):
    """``int3(group=64,fit=mse)``: :class:`Int3Codec`."""

    codec: ClassVar[type[Codec]] = Int3Codec


@dataclass(frozen=True)
class Int2(_LowBitSpec):
    """``int2(group=64,fit=mse)``: :class:`Int2Codec`."""

    codec: ClassVar[type[Codec]] = Int2Codec
