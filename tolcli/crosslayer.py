"""``compress`` with a cross-layer SVD (``svd(..., cross_layer=true)``): one factorisation of every present layer's
table side by side.

Every layer's ToL is a function of the same token embedding, so the tables share their row structure: stacked
``X = [s_0 T_0 | s_1 T_1 | ...]`` ([V, L h]) is factorised once, ``X ~ A B'`` with ``A`` [V, r] and ``B'`` [r, L h],
and layer ``l`` decodes as ``A B_l`` where ``B_l = B'[:, l h:(l+1) h] / s_l``. ``A`` (the bulk of the bytes) is stored
once, as the tensors ``shared.0.A.*`` that every layer's codec names; each layer stores its own ``B`` (
:class:`~tolcli.codecs.svd.SVDCodec` with ``shared=0``; ``docs/bundle-format.md``, "Shared tensors").

Token weights: the rows of ``X`` are weighted by ``w_t``, the mean over layers of the layers' weights, and layer
``l``'s columns scaled by ``s_l = sqrt(c_l)``, ``c_l = sum_t w_lt / sum_t w_t`` (its share of the weight), which
minimises ``sum_l sum_t w_lt ||T_lt - A_t B_l||^2`` exactly when the weights factor as ``w_lt = w_t c_l`` and
approximately otherwise (:func:`stack_weights`).

The basis of ``B'`` comes from the Gram of ``X`` (``exact``, an (L h)^2 matrix, refused beyond
:data:`MAX_EXACT_WIDTH`) or a range finder reading ``X`` in row batches (``randomized``:
:func:`~tolcli.codecs.svd.streamed_randomized_basis`, for the paper's shapes); the layers are read in row batches
side by side, so memory is a batch of every layer plus the factors, whatever the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from torch import Tensor

from tolcli.bundle.reader import Bundle
from tolcli.bundle.writer import Staging
from tolcli.codecs import SVD, DictAccess, Mixed
from tolcli.codecs.svd import (
    GRAM_DTYPES,
    ResidualRows,
    SVDCodec,
    column_scales,
    gram_eigh,
    streamed_gram,
    streamed_randomized_basis,
)
from tolcli.compress import ErrorStats, LayerRows, _entry, parse_budget, stage_rows
from tolcli.dtypes import DTYPES, tensor_to_numpy
from tolcli.errors import UsageError
from tolcli.feedback import CarriedRows, Carry
from tolcli.progress import Progress

# The widest stack (layers x hidden size) whose Gram ``exact`` forms: 16,384^2 fp64 is 2 GiB (and eigh's workspace).
MAX_EXACT_WIDTH = 16_384


class StackedRows:
    """A :class:`~tolcli.codecs.base.RowSource` of the layers' tables side by side, layer ``k``'s columns multiplied
    by ``scales[k]``: the layers are read in row batches in step."""

    def __init__(self, sources: list[LayerRows], scales: Tensor):
        self.sources, self.scales = sources, scales
        self.rows, self.width = sources[0].rows, sum(s.width for s in sources)

    def parts(self) -> Iterator[tuple[int, list[Tensor]]]:
        """``(first row, [each layer's fp32 rows])``, unscaled."""
        for batch in zip(*(s.batches() for s in self.sources), strict=True):
            yield batch[0][0], [rows for _, rows in batch]

    def stack(self, parts: list[Tensor]) -> Tensor:
        return torch.cat([rows * float(sc) for rows, sc in zip(parts, self.scales, strict=True)], dim=1)

    def batches(self) -> Iterator[tuple[int, Tensor]]:
        for s, parts in self.parts():
            yield s, self.stack(parts)


def stack_weights(weights: dict[int, Tensor] | None, layers: list[int]) -> tuple[Tensor | None, Tensor]:
    """``(row weights w_t, column scales s_l)`` of the stack: ``w_t`` the mean of the layers' token weights, ``s_l``
    the square root of layer ``l``'s share ``c_l = sum_t w_lt / sum_t w_t`` (all ones without weights).

    Example:
        >>> w, s = stack_weights({0: torch.tensor([1.0, 3.0]), 1: torch.tensor([2.0, 6.0])}, [0, 1])
        >>> w.tolist(), [round(x, 4) for x in (s**2).tolist()]
        ([1.5, 4.5], [0.6667, 1.3333])
    """
    if weights is None:
        return None, torch.ones(len(layers), dtype=torch.float64)
    w = torch.stack([weights[i].double() for i in layers])  # [L, V]
    row = w.mean(0)
    total = float(row.sum())
    share = w.sum(1) / total if total > 0 else torch.zeros(len(layers), dtype=torch.float64)
    if not bool(torch.isfinite(share).all()) or not bool((share > 0).all()):
        zero = [layers[k] for k in range(len(layers)) if not share[k] > 0]
        raise UsageError(
            f"layer(s) {', '.join(map(str, zero))} carry no token weight: a cross-layer fit cannot scale them",
            hint="keep --weight-floor above 0",
        )
    return row.float(), share.sqrt()


def stack_bytes(spec: SVD, rank: int, V: int, h: int, layers: int) -> int:
    """The stored bytes of a cross-layer SVD at ``rank``: ``A`` once, a ``B`` (and a residual) per layer."""
    codec = spec.with_rank(rank).build(h)
    b_codec = codec.b_codec or codec.b  # B's rows coded, or B dense
    per_layer = b_codec.stored_bytes(rank, h) + (0 if codec.residual is None else codec.residual.stored_bytes(V, h))
    return codec.a_codec.stored_bytes(V, rank) + layers * per_layer


def stack_target(spec: SVD, V: int, h: int, layers: int) -> float:
    """The bytes a ``ratio`` or ``budget`` allows the whole stack (fractions are of every layer's dense fp16)."""
    dense16 = layers * V * h * 2
    return spec.ratio * dense16 if spec.ratio is not None else parse_budget(str(spec.budget), dense16)


def check_stack(spec: SVD, V: int, h: int, layers: int, note: Callable[[str], None]) -> None:
    """What can be said before any work: a stack too wide for ``exact`` is refused; one storing more than dense
    fp16 (a rank above break-even) is warned about."""
    if spec.method == "exact" and layers * h > MAX_EXACT_WIDTH:
        raise UsageError(
            f"cross-layer svd method=exact needs a {layers * h:,}^2 Gram (layers x hidden size above "
            f"{MAX_EXACT_WIDTH:,})",
            hint="use method=randomized, which reads the layers in row batches",
        )
    assert spec.rank is not None
    stored, fp16 = stack_bytes(spec, spec.rank, V, h, layers), layers * V * h * 2
    if stored > fp16:
        note(
            f"warning: the cross-layer svd at rank {spec.rank} stores {stored / fp16:.2f}x the dense fp16 bytes: "
            "lower the rank or budget, or use --scheme fp16"
        )


def stack_rank(spec: SVD, V: int, h: int, layers: int) -> int:
    """The shared rank: ``rank``, or the largest multiple of the rank step whose bytes fit ``ratio`` or ``budget``
    of all layers' dense fp16 bytes (within ``min_rank`` .. ``max_rank`` and ``1 .. min(V, layers h)``)."""
    top = min(V, layers * h)
    if spec.max_rank is not None:
        top = min(top, spec.max_rank)
    if spec.rank is not None:
        if not 1 <= spec.rank <= min(V, layers * h):
            raise UsageError(f"cross-layer rank {spec.rank} is outside 1..{min(V, layers * h)}")
        return spec.rank
    target = stack_target(spec, V, h, layers)
    step = spec.rank_step()
    lo = spec.min_rank if spec.min_rank is not None else step
    best = None
    for r in range(step, top + 1, step):  # bytes grow with the rank: the last that fits
        if stack_bytes(spec, r, V, h, layers) > target:
            break
        best = r
    if best is None or best < lo:
        need = stack_bytes(spec, max(lo, step), V, h, layers)
        raise UsageError(
            f"{spec}: the budget ({int(target):,} bytes) is below the smallest cross-layer rank {max(lo, step)} "
            f"({need:,} bytes)",
            hint="raise the budget or the ratio",
        )
    return best


def stack_spec(spec: SVD, V: int, h: int, layers: int) -> SVD:
    """``spec`` at its shared rank (:func:`stack_rank`). With a ``mixed`` A and a ``ratio`` or ``budget``, A's
    ``bits`` choose the rank (the largest whose A at those bits fits), and A then takes every byte the budget has
    left (at most 8 bits a value): ranks are multiples of 32, so a fixed-bits A would leave up to 32 ranks' bytes
    unspent.

    Example:
        >>> from tolcli.codecs import Int8
        >>> xl = SVD(budget="0.1", cross_layer=True, normalize=False, a=Mixed(bits=4.5), b=Int8())
        >>> s = stack_spec(xl, 4096, 128, 6)  # rank 224 at 4.5 bits would not fit 10% of fp16
        >>> s.rank, s.a.bits, str(s)
        (192, 4.876, 'svd(rank=192,a=mixed(bits=4.876),normalize=false,cross_layer=true,b=int8)')
    """
    rank = stack_rank(spec, V, h, layers)
    fixed = spec.with_rank(rank)
    if spec.rank is not None or not isinstance(spec.a, Mixed):
        return fixed
    target = stack_target(spec, V, h, layers)
    left = target - (stack_bytes(fixed, rank, V, h, layers) - fixed.build(h).a_codec.stored_bytes(V, rank))
    bits = min(8.0, math.floor(1000 * 8 * left / (V * rank)) / 1000)  # never above the budget
    return replace(fixed, a=replace(spec.a, bits=max(bits, spec.a.bits)))


def fit_stack(spec: SVD, source: StackedRows, rank: int, row_weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(P [L h, r], B' [r, L h])``, fp32, with ``A = X P`` and ``X ~ A B'``: the top-``rank`` right singular
    vectors of the weighted stack (``P`` the basis divided by :func:`~tolcli.codecs.svd.column_scales` when the
    spec normalises a quantised ``A``, ``B'`` multiplied by them)."""
    if spec.method == "exact":
        if source.width > MAX_EXACT_WIDTH:  # compress refuses it earlier (check_stack)
            raise UsageError(f"cross-layer svd method=exact: the stack is {source.width:,} wide")
        evals, evecs = gram_eigh(streamed_gram(source, row_weights, dtype=GRAM_DTYPES[spec.gram]))
        basis, energy = evecs[:, :rank], evals[:rank]
    else:
        kw = {"oversample": spec.oversample, "power_iters": spec.power_iters, "seed": spec.seed}
        basis, energy = streamed_randomized_basis(source, rank, weights=row_weights, **kw)
    basis = basis.float()
    b = basis.T.contiguous()
    codec = spec.with_rank(rank).build(source.width)
    if codec.normalize:
        total = float(row_weights.double().sum()) if row_weights is not None else float(source.rows)
        d = column_scales(energy, total)
        basis, b = basis / d, b * d.unsqueeze(1)
    return basis, b


class Projected:
    """A :class:`~tolcli.codecs.base.RowSource` of ``A = X P``: the stack's row batches projected on the basis."""

    def __init__(self, source: StackedRows, basis: Tensor):
        self.source, self.basis = source, basis
        self.rows, self.width = source.rows, basis.shape[1]

    def batches(self) -> Iterator[tuple[int, Tensor]]:
        for s, x in self.source.batches():
            yield s, x @ self.basis


def stage_stack(
    b: Bundle,
    spec: SVD,
    weights: dict[int, Tensor] | None,
    staging: Staging,
    progress: Progress,
    batch_rows: int,
    carry: Carry | None = None,
) -> int:
    """Fit and stage a cross-layer SVD of every present layer of ``b`` (``A`` as ``shared.0.A.*``, each layer's
    ``B``), committing each layer's manifest entry (``stored_bytes`` counts ``A`` in every layer until the
    manifest attributes it: :func:`~tolcli.bundle.manifest.attribute_bytes`). Returns the rank.

    ``A``'s codec is fitted to ``A = X P`` (its own passes over the layers, for a codec that fits the whole factor,
    such as ``mixed``, with the stack's row weights), then ``A`` is encoded in row batches while each layer's
    reconstruction error is measured. A run resumed with some layers done fits and stages everything again (the
    staged bytes are the same). With a ``carry`` (error feedback, :mod:`tolcli.feedback`), each layer's residual
    codes ``T_l + c_l - A B_l``, in layer order."""
    layers = sorted(b.layers)
    V, h = b.vocab_size, b.hidden_size
    rank = stack_rank(spec, V, h, len(layers))
    if all(staging.layer_done(i) is not None for i in layers):
        return rank
    row_w, scales = stack_weights(weights, layers)
    source = StackedRows([LayerRows(b, i, batch_rows) for i in layers], scales)
    residual = spec.residual is not None
    progress.start(f"cross-layer svd of {len(layers)} layer(s), rank {rank}", 3 + (len(layers) if residual else 0))
    basis, b_all = fit_stack(spec, source, rank, row_w)
    progress.advance(1)
    first = spec.with_rank(rank).build(h, weights=row_w)  # its A codec is fitted with the stack's row weights
    a_codec = first.a_codec
    enc = a_codec.encoder(Projected(source, basis))
    if enc is None:
        raise UsageError(f"{spec}: the A factor's codec {a_codec.name} cannot encode in row batches")
    progress.advance(1)
    # what each layer stores and decodes with: B_l in fp16, undone of its column scale
    b_enc = {i: first.encode_b(b_all[:, k * h : (k + 1) * h] / float(scales[k])) for k, i in enumerate(layers)}
    b_f32 = {i: first.b_f32(DictAccess(t)) for i, t in b_enc.items()}
    stats = {i: ErrorStats(V) for i in layers}
    a_specs = {f"A.{r}": t for r, t in a_codec.tensor_specs(V, rank).items()}  # known once fitted (mixed)
    # A's encoded rows, kept for the residuals: its per-row roles filled batch by batch (A's stored bytes)
    kept: dict[str, Tensor] = {}

    def encoded() -> Iterator[tuple[int, dict[str, Tensor]]]:
        for s, parts in source.parts():
            roles = enc.encode_rows(source.stack(parts) @ basis)
            n = parts[0].shape[0]
            if not residual:  # (with residuals, each layer's error is measured with its residual)
                a_dec = a_codec.decode_rows(DictAccess({**roles, **enc.fixed}), torch.arange(n))
                for k, i in enumerate(layers):
                    stats[i].add(s, parts[k], a_dec @ b_f32[i])
            for r, t in roles.items() if residual else ():
                if r not in kept:
                    shape, dtype = a_specs[f"A.{r}"]
                    kept[r] = torch.empty(shape, dtype=DTYPES[dtype].torch)
                kept[r][s : s + n] = t
            yield s, {f"A.{r}": t for r, t in roles.items()}

    shared_name = lambda r: first.tensor_name(layers[0], r)  # noqa: E731
    a_roles = stage_rows(staging, encoded(), a_specs, shared_name)
    for r, t in enc.fixed.items():
        staging.stage(shared_name(f"A.{r}"), a_specs[f"A.{r}"][1], a_specs[f"A.{r}"][0], [tensor_to_numpy(t)])
    a_all = DictAccess({**kept, **enc.fixed})
    progress.advance(1)
    for i in layers:
        w = None if weights is None else weights[i]
        codec: SVDCodec = spec.with_rank(rank).build(h, weights=w)
        codec.a_codec = a_codec  # the one fitted A codec (its params: a mixed A's classes)
        r_roles: list[str] = []
        if residual:
            stats[i], r_roles = stage_residual(b, i, codec, a_all, b_f32[i], staging, batch_rows, carry)
            progress.advance(1)
        b_specs = codec.tensor_specs(V, h)
        for r, t in b_enc[i].items():
            staging.stage(codec.tensor_name(i, r), b_specs[r][1], b_specs[r][0], [tensor_to_numpy(t)])
        roles = [*a_roles, *(f"A.{r}" for r in enc.fixed), *b_enc[i], *r_roles]
        staging.commit_layer(i, _entry(i, codec, roles, (V, h), stats[i], w))
    progress.finish()
    return rank


def stage_residual(
    b: Bundle,
    layer: int,
    codec: SVDCodec,
    a_all: DictAccess,
    b_f32: Tensor,
    staging: Staging,
    batch_rows: int,
    carry: Carry | None = None,
) -> tuple[ErrorStats, list[str]]:
    """Fit ``codec``'s residual to layer ``layer``'s ``T - A B_l`` (``A`` decoded from its encoded rows ``a_all``)
    and stage it; returns the layer's error with the residual, and the residual's roles in the order staged. With
    a ``carry`` the residual codes ``T + c - A B_l``, and the carry advances (the error is still against ``T``)."""
    V, h = b.vocab_size, b.hidden_size

    def base(s: int, rows: Tensor) -> Tensor:
        return codec.a_codec.decode_rows(a_all, torch.arange(s, s + rows.shape[0])) @ b_f32

    source = LayerRows(b, layer, batch_rows)
    carried = None if carry is None else CarriedRows(source, carry)
    encode, fixed = codec.encode_residual(ResidualRows(source if carried is None else carried, base))
    stats = ErrorStats(V)

    def encoded() -> Iterator[tuple[int, dict[str, Tensor]]]:
        for s, rows in source.batches():
            target = rows if carried is None else carried.target(s, rows)
            approx = base(s, rows)
            roles = encode(target - approx)
            codec.add_residual(DictAccess({**roles, **fixed}), torch.arange(rows.shape[0]), approx)  # as decoding does
            stats.add(s, rows, approx)
            if carried is not None:
                carried.advance(s, target, approx)
            yield s, roles

    specs = codec.tensor_specs(V, h)
    name = lambda r: codec.tensor_name(layer, r)  # noqa: E731
    roles = stage_rows(staging, encoded(), specs, name)
    for r, t in fixed.items():
        staging.stage(name(r), specs[r][1], specs[r][0], [tensor_to_numpy(t)])
    return stats, [*roles, *fixed]
