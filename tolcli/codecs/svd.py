"""Low-rank factorisation of a ToL table: ``T ~ A @ B`` with ``A = T V_r`` [V, r] and ``B = V_r^T`` [r, h].

``V_r`` are the top-``r`` right singular vectors of ``diag(sqrt(w)) T`` (``w`` = token weights, 1 when
none): the factorisation that minimises ``sum_t w_t ||T_t - A_t B||^2``. Since ``B`` has orthonormal
rows, ``A = T V_r`` is each row's exact projection whatever the weights.

- ``exact``: eigendecomposition of the h x h Gram matrix ``T^T diag(w) T``, read in row batches (each
  batch's product in fp32, the products summed in fp64: :func:`streamed_gram`; the table need not be in
  memory), so the eigenvalues are the squared singular values and the error at any rank is known in
  advance (:func:`gram_spectrum`; adaptive rank allocation uses it). ``A = T V_r`` is then encoded batch
  by batch (:meth:`SVDCodec.encoder`).
- ``randomized``: Halko-Martinsson-Tropp range finder with oversampling and power iterations, for
  ``r << h``; deterministic given the seed.

The ``A`` factor is stored by any row-wise codec (dense fp16 by default, or int4/nf4/int8: the
``svd+int4`` schemes); ``B`` is stored dense (fp16 by default). A quantised ``A``'s columns are divided by
powers of two near the square roots of their RMS, folded into ``B``'s rows (``normalize``, the default; ``A @ B``
is unchanged, and so is decoding), since ``A = T V_r``'s column norms are the singular values, which fall by 10x
along a group of the rank axis (:func:`column_scales`). ``residual`` codes what the factors leave, ``T - A B``, with a
codec of its own (roles ``R.*``; e.g. ``mixed``, which spends its bytes on the rows whose residual costs the most
loss): decoding is then ``A B + R``. The spec :class:`SVD`
(``svd(rank=64,a=int4(group=32))``) is a :class:`~tolcli.codecs.base.RankedSpec`: ``compress`` chooses
its rank per layer.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from tolcli.bundle.spec import MAX_SHARED_GROUPS, shared_tensor
from tolcli.codecs.base import (
    BatchEncoder,
    Codec,
    CodecSpec,
    DictAccess,
    PrefixedAccess,
    RankedSpec,
    RowSource,
    TableRows,
    TensorAccess,
    codec_from_manifest,
    full_f32,
    specs_bytes,
)
from tolcli.codecs.dense import Dense, DenseCodec
from tolcli.errors import UsageError

SVD_METHODS = ("exact", "randomized")
_BLOCK = 8192
# The precision of each row batch's Gram product (the products are summed in fp64). fp32 runs at the BLAS's fp32
# speed and resolves singular values down to ~1e-3 of the largest; fp64 is exact to fp64 rounding and ~2x slower
# (docs/compression.md, "The SVD's accuracy").
GRAM_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
# Rows whose fp32 products are accumulated in fp32 before they are added to the fp64 sum: one fp32 matmul of this
# many rows has the same rounding, and the fp64 additions (an h x h conversion each) stop costing time.
GRAM_FOLD_ROWS = 16_384
DEFAULT_GRAM = "fp32"
# A quantised A factor's columns are scaled by (their RMS) ** COLUMN_POWER, rounded to powers of two
# (:func:`column_scales`).
COLUMN_POWER = 0.5


def check_method(method: str) -> None:
    if method not in SVD_METHODS:
        raise UsageError(f"svd method must be one of {', '.join(SVD_METHODS)}, got {method!r}")


def check_gram(gram: str) -> None:
    if gram not in GRAM_DTYPES:
        raise UsageError(f"svd gram must be one of {', '.join(GRAM_DTYPES)}, got {gram!r}")


def as_rows(table: Tensor | RowSource) -> RowSource:
    """A table as a :class:`RowSource` (an in-memory tensor in blocks of 8,192 rows)."""
    return TableRows(table, _BLOCK) if isinstance(table, Tensor) else table


def _whole(source: RowSource) -> Tensor:
    """The whole fp32 table of ``source`` (what the randomized range finder needs)."""
    if isinstance(source, TableRows):
        return source.table.float()
    return torch.cat([blk for _, blk in source.batches()])


def streamed_gram(source: RowSource, weights: Tensor | None = None, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """``T^T diag(w) T`` as fp64 [h, h], read in row batches: the products computed in ``dtype`` (fp32: the BLAS's
    speed; fp64: exact to fp64 rounding), accumulated in ``dtype`` over blocks of :data:`GRAM_FOLD_ROWS` rows (as
    one matmul of that many rows would), the blocks summed in fp64."""
    h = source.width
    gram = torch.zeros(h, h, dtype=torch.float64)
    acc = gram if dtype == torch.float64 else torch.zeros(h, h, dtype=dtype)
    pending = 0
    for s, rows in source.batches():
        blk = rows.to(dtype)
        if weights is not None:
            blk = blk * weights[s : s + blk.shape[0]].to(dtype).sqrt().unsqueeze(1)
        acc.addmm_(blk.T, blk)
        pending += blk.shape[0]
        if acc is not gram and pending >= GRAM_FOLD_ROWS:
            gram += acc
            acc.zero_()
            pending = 0
    if acc is not gram and pending:
        gram += acc
    return gram


def gram_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, >= 0) and eigenvectors (columns, in that order) of a symmetric fp64 Gram."""
    evals, evecs = torch.linalg.eigh(gram)
    return evals.flip(0).clamp_min(0.0), evecs.flip(1)


