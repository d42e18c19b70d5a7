"""Mixed precision per row: every row of a layer gets one class of a menu of uniform quantisers, chosen by
rate-distortion under a byte budget (spec ``mixed(bits=3.0)``; ``docs/bundle-format.md``, ``docs/compression.md``).

The table is centred on its mean row (stored once, fp32). Each row's class is ``(bits, group)`` with ``bits`` in
:data:`MENU_BITS` (0: nothing stored, the row decodes to the mean row) and ``group`` in :data:`MENU_GROUPS`; the
classes minimise ``sum_r weight[r] * err[r, class_r] + lambda * bytes[class_r]`` with ``lambda`` bisected so the
layer's stored bytes, side information included, stay within ``bits`` per value. Codes are asymmetric uniform
codes with fp16 scale and offset per group, fitted by a clipping search plus least squares (:func:`fit_group_codes`:
the uniform-level case of :func:`tolcli.codecs.quant.fit_mse`, rounding instead of searching levels, about 6x
faster, which the error of every row under every class needs), bit-packed as in ``int3`` / ``int2``.

Stored roles of a [R, C] table: ``index`` U8 [R, n] (row ``r``'s position among the rows sorted by class, then
row: ``n`` little-endian bytes), ``mean`` F32 [1, C], and for each listed class ``k`` with bits > 0
``class{k}.codes`` U8 [rows_k, C*bits/8], ``class{k}.scales`` and ``class{k}.offsets`` F16 [rows_k, C/group].
The classes and their row counts are in the manifest (``params.classes``), so every shape is known before a byte is
read and any row is found in O(1): position ``p`` -> the class whose range of positions holds it -> its slot.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from tolcli.codecs import mixed_kernel
from tolcli.codecs.base import (
    BatchEncoder,
    Codec,
    CodecSpec,
    RowSource,
    TableRows,
    TensorAccess,
    array_view,
    fit_in_blocks,
    full_f32,
)
from tolcli.codecs.quant import dequantize_lowbit, pack_bits
from tolcli.errors import InputError, UsageError

MENU_BITS = (0, 1, 2, 3, 4, 5, 6, 8)
MENU_GROUPS = (128, 64, 32)
DEFAULT_FLOOR = 0.3  # a row's weight is at least this fraction of the layer's mean weight
MAX_ROWS = (1 << 56) - 1  # the most rows a layer may list: positions fit the 7 bytes an index row may have
WIDTH_MULTIPLE = 32  # the smallest group: every width the codec encodes is a multiple of it
BISECT_STEPS = 100  # bisections of log(lambda)
LAMBDA_RANGE = 1e-30  # the smallest lambda tried, relative to the largest useful one
FAST_BLOCK_VALUES = 1 << 23  # values decoded at once on the fast path (4,096 rows at h = 2,048): bounds its scratch


# ---- the class menu and the bytes it costs -------------------------------------------------------------------
def class_menu(width: int) -> list[tuple[int, int]]:
    """The ``(bits, group)`` classes a [*, width] table may use, cheapest rows first (ties: fewer bits); the
    zero-bit class has group 0."""
    menu = [(0, 0)] + [(b, g) for b in MENU_BITS[1:] for g in MENU_GROUPS if width % g == 0]
    return sorted(menu, key=lambda c: (row_bytes(c[0], c[1], width), c[0]))


def row_bytes(bits: int, group: int, width: int) -> int:
    """Bytes one row of class ``(bits, group)`` stores: its packed codes and an fp16 scale and offset per group."""
    return 0 if bits == 0 else width * bits // 8 + 4 * (width // group)


def index_bytes(rows: int) -> int:
    """Bytes of each row's position in ``index``: the fewest that hold ``rows - 1``."""
    return max(1, (max(rows - 1, 0).bit_length() + 7) // 8)


def side_bytes(rows: int, width: int) -> int:
    """Bytes stored whatever the classes: the ``index`` tensor and the fp32 mean row."""
    return rows * index_bytes(rows) + 4 * width


# ---- row weights and the allocation ---------------------------------------------------------------------------
def row_weights(weights: Tensor | None, rows: int, floor: float) -> Tensor:
    """fp64 [rows]: ``weights`` divided by their mean and raised to at least ``floor``; all ones when None (or when
    every weight is zero)."""
    if weights is None:
        return torch.ones(rows, dtype=torch.float64)
    w = weights.detach().to(torch.float64).flatten()
    if w.numel() != rows:
        raise UsageError(f"mixed: `weights` has {w.numel():,} entries for a table of {rows:,} rows")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise UsageError("mixed: `weights` must be finite and >= 0")
    m = float(w.mean())
    return torch.ones_like(w) if m <= 0 else (w / m).clamp_min(floor)


def _choice(cost_err: Tensor, nbytes: Tensor, lam: float) -> Tensor:
    return (cost_err + lam * nbytes).argmin(1)  # the first minimum: the cheapest class among ties


def allocate(err: Tensor, weights: Tensor, nbytes: Tensor, budget: int) -> Tensor:
    """Per row, the class (column of ``err`` [R, K]) minimising ``weights * err + lambda * nbytes`` for the smallest
    ``lambda`` (bisected in log space) whose rows fit in ``budget`` bytes. ``nbytes`` [K] must hold a 0."""
    cost_err = weights.unsqueeze(1) * err
    b = nbytes.to(torch.float64)

    def total(lam: float) -> int:
        return int(nbytes[_choice(cost_err, b, lam)].sum())

    if total(0.0) <= budget:
        return _choice(cost_err, b, 0.0)
    # every row at the zero-byte class: lambda above the largest error saved per byte
    gain = (cost_err[:, :1] - cost_err) / b.clamp_min(1)
    hi = max(float(gain.max()), 1e-300) * 2
    lo = hi * LAMBDA_RANGE
    for _ in range(BISECT_STEPS):
        mid = math.sqrt(lo * hi)
        if total(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return _choice(cost_err, b, hi)


# ---- quantising one class: clipping search plus least squares ----------------------------------------------------
def clip_ratios(bits: int) -> tuple[float, ...]:
    """The clipping ratios tried for ``bits``-bit codes: each shrinks a group's min-max range about its centre before
    least squares (fewer bits clip more)."""
    if bits <= 2:
        return (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
    if bits <= 4:
        return (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)
    return (1.0, 0.95, 0.9, 0.85)


LS_ROUNDS = 2  # alternations of (nearest codes, least-squares scale and offset) per clipping ratio


def _codes(xg: Tensor, s: Tensor, o: Tensor, top: int) -> Tensor:
    """Nearest codes ``0 .. top`` of ``xg`` [n, G, g] on the grid ``q * s + o`` (``s`` 0: code 0)."""
    zero = s == 0
    if not bool(zero.any()):  # the usual case: no group-sized select over the whole block
        return torch.round_((xg - o).div_(s)).clamp_(0, top)
    return torch.where(zero, 0.0, torch.round((xg - o) / torch.where(zero, 1.0, s))).clamp_(0, top)


def _lsq(xg: Tensor, q: Tensor, s: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
    """The scale and offset minimising ``sum (x - q * s - o)^2`` per group (``mx``: the groups' means of ``xg``);
    groups whose codes are all equal keep ``s`` and get the best offset for it."""
    mq = q.mean(-1, keepdim=True)
    var = (q * q).mean(-1, keepdim=True) - mq * mq
    cov = (q * xg).mean(-1, keepdim=True) - mq * mx
    s = torch.where(var > 1e-6, cov / var.clamp_min(1e-6), s)
    return s, mx - s * mq


def fit_group_codes(xg: Tensor, bits: int, *, codes: bool = True) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """Asymmetric ``bits``-bit codes per group of ``xg`` [n, G, g] (decoded ``q * scale + offset``): from each
    clipping ratio of :func:`clip_ratios`, :data:`LS_ROUNDS` rounds of nearest codes and least squares, the scale
    and offset rounded to fp16 and the codes recomputed for them; per group the candidate with the smallest squared
    error is kept. Returns (codes fp32 [n, G, g], or None unless ``codes``; scales fp16 [n, G], offsets fp16
    [n, G], squared error fp32 [n, G]). Rows are fitted in blocks (:func:`fit_in_blocks`)."""
    return fit_in_blocks(lambda block: _fit_block(block, bits, codes), xg)  # type: ignore[return-value]


def _fit_block(xg: Tensor, bits: int, codes: bool) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """:func:`fit_group_codes` on one block of rows. The candidates keep only their scales, offsets and errors; the
    winners' codes are recomputed once from the winning scales and offsets (the same codes, by construction).
    The block is made contiguous first: the group sums then add in the same order whatever the caller's layout."""
    xg = xg.contiguous()
    top = (1 << bits) - 1
    lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    centre, width, mx = (lo + hi) / 2, hi - lo, xg.mean(-1, keepdim=True)
    best: tuple[Tensor, Tensor, Tensor] | None = None
    for c in clip_ratios(bits):
        s = width * (c / top)
        o = centre - s * (top / 2)
        for _ in range(LS_ROUNDS):
            s, o = _lsq(xg, _codes(xg, s, o, top), s, mx)
        s, o = s.half().float(), o.half().float()
        if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(o).all())):
            raise InputError("mixed: scales or offsets do not fit fp16 (values beyond 65504 in the centred table)")
        q = _codes(xg, s, o, top)
        err = q.mul_(s).add_(o).sub_(xg).pow_(2).sum(-1, keepdim=True)
        if best is None:
            best = (s, o, err)
            continue
        better = err < best[2]
        best = tuple(torch.where(better, new, old) for new, old in zip((s, o, err), best, strict=True))  # type: ignore[assignment]
    assert best is not None
    s, o, err = best
    q = _codes(xg, s, o, top) if codes else None
    return q, s.squeeze(-1).half(), o.squeeze(-1).half(), err.squeeze(-1)


def quantize_class(x: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Centred rows x [n, C] -> (packed codes U8 [n, C*bits/8], scales F16 [n, C/g], offsets F16 [n, C/g])."""
    n, C = x.shape
    q, s, o, _ = fit_group_codes(x.reshape(n, C // group, group), bits)
    assert q is not None
    return pack_bits(q.reshape(n, C).to(torch.uint8), bits), s, o


def dequantize_class(codes: Tensor, scales: Tensor, offsets: Tensor, bits: int, group: int) -> Tensor:
    """``q * scale + offset`` per group, fp32 [n, C] (the mean row not added)."""
    return dequantize_lowbit(codes, scales, offsets, group, bits)


def _class_errors(source: RowSource, mean: Tensor, menu: list[tuple[int, int]]) -> Tensor:
    """fp64 [R, K]: each row's squared error under each class of ``menu`` (pass 2 over ``source``)."""
    err = torch.empty(source.rows, len(menu), dtype=torch.float64)
    for s, rows in source.batches():
        x = rows.float() - mean
        n, C = x.shape
        for k, (bits, group) in enumerate(menu):
            if bits == 0:
                e = x.double().pow(2).sum(1)
            else:
                e = fit_group_codes(x.reshape(n, C // group, group), bits, codes=False)[3].double().sum(1)
            err[s : s + n, k] = e
    return err


def _mean_row(source: RowSource) -> Tensor:
    """The table's mean row, summed in fp64, as fp32 [1, C] (pass 1 over ``source``)."""
    acc = torch.zeros(source.width, dtype=torch.float64)
    for _, rows in source.batches():
        acc += rows.double().sum(0)
    return (acc / max(source.rows, 1)).float().unsqueeze(0)


def _encode_index(pos: Tensor, nbytes: int) -> Tensor:
    """Positions (int64 [R]) as ``nbytes`` little-endian bytes per row, U8 [R, nbytes]."""
    shifts = torch.arange(nbytes, dtype=torch.int64) * 8
    return ((pos.unsqueeze(1) >> shifts) & 0xFF).to(torch.uint8)


def decode_index(raw: Tensor) -> Tensor:
    """U8 [n, nbytes] little-endian -> int64 [n]."""
    shifts = torch.arange(raw.shape[1], dtype=torch.int64) * 8
    return (raw.to(torch.int64) << shifts).sum(1)


# ---- the codec -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowClass:
    """One listed class: its code width, group size and how many rows use it."""

    bits: int
    group: int
    rows: int


class MixedCodec(Codec):
    """Per-row classes of uniform quantisers on the mean-centred table (module docstring; ``docs/bundle-format.md``).

    Built by :class:`Mixed` (unfitted: ``encoder`` / ``encode`` choose the classes) or from a manifest's params."""

    name = "mixed"

    def __init__(
        self,
        target_bits: float,
        classes: list[RowClass] | None = None,
        *,
        weights: Tensor | None = None,
        floor: float = DEFAULT_FLOOR,
    ):
        check_target(target_bits)
        self.target_bits, self.classes, self.weights, self.floor = float(target_bits), classes, weights, floor
        self._kernel_memo: tuple[Any, int, Any] | None = None  # (weak ref to an access, width, kernel inputs)
        if classes is not None:
            check_classes(classes)

    # -- the manifest
    def params(self) -> dict[str, Any]:
        return {"target_bits": self.target_bits, "classes": [[c.bits, c.group, c.rows] for c in self._fitted()]}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> MixedCodec:
        raw = params["classes"]
        if not isinstance(raw, list) or not all(isinstance(c, list) and len(c) == 3 for c in raw):
            raise UsageError("mixed `classes` must be a list of [bits, group, rows] triples")
        if not all(type(v) is int for c in raw for v in c):
            raise UsageError("mixed `classes` entries must be integers")
        bits = params["target_bits"]
        if type(bits) not in (int, float):
            raise UsageError("mixed `target_bits` must be a number")
        return cls(float(bits), [RowClass(*c) for c in raw])

    def _fitted(self) -> list[RowClass]:
        if self.classes is None:
            raise UsageError("mixed: the codec has no classes until it has encoded a table")
        return self.classes

    def _starts(self) -> list[int]:
        """Each listed class's first position in ``index`` (its rows' positions are ``start .. start + rows - 1``)."""
        starts, s = [], 0
        for c in self._fitted():
            starts.append(s)
            s += c.rows
        return starts

    def code_roles(self) -> dict[str, int]:
        return {f"class{k}.codes": c.bits for k, c in enumerate(self._fitted()) if c.bits}

    def tensor_specs(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], str]]:
        classes = self._fitted()
        check_width(width, classes)
        if sum(c.rows for c in classes) != rows:
            raise UsageError(f"mixed: the classes hold {sum(c.rows for c in classes):,} rows, the table {rows:,}")
        specs: dict[str, tuple[tuple[int, ...], str]] = {
            "index": ((rows, index_bytes(rows)), "U8"),
            "mean": ((1, width), "F32"),
        }
        for k, c in enumerate(classes):
            if c.bits:
                specs[f"class{k}.codes"] = ((c.rows, width * c.bits // 8), "U8")
                specs[f"class{k}.scales"] = ((c.rows, width // c.group), "F16")
                specs[f"class{k}.offsets"] = ((c.rows, width // c.group), "F16")
        return specs

    def stored_bytes(self, rows: int, width: int) -> int:
        """The bytes of the tensors once fitted; before, the most the budget allows (``target_bits`` per value)."""
        if self.classes is None:
            return int(self.target_bits * rows * width) // 8
        return super().stored_bytes(rows, width)

    # -- encoding
    def encode(self, table: Tensor) -> dict[str, Tensor]:
        enc = self.encoder(TableRows(table))
        return {**enc.encode_rows(table.float()), **enc.fixed}

    def encoder(self, source: RowSource) -> BatchEncoder:
        """Fit to ``source`` (three passes: the mean row, every row's error under every class, then the chosen
        codes), holding the encoded layer (its stored bytes) and an [R, K] error table in memory. ``encode_rows``
        then gives the ``index`` rows of each batch, in order."""
        R, C = source.rows, source.width
        menu = class_menu(C)
        if not menu or C % WIDTH_MULTIPLE:
            raise UsageError(f"mixed: width {C} is not a multiple of {WIDTH_MULTIPLE}")
        budget = int(self.target_bits * R * C) // 8 - side_bytes(R, C)
        if budget < 0:
            need = 8 * side_bytes(R, C) / (R * C)
            raise UsageError(f"mixed `bits` {self.target_bits} is below its side information ({need:.3f} bits/value)")
        mean = _mean_row(source)
        err = _class_errors(source, mean, menu)
        nbytes = torch.tensor([row_bytes(b, g, C) for b, g in menu], dtype=torch.int64)
        choice = allocate(err, row_weights(self.weights, R, self.floor), nbytes, budget)
        used = [k for k in range(len(menu)) if bool((choice == k).any())]
        self.classes = [RowClass(*menu[k], int((choice == k).sum())) for k in used]
        cls_of = torch.full((len(menu),), -1, dtype=torch.int64)
        cls_of[torch.tensor(used)] = torch.arange(len(used))
        listed = cls_of[choice]  # each row's index into self.classes
        pos = _positions(listed)
        fixed = {"mean": mean, **self._encode_classes(source, mean, listed)}
        index = _encode_index(pos, index_bytes(R))
        return BatchEncoder(_in_order(index), fixed)

    def _encode_classes(self, source: RowSource, mean: Tensor, listed: Tensor) -> dict[str, Tensor]:
        """The per-class tensors, filled batch by batch (pass 3 over ``source``); rows in row order per class."""
        classes, C = self._fitted(), source.width
        out: dict[str, Tensor] = {}
        for k, c in enumerate(classes):
            if c.bits:
                out[f"class{k}.codes"] = torch.empty(c.rows, C * c.bits // 8, dtype=torch.uint8)
                out[f"class{k}.scales"] = torch.empty(c.rows, C // c.group, dtype=torch.float16)
                out[f"class{k}.offsets"] = torch.empty(c.rows, C // c.group, dtype=torch.float16)
        filled = [0] * len(classes)
        for s, rows in source.batches():
            x = rows.float() - mean
            mine = listed[s : s + x.shape[0]]
            for k, c in enumerate(classes):
                sel = (mine == k).nonzero().squeeze(1)
                if c.bits == 0 or sel.numel() == 0:
                    continue
                at = slice(filled[k], filled[k] + sel.numel())
                parts = quantize_class(x[sel], c.bits, c.group)
                for role, t in zip(("codes", "scales", "offsets"), parts, strict=True):
                    out[f"class{k}.{role}"][at] = t
                filled[k] += sel.numel()
        return out

    # -- decoding
    def positions(self, access: TensorAccess, ids: Tensor) -> Tensor:
        """Rows ``ids``'s positions (int64), refused unless inside the table (a corrupt ``index``)."""
        pos = decode_index(access.rows("index", ids))
        total = sum(c.rows for c in self._fitted())
        if pos.numel() and (int(pos.max()) >= total):
            bad = int(pos.max())
            raise InputError(
                f"mixed: tensor `index` holds position {bad:,}, beyond the layer's {total:,} rows",
                hint="the bundle is corrupt: run tolcli verify",
            )
        if pos.numel() and int(pos.min()) < 0:  # an index wider than 7 bytes can read as negative
            raise InputError(
                f"mixed: tensor `index` holds position {int(pos.min()):,}",
                hint="the bundle is corrupt: run tolcli verify",
            )
        return pos

    def decode_rows(self, access: TensorAccess, ids: Tensor) -> Tensor:
        out = torch.empty(ids.numel(), full_f32(access, "mean").shape[1], dtype=torch.float32)
        self.decode_into(access, ids, out)
        return out

    def decode_into(self, access: TensorAccess, ids: Tensor, out: Tensor) -> None:
        fast = out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous()
        fast = fast and not out.requires_grad and out.dim() == 2
        if fast and self._decode_compiled(access, ids.reshape(-1), out):
            return
        pos = self.positions(access, ids.reshape(-1))
        mean = full_f32(access, "mean")
        if fast:
            block = max(1, FAST_BLOCK_VALUES // max(1, out.shape[1]))  # scratch bounded whatever the number of ids
            for a in range(0, pos.numel(), block):
                self._decode_block(access, pos[a : a + block], mean, out[a : a + block])
            return
        out.copy_(mean.expand_as(out))  # zero-bit rows: the mean row
        for k, (c, start) in enumerate(zip(self._fitted(), self._starts(), strict=True)):
            if c.bits == 0:
                continue
            sel = _class_rows(pos, start, c.rows)
            if sel.numel() == 0:
                continue
            codes, scales, offsets = _class_tensors(access, k, c, pos[sel] - start, out.shape[-1])
            out[sel] = dequantize_class(codes, scales, offsets, c.bits, c.group) + mean

    def _decode_compiled(self, access: TensorAccess, ids: Tensor, out: Tensor) -> bool:
        """Decode with :mod:`tolcli.codecs.mixed_kernel` from whole-tensor views of the stored roles; False (nothing
        written) when the kernels or the views are unavailable."""
        if not mixed_kernel.available() or ids.dtype != torch.int64 or ids.device.type != "cpu":
            return False
        if out.shape[0] != ids.numel():  # the kernels write a row of ``out`` per id
            return False
        got = self._kernel_inputs(access, out.shape[1])
        if got is None:
            return False
        flat = ids.numpy()
        try:
            return mixed_kernel.decode(got, flat, out.numpy())
        except ValueError as e:
            if e.args[0] < 0:
                return False  # an id outside the table: the numpy path refuses it
            raise InputError(
                f"mixed: tensor `index` holds position {e.args[0]:,}, beyond the layer's "
                f"{sum(c.rows for c in self._fitted()):,} rows",
                hint="the bundle is corrupt: run tolcli verify",
            ) from None

    def _kernel_inputs(self, access: TensorAccess, C: int) -> mixed_kernel.Layer | None:
        """The layer as the kernels read it (whole-tensor views of its roles), every shape and dtype checked (the
        kernels index without bounds checks); None when a role has no view or anything is unusual (the numpy path
        then reads the same tensors and says what is wrong). Kept for an access whose views never change (a
        bundle's). Row counts need no check here: :func:`check_classes` bounds their sum by :data:`MAX_ROWS`."""
        memo = self._kernel_memo
        if memo is not None and memo[0]() is access and memo[1] == C:
            return memo[2]
        # one pass over the roles, each checked where it is read: an access without stable views (in-memory
        # tensors) builds this at every call, where a dict of roles and a second pass cost as much as the views
        index, mean = array_view(access, "index"), array_view(access, "mean")
        if index is None or mean is None:
            return None  # the checks below return None as soon as a role is missing or unusual
        ok = index.dtype == np.uint8 and index.ndim == 2 and 1 <= index.shape[1] <= 7
        ok = ok and mean.dtype == np.float32 and mean.shape == (1, C) and C % WIDTH_MULTIPLE == 0
        # numba assumes natural alignment whatever numpy says (a crafted file may misalign its tensors)
        if not (ok and all(a.flags.c_contiguous and a.flags.aligned for a in (index, mean))):
            return None
        spec: list[tuple[Any, ...]] = []
        for k, (c, start) in enumerate(zip(self._fitted(), self._starts(), strict=True)):
            if c.bits == 0:
                spec.append((0, 0, c.rows, start, None, None, None))
                continue
            codes = array_view(access, f"class{k}.codes")
            scales = array_view(access, f"class{k}.scales")
            offsets = array_view(access, f"class{k}.offsets")
            if codes is None or scales is None or offsets is None:
                return None
            ok = C % c.group == 0 and 1 <= c.bits <= 8
            ok = ok and codes.dtype == np.uint8 and codes.shape == (c.rows, C * c.bits // 8)
            ok = ok and scales.dtype == np.float16 and offsets.dtype == np.float16
            ok = ok and scales.shape == offsets.shape == (c.rows, C // c.group)
            if not (ok and all(a.flags.c_contiguous and a.flags.aligned for a in (codes, scales, offsets))):
                return None
            spec.append((c.bits, c.group, c.rows, start, codes, scales.view(np.uint16), offsets.view(np.uint16)))
        got = mixed_kernel.Layer(index, mean, spec)  # type: ignore[arg-type]
        if getattr(access, "stable_views", False):
            self._kernel_memo = (weakref.ref(access), C, got)
        return got  # type: ignore[return-value]

    def _decode_block(self, access: TensorAccess, pos: Tensor, mean: Tensor, out: Tensor) -> None:
        """:func:`decode_rows_fast` over the rows at positions ``pos``."""
        coded: list[tuple[int, int, Tensor, Tensor, Tensor, Tensor]] = []
        zero: list[Tensor] = []
        for k, (c, start) in enumerate(zip(self._fitted(), self._starts(), strict=True)):
            sel = _class_rows(pos, start, c.rows)
            if sel.numel() == 0:
                continue
            if c.bits == 0:
                zero.append(sel)
                continue
            codes, scales, offsets = _class_tensors(access, k, c, pos[sel] - start, out.shape[1])
            coded.append((c.bits, c.group, sel, codes, scales, offsets))
        decode_rows_fast(coded, torch.cat(zero) if zero else pos[:0], mean, out)


SPREAD = {bits: mixed_kernel.spread_rounds(bits) for bits in (2, 3, 5, 6)}
SPREAD_CHUNK = 1 << 15  # 64-bit words per chunk: two 256 KB arrays, in L2


class _Scratch(threading.local):
    """Per-thread buffers that the fast decode path reuses from call to call. A fresh multi-megabyte array is
    mapped by malloc and page-faulted on first touch at every call, which cost as much as the decoding itself; a
    thread keeps at most about 5 bytes per value of one block (:data:`FAST_BLOCK_VALUES`: about 42 MB)."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def array(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        buf = self.buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            buf = self.buffers[name] = np.empty(max(nbytes, 64), dtype=np.uint8)
        return buf[:nbytes].view(dt).reshape(shape)


_SCRATCH = _Scratch()


def unpack_codes_np(codes: np.ndarray, bits: int, scratch: _Scratch | None = None) -> np.ndarray:
    """Bit-packed rows U8 [n, C * bits / 8] -> their codes as uint8 [n, C] (the little-endian bit streams of
    :func:`tolcli.codecs.quant.pack_bits`), with a few whole-array integer operations and no table: ``unpackbits``
    for 1 bit, a 16-bit spread for 4, and for 2, 3, 5 and 6 bits each run of ``bits`` bytes (8 codes) read as one
    64-bit word whose codes are spread into its 8 bytes in three shift-or-mask rounds (:data:`SPREAD`).

    With ``scratch`` the result may be a view of a reused buffer, valid until the next call on the same thread."""
    n, m = codes.shape
    if bits == 8:
        return codes
    if bits == 1:
        return np.unpackbits(codes, axis=1, bitorder="little")
    if bits == 4:
        w16 = np.empty((n, m), "<u2") if scratch is None else scratch.array("w16", (n, m), "<u2")
        np.copyto(w16, codes, casting="unsafe")
        w16 |= w16 << np.uint16(4)
        w16 &= np.uint16(0x0F0F)
        return w16.view(np.uint8).reshape(n, m * 2)
    # Word j (codes 8j..8j+7) is the 8 bytes from byte `bits * j` of the rows' stream (rows are whole words),
    # read unaligned and masked to its `bits` bytes; the 8 bytes of slack keep the last read inside the buffer.
    size, count = n * m, n * m // bits
    stream = np.empty(size + 8, np.uint8) if scratch is None else scratch.array("stream", (size + 8,), np.uint8)
    stream[:size] = codes.reshape(-1)
    stream[size:] = 0
    words = np.ndarray((count,), dtype="<u8", buffer=stream, strides=(bits,))
    w = np.empty(count, "<u8") if scratch is None else scratch.array("words", (count,), "<u8")
    tmp = np.empty(count, "<u8") if scratch is None else scratch.array("shifted", (count,), "<u8")
    for a in range(0, count, SPREAD_CHUNK):  # chunks of words that stay in cache through the rounds
        wc, tc = w[a : a + SPREAD_CHUNK], tmp[a : a + SPREAD_CHUNK]
        np.bitwise_and(words[a : a + SPREAD_CHUNK], np.uint64((1 << (8 * bits)) - 1), out=wc)
        for half, lane, mask in SPREAD[bits]:
            if 2 * half <= lane:  # the field ends below where its upper half goes: w = (w | w << shift) & halves
                np.left_shift(wc, np.uint64(lane - half), out=tc)
                wc |= tc
                wc &= np.uint64(mask | (mask << lane))
                continue
            # w = (w & mask) | ((w >> half) & mask) << lane: the upper half of each field moves up one lane
            np.right_shift(wc, np.uint64(half), out=tc)
            tc &= np.uint64(mask)
            tc <<= np.uint64(lane)
            wc &= np.uint64(mask)
            wc |= tc
    return w.view(np.uint8).reshape(n, m * 8 // bits)


def decode_rows_fast(
    classes: list[tuple[int, int, Tensor, Tensor, Tensor, Tensor]], zero: Tensor, mean: Tensor, out: Tensor
) -> None:
    """Decode one block of rows into ``out`` (fp32 [n, C], contiguous, CPU): ``classes`` lists, per coded class,
    (bits, group, the block's rows of that class, their packed codes, their scales and offsets) and ``zero`` the
    block's rows of zero-bit classes; together they name every row of the block once.

    The codes of every class are unpacked to bytes and placed in the block's row order, the scales and offsets
    repeated to the smallest group of the block, and the block is then decoded in chunks of rows that stay in cache:
    ``((q * scale) + offset) + mean`` in fp32, one rounding per operation as :func:`dequantize_class` then the mean
    row (bit-identical to it); zero-bit rows are the mean row. Temporaries are per-thread scratch buffers
    (numpy's: its row scatters are ~15x torch's for uint8)."""
    n, C = out.shape
    if not classes:
        out.copy_(mean.expand(n, C))
        return
    g0 = math.gcd(*(group for _, group, *_ in classes))
    G = C // g0
    q = _SCRATCH.array("q", (n, C), np.uint8)  # rows of zero-bit classes are left as they are: overwritten below
    sc = _SCRATCH.array("scales", (n, G, 1), np.float32)
    off = _SCRATCH.array("offsets", (n, G, 1), np.float32)
    for bits, group, sel, codes, scales, offsets in classes:
        rows = sel.numpy()
        q[rows] = unpack_codes_np(codes.numpy(), bits, _SCRATCH)
        rep = group // g0
        sc[rows, :, 0] = np.repeat(scales.numpy().astype(np.float32), rep, axis=1)
        off[rows, :, 0] = np.repeat(offsets.numpy().astype(np.float32), rep, axis=1)
    qt, sct, offt = torch.from_numpy(q), torch.from_numpy(sc), torch.from_numpy(off)
    step = max(16, (1 << 19) // C)  # ~2 MB of fp32 rows per chunk (measured best at h = 2,048 on 1 MB of L2)
    for a in range(0, n, step):
        o = out[a : a + step]
        og = o.view(-1, G, g0)
        og.copy_(qt[a : a + step].view(-1, G, g0))
        og.mul_(sct[a : a + step])
        og.add_(offt[a : a + step])
        o.add_(mean)
    if zero.numel():
        out.numpy()[zero.numpy()] = mean.numpy()


def _class_tensors(access: TensorAccess, k: int, c: RowClass, slots: Tensor, width: int) -> tuple[Tensor, ...]:
    """Rows ``slots`` of class ``k``'s codes, scales and offsets, refused unless shaped as the class says (a
    bundle's tensors are checked against its manifest; tensors handed to the codec directly are checked here)."""
    parts = tuple(access.rows(f"class{k}.{r}", slots) for r in ("codes", "scales", "offsets"))
    want = (width * c.bits // 8, width // c.group, width // c.group)
    for role, t, n in zip(("codes", "scales", "offsets"), parts, want, strict=True):
        if t.dim() != 2 or t.shape[1] != n:
            raise InputError(
                f"mixed: tensor `class{k}.{role}` has shape {list(t.shape)}, not [rows, {n}] for {c.bits}-bit codes "
                f"in groups of {c.group} over {width} values",
                hint="the bundle is corrupt: run tolcli verify",
            )
    return parts


def _class_rows(pos: Tensor, start: int, rows: int) -> Tensor:
    """Which of the positions ``pos`` fall in the class listed at ``start .. start + rows - 1`` (int64 indices)."""
    return ((pos >= start) & (pos < start + rows)).nonzero().squeeze(1)


def _positions(listed: Tensor) -> Tensor:
    """Each row's position: rows sorted by class (listed order), then by row."""
    order = torch.argsort(listed * listed.numel() + torch.arange(listed.numel()))
    pos = torch.empty_like(order)
    pos[order] = torch.arange(listed.numel())
    return pos


def _in_order(index: Tensor) -> Any:
    """``encode_rows``: the ``index`` rows of the batches as they come (each call continues where the last ended)."""
    at = [0]

    def encode_rows(rows: Tensor) -> dict[str, Tensor]:
        s, n = at[0], rows.shape[0]
        if s + n > index.shape[0]:
            raise UsageError(f"mixed: encoder given more than the {index.shape[0]:,} rows it was fitted to")
        at[0] = s + n
        return {"index": index[s : s + n]}

    return encode_rows


def check_target(bits: float) -> None:
    if not (math.isfinite(bits) and 0 < bits <= 16):
        raise UsageError(f"mixed `bits` must be in (0, 16] bits per value, got {bits}")


def check_classes(classes: list[RowClass]) -> None:
    """Listed classes come from the menu, each at most once, with at least one row and together fewer than
    :data:`MAX_ROWS` (positions are at most 7 bytes; a manifest that lists more is refused before any decoding)."""
    if sum(c.rows for c in classes) > MAX_ROWS:
        raise UsageError(f"mixed: the classes list {sum(c.rows for c in classes):,} rows, more than {MAX_ROWS:,}")
    seen = set()
    for c in classes:
        ok_group = c.group == 0 if c.bits == 0 else c.group in MENU_GROUPS
        if c.bits not in MENU_BITS or not ok_group:
            raise UsageError(f"mixed: class ({c.bits} bits, group {c.group}) is not in the menu")
        if c.rows < 1:
            raise UsageError(f"mixed: class ({c.bits} bits, group {c.group}) lists {c.rows} rows (at least 1)")
        if (c.bits, c.group) in seen:
            raise UsageError(f"mixed: class ({c.bits} bits, group {c.group}) is listed twice")
        seen.add((c.bits, c.group))


def check_width(width: int, classes: list[RowClass]) -> None:
    for c in classes:
        if c.bits and width % c.group:
            raise UsageError(f"mixed: width {width} is not a multiple of class group {c.group}")


# ---- the spec ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mixed(CodecSpec):
    """``mixed(bits=3.0,floor=0.3)``: :class:`MixedCodec` at ``bits`` stored bits per value, side information
    included; row weights (``weights``) raised to at least ``floor`` times their mean.

    Example:
        >>> str(Mixed(bits=2.5)), Mixed().bytes_per_value()
        ('mixed(bits=2.5)', 0.375)
    """

    codec: ClassVar[type[Codec]] = MixedCodec
    bits: float = 3.0
    floor: float = DEFAULT_FLOOR

    def __post_init__(self) -> None:
        check_target(self.bits)
        if not (math.isfinite(self.floor) and 0 <= self.floor <= 1):
            raise UsageError(f"mixed `floor` must be in [0, 1], got {self.floor}")

    def build(self, width: int, *, weights: Tensor | None = None) -> MixedCodec:
        return MixedCodec(self.bits, weights=weights, floor=self.floor)

    @property
    def width_multiple(self) -> int:
        return WIDTH_MULTIPLE

    def bytes_per_value(self) -> float:
        """At most ``bits / 8`` (the budget includes the side information)."""
        return self.bits / 8