def gram_spectrum(
    table: Tensor | RowSource, weights: Tensor | None = None, *, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, fp64, >= 0) and eigenvectors (columns) of ``T^T diag(w) T``; ``dtype`` is the
    precision of each row batch's product (fp64 by default here: the reference; an SVD spec's ``gram`` chooses
    what ``compress`` uses)."""
    return gram_eigh(streamed_gram(as_rows(table), weights, dtype=dtype))


def randomized_basis(
    table: Tensor, rank: int, *, weights: Tensor | None, oversample: int, power_iters: int, seed: int
) -> Tensor:
    """An orthonormal [h, rank] basis of the dominant right singular subspace (randomized)."""
    h = table.shape[1]
    k = min(h, rank + oversample)
    tw = table.float() if weights is None else table.float() * weights.float().sqrt().unsqueeze(1)
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(h, k, generator=g, dtype=torch.float32)
    q = torch.linalg.qr(tw @ omega).Q  # (V, k)
    for _ in range(power_iters):
        z = torch.linalg.qr(tw.T @ q).Q  # (h, k)
        q = torch.linalg.qr(tw @ z).Q
    small = (q.T @ tw).double()  # (k, h)
    _, _, vt = torch.linalg.svd(small, full_matrices=False)
    return vt[:rank].T  # (h, rank)


def streamed_randomized_basis(
    source: RowSource, rank: int, *, weights: Tensor | None, oversample: int, power_iters: int, seed: int
) -> tuple[Tensor, Tensor]:
    """:func:`randomized_basis` reading ``source`` in row batches (``3 + 2 * power_iters`` passes: the range, each
    power iteration's two, the projection and the energies), so that only ``[rows, k]`` matrices (two at a time, a
    QR's input and output) and ``[k, width]`` ones (``k = rank + oversample``) are held, never the table: the range
    finder for tables too wide for a Gram (a cross-layer stack). Returns the fp64 [width, rank] basis and each basis
    vector's (weighted) energy."""
    h = source.width
    k = min(h, rank + oversample)
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(h, k, generator=g, dtype=torch.float32)

    def weighted() -> Iterator[tuple[int, Tensor]]:
        for s, rows in source.batches():
            yield s, rows if weights is None else rows * weights[s : s + rows.shape[0]].float().sqrt().unsqueeze(1)

    def project(z: Tensor) -> Tensor:  # Q of (T_w z), [rows, k]
        y = torch.empty(source.rows, z.shape[1], dtype=torch.float32)
        for s, rows in weighted():
            y[s : s + rows.shape[0]] = rows @ z
        return torch.linalg.qr(y).Q

    q = project(omega)
    for _ in range(power_iters):
        z = torch.zeros(h, q.shape[1], dtype=torch.float32)
        for s, rows in weighted():
            z += rows.T @ q[s : s + rows.shape[0]]
        q = project(torch.linalg.qr(z).Q)
    small = torch.zeros(q.shape[1], h, dtype=torch.float64)  # Q^T T_w, (k, h)
    for s, rows in weighted():
        small += (q[s : s + rows.shape[0]].T @ rows).double()
    _, _, vt = torch.linalg.svd(small, full_matrices=False)
    basis = vt[:rank].T.contiguous()
    energy = torch.zeros(rank, dtype=torch.float64)
    for _, rows in weighted():
        energy += (rows.double() @ basis).pow(2).sum(0)
    return basis, energy


def fit_basis(
    source: RowSource,
    rank: int,
    *,
    method: str = "exact",
    weights: Tensor | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    gram: str = DEFAULT_GRAM,
) -> Tensor:
    """The fp64 [h, rank] orthonormal basis ``V_r`` of ``source`` (read in row batches for ``exact``, each
    batch's Gram product in ``gram`` precision; whole for ``randomized``) that minimises the (weighted) squared
    reconstruction error."""
    kw = {"oversample": oversample, "power_iters": power_iters, "seed": seed, "gram": gram}
    return fit_basis_energy(source, rank, method=method, weights=weights, **kw)[0]  # type: ignore[arg-type]


def fit_basis_energy(
    source: RowSource,
    rank: int,
    *,
    method: str = "exact",
    weights: Tensor | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    gram: str = DEFAULT_GRAM,
) -> tuple[Tensor, Tensor]:
    """:func:`fit_basis`, and each basis vector's (weighted) energy ``sum_t w_t (T_t v_j)^2`` (fp64 [rank]): the
    eigenvalues for ``exact``, computed from the table for ``randomized``."""
    V, h = source.rows, source.width
    if not 1 <= rank <= min(V, h):
        raise UsageError(f"rank must be within 1..{min(V, h)}, got {rank}")
    check_method(method)
    check_gram(gram)
    if method == "exact":
        evals, evecs = gram_eigh(streamed_gram(source, weights, dtype=GRAM_DTYPES[gram]))
        return evecs[:, :rank], evals[:rank]
    table = _whole(source)
    basis = randomized_basis(table, rank, weights=weights, oversample=oversample, power_iters=power_iters, seed=seed)
    a2 = (table.double() @ basis).pow(2)
    return basis, (a2 if weights is None else a2 * weights.double().unsqueeze(1)).sum(0)


def column_scales(energy: Tensor, total_weight: float) -> Tensor:
    """Per column of ``A = T V_r``, the power of two nearest ``rms ** COLUMN_POWER``, its (weighted) RMS
    ``sqrt(energy / total_weight)`` to the power :data:`COLUMN_POWER` (1 for a column without energy). Dividing
    ``A``'s columns by them and multiplying ``B``'s rows leaves ``A @ B`` unchanged to the last bit (powers of two).

    Why a power between 0 and 1: a group along the rank axis of a quantised ``A`` shares one step, set by its
    largest value, and every column pays that step's error times its scale in ``B``. Unscaled (power 0), the first
    columns set a large step that all columns pay; scaled to equal RMS (power 1), all columns are equally large,
    so the step is the largest, and the large columns pay it in full. On the demo's layers, powers 0 / 0.5 / 1 gave
    svd+int4 (rank 32, group 32) quantisation errors 39.5 / 20.5 / 29.1 (layer 0) and 26.6 / 25.7 / 26.5
    (layer 3)."""
    rms = (energy / max(total_weight, 1e-300)).sqrt()
    exp = torch.where(rms > 0, torch.round(COLUMN_POWER * torch.log2(rms.clamp_min(1e-300))), torch.zeros_like(rms))
    return torch.exp2(exp.clamp(-60, 60)).float()


def factorize(
    table: Tensor,
    rank: int,
    *,
    method: str = "exact",
    weights: Tensor | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    gram: str = "fp64",
) -> tuple[Tensor, Tensor]:
    """``(A [V, rank], B [rank, h])``, fp32, minimising the (weighted) squared reconstruction error;
    ``A = T V_r`` in fp32. ``gram``: the Gram products' precision (fp64 here, the reference; the codec's
    default is fp32)."""
    basis = fit_basis(
        TableRows(table, _BLOCK),
        rank,
        method=method,
        weights=weights,
        oversample=oversample,
        power_iters=power_iters,
        seed=seed,
        gram=gram,
    ).float()
    return table.float() @ basis, basis.T.contiguous()


class SVDCodec(Codec):
    """Roles: ``A.<role>`` for each role of the A codec (e.g. ``A.table``, or ``A.codes`` ...) and ``B``.

    Decode row ``t``: ``decode_A(t) @ B``.
    """

    name = "svd"
    row_wise = False

    def __init__(
        self,
        rank: int,
        a_codec: Codec | None = None,
        b_dtype: str = "F16",
        *,
        method: str = "exact",
        oversample: int = 10,
        power_iters: int = 2,
        seed: int = 0,
        weights: Tensor | None = None,
        gram: str = DEFAULT_GRAM,
        normalize: bool = False,
        shared: int | None = None,
        b_codec: Codec | None = None,
        residual: Codec | None = None,
    ):
        if rank < 1:
            raise UsageError(f"rank must be >= 1, got {rank}")
        if shared is not None and not 0 <= shared < MAX_SHARED_GROUPS:
            raise UsageError(f"svd shared group must be within 0..{MAX_SHARED_GROUPS - 1}, got {shared}")
        check_method(method)
        check_gram(gram)
        self.rank, self.gram = rank, gram
        self.a_codec = a_codec or DenseCodec("F16")
        if shared is None:  # a per-layer A is encoded in row batches; a shared one is fitted whole (crosslayer.py)
            _check_row_wise(self.a_codec)
        elif isinstance(self.a_codec, SVDCodec):
            raise UsageError("a cross-layer svd's A factor cannot be an svd itself")
        self.b = DenseCodec(b_dtype)
        self.b_codec = b_codec  # None: B is the dense tensor ``B``; else B's rows coded by it, roles ``B.*``
        if b_codec is not None:
            _check_row_wise(b_codec, "B")
        if isinstance(residual, SVDCodec):
            raise UsageError("an svd's residual cannot be an svd itself")
        self.residual = residual  # None: decode A @ B; else A @ B plus the residual's rows, roles ``R.*``
        self._b_memo: tuple[Any, Tensor] | None = None  # (weak ref to a bundle's access, its decoded B)
        self._key_memo: tuple[Codec, str] | None = None  # (the A codec, its shared_key)
        self._sub_memo: dict[str, tuple[Any, PrefixedAccess]] = {}  # prefix -> (weak ref to an access, its view)
        self.method, self.oversample, self.power_iters, self.seed = method, oversample, power_iters, seed
        self.weights = weights
        self.normalize = normalize and not isinstance(self.a_codec, DenseCodec)  # a dense A needs no scaling
        self.shared = shared  # cross-layer: the A factor is the tensors ``shared.{shared}.A.*``, read by every layer

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {
            "rank": self.rank,
            "a": {"codec": self.a_codec.name, "params": self.a_codec.params()},
            "method": self.method,
            "weighted": self.weights is not None,
        }
        if self.method == "randomized":
            p.update(oversample=self.oversample, power_iters=self.power_iters, seed=self.seed)
        elif self.gram != DEFAULT_GRAM:  # recorded when not the default, so default params stay as always written
            p["gram"] = self.gram
        if self.normalize:  # informational (decoding is A @ B either way); absent in bundles written before it
            p["normalize"] = True
        if self.shared is not None:
            p["shared"] = self.shared
        if self.b_codec is None:
            p["b_dtype"] = self.b.dtype
        else:
            p["b"] = {"codec": self.b_codec.name, "params": self.b_codec.params()}
        if self.residual is not None:
            p["residual"] = {"codec": self.residual.name, "params": self.residual.params()}
        return p

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> SVDCodec:
        a, b, res = params["a"], params.get("b"), params.get("residual")
        if (b is None) == ("b_dtype" not in params):
            raise UsageError("svd params need exactly one of `b_dtype` (a dense B) and `b` (B's codec)")
        return cls(
            int(params["rank"]),
            codec_from_manifest(a["codec"], a["params"]),
            params.get("b_dtype", "F16"),
            b_codec=None if b is None else codec_from_manifest(b["codec"], b["params"]),
            method=params.get("method", "exact"),
            gram=params.get("gram", DEFAULT_GRAM),
            normalize=bool(params.get("normalize", False)),
            shared=None if params.get("shared") is None else int(params["shared"]),
            residual=None if res is None else codec_from_manifest(res["codec"], res["params"]),
        )

    def nested(self) -> dict[str, Codec]:
        held = {"a": self.a_codec, "b": self.b_codec, "residual": self.residual}
        return {k: c for k, c in held.items() if c is not None}

    def tensor_name(self, layer: int, role: str) -> str:
        if self.shared is not None and role.startswith("A."):
            return shared_tensor(self.shared, role)
        return super().tensor_name(layer, role)

    def shared_key(self) -> str | None:
        """The shared A factor's shape and codec: rank, A's codec and parameters, and the group."""
        if self.shared is None:
            return None
        a = {"codec": self.a_codec.name, "params": self.a_codec.params()}
        return json.dumps({"rank": self.rank, "a": a, "shared": self.shared}, sort_keys=True)

    def code_roles(self) -> dict[str, int]:
        roles = {f"A.{role}": bits for role, bits in self.a_codec.code_roles().items()}
        if self.b_codec is not None:
            roles.update({f"B.{role}": bits for role, bits in self.b_codec.code_roles().items()})
        if self.residual is not None:
            roles.update({f"R.{role}": bits for role, bits in self.residual.code_roles().items()})
        return roles

    def tensor_specs(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], str]]:
        specs = self._factor_specs(rows, width)
        if self.residual is not None:
            specs.update({f"R.{role}": spec for role, spec in self.residual.tensor_specs(rows, width).items()})
        return specs

    def stored_bytes(self, rows: int, width: int) -> int:
        """The factors' bytes and the residual's (before a residual is fitted, the most its budget allows)."""
        res = 0 if self.residual is None else self.residual.stored_bytes(rows, width)
        return specs_bytes(self._factor_specs(rows, width)) + res

    def _factor_specs(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], str]]:
        specs = {f"A.{role}": spec for role, spec in self.a_codec.tensor_specs(rows, self.rank).items()}
        if self.b_codec is None:
            specs["B"] = ((self.rank, width), self.b.dtype)
        else:
            specs.update({f"B.{role}": spec for role, spec in self.b_codec.tensor_specs(self.rank, width).items()})
        return specs

    def encode_b(self, b: Tensor) -> dict[str, Tensor]:
        """The roles that store ``B`` [rank, h] (``B``, or ``B.*`` through its codec)."""
        if self.b_codec is None:
            return {"B": self.b.encode(b)["table"]}
        return {f"B.{role}": t for role, t in self.b_codec.encode(b).items()}

    def b_f32(self, access: TensorAccess) -> Tensor:
        """``B`` as decoding uses it, fp32 [rank, h]: the stored dense ``B`` (cached by a bundle's access), or
        decoded from ``B.*`` (cached here for a bundle's access)."""
        if self.b_codec is None:
            return full_f32(access, "B")
        memo = self._b_memo
        if memo is not None and memo[0]() is access:
            return memo[1]
        out = self.b_codec.decode_rows(self.sub_access(access, "B."), torch.arange(self.rank))
        if getattr(access, "stable_views", False):
            self._b_memo = (weakref.ref(access), out)
        return out

    def encode(self, table: Tensor) -> dict[str, Tensor]:
        enc = self.encoder(TableRows(table, _BLOCK))
        return {**enc.encode_rows(table.float()), **enc.fixed}

    def encoder(self, source: RowSource) -> BatchEncoder:
        """Fit ``V_r`` (exact: one streamed pass for the Gram), then encode ``A = rows @ V_r`` batch by batch; with
        ``normalize``, ``A``'s columns divided by :func:`column_scales` and ``B``'s rows multiplied by them."""
        basis, energy = fit_basis_energy(
            source,
            self.rank,
            method=self.method,
            weights=self.weights,
            oversample=self.oversample,
            power_iters=self.power_iters,
            seed=self.seed,
            gram=self.gram,
        )
        basis, a_codec = basis.float(), self.a_codec
        b = basis.T.contiguous()
        if self.normalize:
            total = float(self.weights.double().sum()) if self.weights is not None else float(source.rows)
            d = column_scales(energy, total)
            basis, b = basis / d, b * d.unsqueeze(1)

        def encode_a(rows: Tensor) -> dict[str, Tensor]:
            return {f"A.{role}": t for role, t in a_codec.encode(rows @ basis).items()}

        fixed = self.encode_b(b)
        if self.residual is None:
            return BatchEncoder(encode_a, fixed)
        b_dec = self.b_f32(DictAccess(fixed))

        def factors(roles: dict[str, Tensor], n: int) -> Tensor:  # what A @ B decodes n encoded rows to
            return a_codec.decode_rows(PrefixedAccess(DictAccess(roles), "A."), torch.arange(n)) @ b_dec

        residual, r_enc = self.encode_residual(ResidualRows(source, lambda s, rows: factors(encode_a(rows), len(rows))))

        def encode_rows(rows: Tensor) -> dict[str, Tensor]:
            roles = encode_a(rows)
            return {**roles, **residual(rows - factors(roles, len(rows)))}

        return BatchEncoder(encode_rows, {**fixed, **r_enc})

    def encode_residual(self, source: RowSource) -> tuple[Callable[[Tensor], dict[str, Tensor]], dict[str, Tensor]]:
        """The residual's codec fitted to ``source`` (the rows of ``T - A B``): ``(encode_rows, fixed roles)``, each
        role prefixed ``R.``."""
        assert self.residual is not None
        enc = self.residual.encoder(source)
        if enc is None:
            raise UsageError(f"an svd residual's codec ({self.residual.name}) must encode in row batches")
        encode = enc.encode_rows

        def encode_rows(rows: Tensor) -> dict[str, Tensor]:
            return {f"R.{role}": t for role, t in encode(rows).items()}

        return encode_rows, {f"R.{role}": t for role, t in enc.fixed.items()}

    def sub_access(self, access: TensorAccess, prefix: str) -> PrefixedAccess:
        """The roles of a nested codec (``A.``, ``B.``, ``R.``) as that codec's access: for a bundle's access the same
        object on every lookup, so the nested codec's per-access caches (a ``mixed`` codec's checked views) hold."""
        if not getattr(access, "stable_views", False):
            return PrefixedAccess(access, prefix)
        hit = self._sub_memo.get(prefix)
        if hit is not None and hit[0]() is access:
            return hit[1]
        view = PrefixedAccess(access, prefix)
        self._sub_memo[prefix] = (weakref.ref(access), view)
        return view

    def add_residual(self, access: TensorAccess, ids: Tensor, out: Tensor) -> None:
        """``out += R[ids]`` when there is a residual: the last step of every decode, so all give the same values."""
        if self.residual is not None:
            out.add_(self.residual.decode_rows(self.sub_access(access, "R."), ids))

    def decode_rows(self, access: TensorAccess, ids: Tensor) -> Tensor:
        a = self.a_codec.decode_rows(self.sub_access(access, "A."), ids)  # (n, r)
        out = a @ self.b_f32(access)  # (n, h)
        self.add_residual(access, ids, out)
        return out

    def decode_into(self, access: TensorAccess, ids: Tensor, out: Tensor) -> None:
        a = torch.empty(ids.numel(), self.rank, dtype=torch.float32)
        self.a_codec.decode_into(self.sub_access(access, "A."), ids, a)
        torch.mm(a, self.b_f32(access), out=out)
        self.add_residual(access, ids, out)

    def decode_into_shared(self, access: TensorAccess, ids: Tensor, out: Tensor, cache: dict[str, Tensor]) -> None:
        """A shared ``A``'s rows are decoded once per lookup (the first layer's), every layer multiplies them."""
        if self.shared is None:
            self.decode_into(access, ids, out)
            return
        key = self._key_memo
        if key is None or key[0] is not self.a_codec:  # json of the params: once per A codec, not per lookup
            key = self._key_memo = (self.a_codec, self.shared_key() or "")
        key = key[1]
        a = cache.get(key)
        if a is None:
            a = cache[key] = torch.empty(ids.numel(), self.rank, dtype=torch.float32)
            self.a_codec.decode_into(self.sub_access(access, "A."), ids, a)
        torch.mm(a, self.b_f32(access), out=out)
        self.add_residual(access, ids, out)


class ResidualRows:
    """A :class:`~tolcli.codecs.base.RowSource` of what a factorisation leaves: each row batch of ``source`` minus
    ``base(first row, rows)`` (what the factors decode those rows to)."""

    def __init__(self, source: RowSource, base: Callable[[int, Tensor], Tensor]):
        self.source, self.base = source, base
        self.rows, self.width = source.rows, source.width

    def batches(self) -> Iterator[tuple[int, Tensor]]:
        for s, rows in self.source.batches():
            yield s, rows - self.base(s, rows)


def _check_row_wise(codec: Codec | type[Codec], factor: str = "A") -> None:
    if not codec.row_wise:
        row_wise = ", ".join(sorted(n for n, c in Codec.registry.items() if c.row_wise))
        what = f"{codec.name} with center=true" if getattr(codec, "center", False) is True else codec.name
        raise UsageError(f"the svd {factor} factor needs a row-wise codec ({row_wise}), not {what}")


@dataclass(frozen=True)
class SVD(RankedSpec):
    """``svd(rank=R|ratio=F|budget=B|energy=E, a=dense(dtype=fp16), method=exact, ...)``: :class:`SVDCodec`.

    ``a`` is the spec of the ``A`` factor's codec (any row-wise one: ``a=int4(group=32)``); ``B`` is fp16.
    ``method`` is ``exact`` (with ``gram``: ``fp32`` products, fast, or ``fp64``, for spectra spanning more than
    six decades) or ``randomized`` (with ``oversample``, ``power_iters`` and ``seed``). ``normalize`` (a
    quantised ``A`` only): divide ``A``'s columns by powers of two near the square roots of their RMS, folding
    them into ``B`` (:func:`column_scales`). The rank options are :class:`~tolcli.codecs.base.RankedSpec`'s.
    ``b``: the spec of a row-wise codec for ``B``'s rows (default: dense fp16), e.g. ``b=int8``: what a cross-layer
    SVD's ``B`` [rank, layers x h] weighs at the paper's shapes (more than an int4 ``A``). ``residual``: the spec of a
    codec for what the factors leave, ``T - A B``, per layer (any codec but ``svd``; ``mixed(bits=0.9)``: the rows
    whose residual costs the most loss get bits, the rest none); a ``ratio`` or ``budget`` then counts its bytes and
    the rank takes what is left.

    ``cross_layer``: one factorisation of all present layers' tables side by side, ``[T_0 | T_1 | ...] ~ A [B_0 |
    B_1 | ...]``: every layer is a function of the same token embedding, so one ``A`` [V, rank] (stored once, as the
    tensors ``shared.0.A.*``) serves all layers, each with its own ``B_l`` [rank, h] (:mod:`tolcli.crosslayer`).
    ``rank``, ``ratio`` and ``budget`` then describe the whole bundle (``ratio``/``budget``: of all layers' fp16
    bytes); ``energy`` is per layer, so not with it.

    Example:
        >>> from tolcli.codecs import Int4
        >>> s = SVD(budget="0.25", a=Int4(group=32))
        >>> str(s), s.rank_step(), s.with_rank(64).build(128).params()["a"]["params"]
        ('svd(budget=0.25,a=int4(group=32))', 32, {'bits': 4, 'group_size': 32, 'symmetric': False, 'fit': 'mse'})
    """

    codec: ClassVar[type[Codec]] = SVDCodec
    a: CodecSpec = field(default_factory=lambda: Dense("fp16"))
    method: str = "exact"
    oversample: int = 10
    power_iters: int = 2
    seed: int = 0
    gram: str = DEFAULT_GRAM
    normalize: bool = True
    cross_layer: bool = False
    b: CodecSpec | None = None
    residual: CodecSpec | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cross_layer and self.energy is not None:
            raise UsageError("svd cross_layer chooses one rank for all layers: give rank, ratio or budget, not energy")
        check_method(self.method)
        check_gram(self.gram)
        if not self.cross_layer:  # a cross-layer A may be any codec (``mixed``: fitted to the whole A)
            _check_row_wise(self.a.codec)
        if self.b is not None:
            _check_row_wise(self.b.codec, "B")
        if isinstance(self.residual, SVD):
            raise UsageError("an svd's residual cannot be an svd itself")
        if self.oversample < 0 or self.power_iters < 0:
            raise UsageError(f"svd oversample and power_iters must be >= 0, got {self.oversample}, {self.power_iters}")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"svd seed must be within 0..2**63-1, got {self.seed}")

    def rank_step(self) -> int:
        return math.lcm(self.rank_multiple, self.a.width_multiple)  # ranks fill whole groups of A's codec

    @property
    def width_multiple(self) -> int:
        # B's rows and the residual's are the table's width
        return math.lcm(*(1 if s is None else s.width_multiple for s in (self.b, self.residual)))

    def build(self, width: int, *, weights: Tensor | None = None) -> SVDCodec:
        if self.rank is None:
            raise UsageError(f"{self}: the rank is chosen per layer (build with_rank(r))")
        return SVDCodec(
            self.rank,
            self.a.build(self.rank, weights=weights if self.cross_layer else None),
            "F16",
            method=self.method,
            oversample=self.oversample,
            power_iters=self.power_iters,
            seed=self.seed,
            weights=weights,
            gram=self.gram,
            normalize=self.normalize,
            shared=0 if self.cross_layer else None,
            b_codec=None if self.b is None else self.b.build(width),
            residual=None if self.residual is None else self.residual.build(width, weights=weights),
        )

    def spectrum(self, table: Tensor | RowSource, weights: Tensor | None) -> Tensor:
        return gram_spectrum(table, weights, dtype=GRAM_DTYPES[self.gram])[0]
