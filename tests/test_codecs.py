"""Codecs against slow, obvious reference implementations, and their error bounds."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tolcli.codecs import (
    NF4_LEVELS,
    Codec,
    DenseCodec,
    DictAccess,
    Int2Codec,
    Int3Codec,
    Int4Codec,
    Int8Codec,
    NF4Codec,
    SVDCodec,
)
from tolcli.codecs.quant import pack_bits, pack_nibbles, unpack_bits, unpack_nibbles
from tolcli.codecs.svd import factorize, gram_spectrum
from tolcli.compress import allocate_ranks
from tolcli.errors import UsageError


def table(rows: int, cols: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * scale + 0.3 * torch.randn(1, cols, generator=g)


# ---- nibbles ---------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_nibble_packing_against_slow_reference(values: list[int]) -> None:
    codes = torch.tensor([values], dtype=torch.uint8)
    packed = pack_nibbles(codes)[0].tolist()
    slow = [values[2 * k] | (values[2 * k + 1] << 4) for k in range(len(values) // 2)]
    assert packed == slow
    assert unpack_nibbles(pack_nibbles(codes)).tolist() == [values]


# ---- slow references (numpy, one group at a time) ----------------------------------------------------------
def f16_round(x: float, direction: float) -> np.float16:
    y = np.float16(x)
    if (direction < 0 and float(y) > x) or (direction > 0 and float(y) < x):
        y = np.nextafter(y, np.float16(direction * np.inf))
    return y


def slow_int4(x: np.ndarray, group: int, symmetric: bool) -> tuple[list[int], list[float], list[float]]:
    codes, scales, offsets = [], [], []
    for row in x:
        for g0 in range(0, len(row), group):
            grp = row[g0 : g0 + group].astype(np.float32)
            if symmetric:  # llama.cpp Q4_0: the value of largest magnitude (signed, first if tied) / -8
                m = grp[int(np.argmax(np.abs(grp)))]
                s = -np.sign(m) * f16_round(abs(float(m)) / 8.0, +1) if m != 0 else np.float16(0)
                q = [8 if s == 0 else int(min(7, max(-8, np.round(v / np.float32(s))))) + 8 for v in grp]
            else:
                o = f16_round(float(grp.min()), -1)
                s = f16_round(np.float32(np.float32(grp.max()) - np.float32(o)) / np.float32(15.0), +1)
                q = [0 if s == 0 else int(min(15, max(0, np.round((v - np.float32(o)) / np.float32(s))))) for v in grp]
                offsets.append(float(o))
            scales.append(float(s))
            codes += q
    return codes, scales, offsets


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 64])
def test_int4_matches_slow_reference_bit_for_bit(symmetric: bool, group: int) -> None:
    x = table(7, 128, seed=group)
    enc = Int4Codec(group, symmetric).encode(x)
    codes, scales, offsets = slow_int4(x.numpy(), group, symmetric)
    assert unpack_nibbles(enc["codes"]).flatten().tolist() == codes
    assert enc["scales"].flatten().float().tolist() == scales
    if not symmetric:
        assert enc["offsets"].flatten().float().tolist() == offsets


def _decode(codec: Codec, tensors: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
    return codec.decode_rows(DictAccess(tensors), torch.arange(rows))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_within_half_a_step(symmetric: bool, group: int) -> None:
    # Min-max: every value inside its group's grid (asymmetric), or, symmetric (levels -8 .. 7 times a scale whose
    # magnitude is |m|/8 rounded up), every value within half a step except those above level 7.5, which clip to 7:
    # at most one step, since no value exceeds |m| = 8 steps.
    x = table(50, 256, seed=1, scale=3.0)
    codec = Int4Codec(group, symmetric)
    enc = codec.encode(x)
    err = (_decode(codec, enc, 50) - x).abs().reshape(50, -1, group)
    step = enc["scales"].float().abs().unsqueeze(-1)
    level = x.reshape(50, -1, group) / enc["scales"].float().unsqueeze(-1)
    inside = level <= 7.5 if symmetric else torch.ones_like(err, dtype=torch.bool)
    assert (err[inside] <= (step / 2).expand_as(err)[inside] * (1 + 1e-5) + 1e-6).all()
    assert (err <= step * (1 + 1e-5) + 1e-6).all()
    if symmetric:
        assert int((~inside).sum()) > 0  # this table has values that clip


def test_symmetric_int4_uses_level_minus_8_like_q4_0() -> None:
    # Issue 16 item 5: absmax/7 never used code 0 (level -8), one of 16 levels wasted. llama.cpp's Q4_0 rule,
    # scale = m / -8 for the group's value m of largest magnitude, gives m code 0 and decodes it to m within
    # fp16's rounding of the scale (|scale| rounded up: at most 2^-11 relative).
    x = table(64, 128, seed=11)
    enc = Int4Codec(64, symmetric=True).encode(x)
    codes = unpack_nibbles(enc["codes"]).reshape(64, 2, 64).long()
    xg = x.reshape(64, 2, 64)
    top = xg.abs().argmax(-1, keepdim=True)
    assert (codes.gather(-1, top) == 0).all()
    m = xg.gather(-1, top).squeeze(-1)
    assert torch.allclose(-8 * enc["scales"].float(), m, rtol=2**-10, atol=0)
    assert torch.bincount(codes.flatten(), minlength=16).min() > 0  # all 16 levels in use


# ---- fitting the scales: fit="mse" ---------------------------------------------------------------------------
FIT_CODECS = {
    "int4": lambda fit: Int4Codec(64, fit=fit),
    "int4-sym": lambda fit: Int4Codec(64, True, fit=fit),
    "nf4": lambda fit: NF4Codec(64, fit=fit),
    "int8": lambda fit: Int8Codec(128, fit=fit),
    "int3": lambda fit: Int3Codec(64, fit=fit),
    "int2": lambda fit: Int2Codec(32, fit=fit),
}


def _levels(codec: Codec) -> torch.Tensor:
    """Each codec's decode levels, from docs/bundle-format.md (x = level * scale + offset)."""
    if isinstance(codec, NF4Codec):
        return NF4_LEVELS
    if isinstance(codec, Int8Codec):
        return torch.arange(-127.0, 128.0)
    if isinstance(codec, Int4Codec) and codec.symmetric:
        return torch.arange(-8.0, 8.0)
    bits = 4 if isinstance(codec, Int4Codec) else codec.bits
    return torch.arange(0.0, 2.0**bits)


@pytest.mark.parametrize("name", sorted(FIT_CODECS))
def test_mse_fit_is_never_worse_per_group_and_codes_are_nearest(name: str) -> None:
    x = table(40, 128, seed=5) ** 3  # heavy tails: where clipping pays
    errs = {}
    for fit in ("minmax", "mse"):
        codec = FIT_CODECS[name](fit)
        enc = codec.encode(x)
        dec = _decode(codec, enc, 40)
        g = codec.group_size
        errs[fit] = (dec - x).pow(2).reshape(40, -1, g).sum(-1)
        # every value got the level nearest it under its group's stored scale and offset (brute force over levels)
        s = enc["scales"].float().repeat_interleave(g, 1)
        o = enc["offsets"].float().repeat_interleave(g, 1) if "offsets" in enc else torch.zeros_like(s)
        best = (_levels(codec) * s.unsqueeze(-1) + o.unsqueeze(-1) - x.unsqueeze(-1)).abs().min(-1).values
        assert torch.allclose((dec - x).abs(), best, rtol=1e-5, atol=1e-6)
    assert (errs["mse"] <= errs["minmax"] * (1 + 1e-6)).all()
    assert errs["mse"].sum() < (0.995 if name == "int8" else 0.97) * errs["minmax"].sum()  # 255 levels: little to win


# Max (1960), "Quantizing for minimum distortion", Table II: the mean squared error of the best uniform quantiser
# with N levels for a unit Gaussian.
MAX_UNIFORM_MSE = {4: 0.1188, 8: 0.03744, 16: 0.01154}


@pytest.mark.parametrize(("name", "levels"), [("int2", 4), ("int3", 8), ("int4", 16)])
def test_mse_fit_beats_the_best_fixed_uniform_quantiser_on_gaussians(name: str, levels: int) -> None:
    # Each group could use Max's population-optimal uniform quantiser (an asymmetric grid centred on 0), so
    # fitting each group must do at least as well on average; the min-max grid, spread over each group's
    # extremes, does worse at 2 bits.
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    mse = {}
    for fit in ("minmax", "mse"):
        codec = FIT_CODECS[name](fit)
        mse[fit] = float((_decode(codec, codec.encode(x), 256) - x).pow(2).mean())
    assert mse["mse"] <= MAX_UNIFORM_MSE[levels]
    if levels == 4:
        assert mse["minmax"] > MAX_UNIFORM_MSE[levels]


def _clipping_search_only(x: torch.Tensor, codec: Codec) -> float:
    """The squared error of the clipping search alone (docs/compression.md, "Fitting scales"): the min-max grid
    shrunk about its centre by 1.0, 0.95, ..., 0.3, scale and offset rounded to fp16, each value at its nearest
    level, the best ratio per group. Written here from the description, not from the codec."""
    g, lv = codec.group_size, _levels(codec)
    xg = x.reshape(x.shape[0], -1, g)
    lo, hi = xg.min(-1, keepdim=True).values, xg.max(-1, keepdim=True).values
    n = len(lv) - 1
    s0, o0 = ((hi - lo) / n).half().float(), lo.half().float()
    best = None
    for i in range(15):
        s = s0 * (1 - 0.05 * i)
        o = o0 + (s0 - s) * n / 2  # the same centre
        s, o = s.half().float(), o.half().float()
        err = (lv * s.unsqueeze(-1) + o.unsqueeze(-1) - xg.unsqueeze(-1)).abs().min(-1).values.pow(2).sum(-1)
        best = err if best is None else torch.minimum(best, err)
    assert best is not None
    return float(best.sum())


@pytest.mark.parametrize("name", ["int4", "int3", "int2"])
def test_the_least_squares_refit_pays_beyond_the_clipping_search(name: str) -> None:
    # Least squares moves each group's scale and offset off the clipping grid: on Gaussians it cuts the squared
    # error of the best clipping ratio by 5-8% (measured 0.937 / 0.946 / 0.922 of it), on heavy tails by 30%+.
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    codec = FIT_CODECS[name]("mse")
    fitted = float((_decode(codec, codec.encode(x), 256) - x).pow(2).sum())
    assert fitted < 0.97 * _clipping_search_only(x, codec)


# ---- centring on the mean row (center=true) ---------------------------------------------------------------------
CENTRED = {
    "int4": lambda c: Int4Codec(64, fit="mse", center=c),
    "int4-sym": lambda c: Int4Codec(32, True, center=c),
    "nf4": lambda c: NF4Codec(64, center=c),
    "int8": lambda c: Int8Codec(32, center=c),
    "int3": lambda c: Int3Codec(64, fit="mse", center=c),
    "int2": lambda c: Int2Codec(32, center=c),
}


@pytest.mark.parametrize("name", sorted(CENTRED))
def test_centred_codes_are_the_plain_codes_of_the_table_minus_its_mean_row(name: str) -> None:
    # A table whose rows share a strong mean row (as ToL rows do: every token's FFN output has a common part).
    g = torch.Generator().manual_seed(9)
    x = torch.randn(300, 128, generator=g) * 0.3 + torch.randn(1, 128, generator=g) * 3
    centred, plain = CENTRED[name](True), CENTRED[name](False)
    enc = centred.encode(x)
    mean = (x.double().sum(0, keepdim=True) / 300).float()  # the format's definition: fp64 sum / count, as fp32
    assert torch.equal(enc["mean"], mean)
    want = plain.encode(x - mean)
    assert set(enc) == {*want, "mean"} and all(torch.equal(enc[k], want[k]) for k in want)
    dec = _decode(centred, enc, 300)
    assert torch.equal(dec, _decode(plain, want, 300) + mean)  # decode: the plain formula, then + mean (fp32)
    out = torch.empty(300, 128)
    centred.decode_into(DictAccess(enc), torch.arange(300), out)
    assert torch.equal(out, dec)
    # coding the residual: every group's range shrinks from the mean's spread to the rows' own
    assert (dec - x).pow(2).sum() < 0.5 * (_decode(plain, plain.encode(x), 300) - x).pow(2).sum()
    assert (
        centred.params() == {**plain.params(), "center": True}
        and type(centred).from_params(centred.params()).params() == centred.params()
    )
    assert centred.tensor_specs(300, 128)["mean"] == ((1, 128), "F32") and centred.nibble_pairs() is None


def test_centred_streamed_batches_give_the_whole_table_bytes() -> None:
    from tolcli.codecs.base import TableRows

    x = table(1000, 64, seed=3) + 2.0
    codec = Int4Codec(32, fit="mse", center=True)
    whole = codec.encode(x)
    enc = codec.encoder(TableRows(x, 128))
    assert enc is not None
    batches = [enc.encode_rows(x[s : s + 128]) for s in range(0, 1000, 128)]
    for role in ("codes", "scales", "offsets"):
        assert torch.equal(torch.cat([b[role] for b in batches]), whole[role]), role
    assert torch.equal(enc.fixed["mean"], whole["mean"])


def test_fit_is_recorded_only_when_not_min_max() -> None:
    # min-max bundles keep the params every earlier tolcli wrote; readers default a missing `fit` to min-max
    assert Int4Codec(64).params() == {"bits": 4, "group_size": 64, "symmetric": False}
    assert NF4Codec(32, "mse").params() == {"bits": 4, "group_size": 32, "fit": "mse"}
    assert Int3Codec.from_params({"bits": 3, "group_size": 64}).fit == "minmax"
    with pytest.raises(UsageError, match="fit must be one of mse, minmax"):
        Int8Codec(8, "lsq")


def test_int8_error_within_half_a_step_per_row_and_group() -> None:
    x = table(40, 96, seed=2)
    for group in (96, 32):
        codec = Int8Codec(group)
        enc = codec.encode(x)
        assert enc["codes"].dtype == torch.int8 and enc["scales"].shape == (40, 96 // group)
        err = (_decode(codec, enc, 40) - x).abs().reshape(40, -1, group)
        assert (err <= enc["scales"].float().unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-7).all()


def test_nf4_picks_the_nearest_level() -> None:
    x = table(30, 128, seed=3)
    codec = NF4Codec(64)
    enc = codec.encode(x)
    s = enc["scales"].float().reshape(30, 2, 1)
    normed = (x.reshape(30, 2, 64) / s).unsqueeze(-1)  # (R, G, g, 1)
    nearest = (normed - NF4_LEVELS).abs().argmin(-1).flatten()
    assert unpack_nibbles(enc["codes"]).flatten().long().tolist() == nearest.tolist()
    gap = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max())
    assert ((_decode(codec, enc, 30) - x).abs().reshape(30, 2, 64) <= gap / 2 * s + 1e-6).all()


@pytest.mark.parametrize(
    "codec",
    [
        DenseCodec("F32"),
        DenseCodec("bf16"),
        Int4Codec(64),
        Int4Codec(32, True),
        NF4Codec(128),
        Int8Codec(128),
        SVDCodec(16),
        SVDCodec(32, Int4Codec(32)),
        SVDCodec(8, Int8Codec(8), "F32"),
    ],
)
def test_specs_match_encoding_and_round_trip_params(codec: Codec) -> None:
    x = table(33, 128)
    enc = codec.encode(x)
    specs = codec.tensor_specs(33, 128)
    assert set(enc) == set(specs)
    from tolcli.dtypes import DTYPES

    for role, t in enc.items():
        assert tuple(t.shape) == specs[role][0] and t.dtype == DTYPES[specs[role][1]].torch, role
    assert codec.stored_bytes(33, 128) == sum(t.numel() * t.element_size() for t in enc.values())
    again = type(codec).from_params(codec.params())
    assert torch.equal(_decode(again, enc, 33), _decode(codec, enc, 33))


def test_group_must_divide_width() -> None:
    with pytest.raises(UsageError, match="not a multiple"):
        Int4Codec(64).encode(table(3, 96))
    with pytest.raises(UsageError, match="group size must be one of"):
        Int4Codec(48)


# ---- SVD ---------------------------------------------------------------------------------------------------
def low_rankish(rows: int = 300, cols: int = 64, decay: float = 0.85, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, cols, generator=g)).Q
    v = torch.linalg.qr(torch.randn(cols, cols, generator=g)).Q
    return (u * decay ** torch.arange(cols).float()) @ v.T * 10


def test_full_rank_svd_reproduces_the_table() -> None:
    x = low_rankish()
    codec = SVDCodec(64, DenseCodec("F32"), "F32")
    rec = _decode(codec, codec.encode(x), 300)
    assert ((rec - x).norm() / x.norm()).item() <= 1e-5


def test_error_falls_monotonically_with_rank_and_matches_the_spectrum() -> None:
    x = low_rankish()
    evals, _ = gram_spectrum(x)
    errs = []
    for r in (4, 8, 16, 32, 48):
        a, b = factorize(x, r)
        sq = float((a @ b - x).double().pow(2).sum())
        assert math.isclose(sq, float(evals[r:].sum()), rel_tol=1e-3)  # Eckart-Young
        errs.append(sq)
    assert errs == sorted(errs, reverse=True) and len(set(errs)) == len(errs)


def test_randomized_svd_is_close_to_exact_and_deterministic() -> None:
    x = low_rankish(decay=0.7)
    a0, b0 = factorize(x, 8)
    exact = float((a0 @ b0 - x).pow(2).sum())
    a1, b1 = factorize(x, 8, method="randomized", seed=5)
    a2, b2 = factorize(x, 8, method="randomized", seed=5)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert float((a1 @ b1 - x).pow(2).sum()) <= exact * 1.01


def test_weighted_svd_lowers_the_weighted_error() -> None:
    x = low_rankish(decay=0.95, seed=3)
    w = torch.ones(300, dtype=torch.float64)
    w[:30] = 200.0  # a few very frequent tokens
    a, b = factorize(x, 8)
    aw, bw = factorize(x, 8, weights=w)

    def werr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((w * (a @ b - x).double().pow(2).sum(1)).sum())

    assert werr(aw, bw) < werr(a, b)


def test_greedy_allocation_is_optimal_against_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    spectra = {
        i: torch.sort(torch.rand(12, generator=g, dtype=torch.float64) ** (i + 1), descending=True).values
        for i in range(3)
    }
    for budget_steps in range(3, 25):
        ranks = allocate_ranks(spectra, 10.0, budget_steps * 20, multiple=2, min_rank=2, max_rank=12)
        best = min(
            (sum(float(spectra[i][r:].sum()) for i, r in enumerate(rs)), rs)
            for rs in itertools.product(range(2, 13, 2), repeat=3)
            if sum(rs) * 10 <= budget_steps * 20
        )
        got = sum(float(spectra[i][r:].sum()) for i, r in ranks.items())
        assert got <= best[0] + 1e-12, (budget_steps, ranks, best)


# ---- int3 / int2: bit-packed codes, against the documented format -------------------------------------------
def slow_lowbit_encode(x: np.ndarray, group: int, bits: int) -> tuple[list[int], list[float], list[float]]:
    """The min-max rule of docs/bundle-format.md, one group at a time: offset = min rounded down to fp16, scale =
    (max - offset) / (2^bits - 1) rounded up, code = clamp(rint((x - offset) / scale))."""
    top = 2**bits - 1
    codes, scales, offsets = [], [], []
    for row in x:
        for g0 in range(0, len(row), group):
            grp = row[g0 : g0 + group].astype(np.float32)
            o = f16_round(float(grp.min()), -1)
            s = f16_round(np.float32(np.float32(grp.max()) - np.float32(o)) / np.float32(top), +1)
            codes += [
                0 if s == 0 else int(min(top, max(0, np.round((v - np.float32(o)) / np.float32(s))))) for v in grp
            ]
            scales.append(float(s))
            offsets.append(float(o))
    return codes, scales, offsets


def slow_lowbit_decode_row(
    packed: bytes, scales: list[float], offsets: list[float], bits: int, group: int, width: int
) -> list[float]:
    """docs/bundle-format.md: a row's codes are one little-endian bit stream; code j is stream bits
    j*bits .. j*bits+bits-1 (least significant first), stream bit i is bit i % 8 of byte i // 8."""
    out = []
    for j in range(width):
        q = sum(((packed[(j * bits + k) // 8] >> ((j * bits + k) % 8)) & 1) << k for k in range(bits))
        out.append(float(np.float32(q) * np.float32(scales[j // group]) + np.float32(offsets[j // group])))
    return out


@pytest.mark.parametrize(("cls", "bits"), [(Int3Codec, 3), (Int2Codec, 2)])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("fit", ["minmax", "mse"])
def test_lowbit_against_slow_encoder_and_decoder(cls: type, bits: int, group: int, fit: str) -> None:
    x = table(6, 128, seed=bits * group)
    codec = cls(group, fit=fit)
    enc = codec.encode(x)
    assert {r: (tuple(t.shape), t.dtype) for r, t in enc.items()} == {
        "codes": ((6, 128 * bits // 8), torch.uint8),
        "scales": ((6, 128 // group), torch.float16),
        "offsets": ((6, 128 // group), torch.float16),
    }
    assert codec.stored_bytes(6, 128) == 6 * (128 * bits // 8 + 4 * 128 // group)
    got = _decode(codec, enc, 6)
    for r in range(6):
        sc, of = enc["scales"][r].float().tolist(), enc["offsets"][r].float().tolist()
        ref = slow_lowbit_decode_row(bytes(enc["codes"][r].tolist()), sc, of, bits, group, 128)
        assert got[r].tolist() == ref
    if fit == "minmax":
        codes, scales, offsets = slow_lowbit_encode(x.numpy(), group, bits)
        stream = [slow_lowbit_decode_row(bytes(enc["codes"][r].tolist()), [1.0] * 4, [0.0] * 4, bits, group, 128)
                  for r in range(6)]  # fmt: skip
        assert [int(q) for row in stream for q in row] == codes
        assert enc["scales"].flatten().float().tolist() == scales
        assert enc["offsets"].flatten().float().tolist() == offsets
        step = enc["scales"].float().repeat_interleave(group, 1)
        assert ((got - x).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.data())
def test_bit_packing_against_slow_reference(bits: int, data: st.DataObject) -> None:
    n = 8 * data.draw(st.integers(1, 6))
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n))
    packed = pack_bits(torch.tensor([values], dtype=torch.uint8), bits)[0].tolist()
    stream = "".join(format(v, f"0{bits}b")[::-1] for v in values)  # each code least significant bit first
    assert packed == [int(stream[8 * k : 8 * k + 8][::-1], 2) for k in range(len(stream) // 8)]
    assert unpack_bits(torch.tensor([packed], dtype=torch.uint8), bits)[0].tolist() == values
    if bits == 4:
        assert packed == pack_nibbles(torch.tensor([values], dtype=torch.uint8))[0].tolist()


# ---- svd: the A factor's columns normalised -----------------------------------------------------------------
def decaying_table(V: int, h: int, decay: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(V, h, generator=g)).Q
    v = torch.linalg.qr(torch.randn(h, h, generator=g)).Q
    return (u * decay ** torch.arange(h).float()) @ v.T * 30


def test_svd_int4_normalised_columns_cut_the_error_and_decode_as_a_times_b() -> None:
    # Issue 16 item 5: A = T V_r has column norms sigma_j, falling 10x along a group of 32 of the rank axis here;
    # quantising it as is (the reference below: factorize, then int4 on A, then A @ B in fp16) wastes the later
    # columns' levels. Scaling the columns by the square roots of their RMS (powers of two folded into B) must cut
    # the quantisation error (against the unquantised rank-32 product A @ B).
    t = decaying_table(1024, 64, 0.93, 0)
    a, b = factorize(t, 32, gram="fp32")
    a_codec = Int4Codec(32, fit="minmax")
    plain = _decode(a_codec, a_codec.encode(a), 1024) @ b.half().float()
    codec = SVDCodec(32, Int4Codec(32, fit="minmax"), normalize=True)
    enc = codec.encode(t)
    got = _decode(codec, enc, 1024)
    assert float((got - a @ b).norm()) < 0.85 * float((plain - a @ b).norm())  # measured: 0.80
    a_dec = _decode(a_codec, {k[2:]: v for k, v in enc.items() if k.startswith("A.")}, 1024)
    assert torch.equal(got, a_dec @ enc["B"].float())  # decoding is A @ B, as for every svd bundle
    ratio = a_dec.pow(2).mean(0).sqrt() / a.pow(2).mean(0).sqrt().sqrt()
    assert ((ratio > 0.65) & (ratio < 1.5)).all()  # RMS ** 0.5, up to a power of two (and int4's error)
    scale = enc["B"].float().norm(dim=1)  # B = diag(d) V_r^T: its row norms are the powers of two d
    assert torch.allclose(scale, torch.exp2(torch.round(torch.log2(scale))), rtol=1e-3)  # up to fp16 rounding
    assert codec.params()["normalize"] is True
    assert "normalize" not in SVDCodec(32, Int4Codec(32)).params()  # bundles written before it read as before
    assert "normalize" not in SVDCodec(32, DenseCodec("F16"), normalize=True).params()  # a dense A is not scaled


# ---- scale searches in blocks ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("rows", "width", "chunk"), [(10, 4, 12), (9, 4, 12), (3, 8, 4), (0, 8, 16), (5, 2, 100)])
def test_fit_chunks_cover_every_row_once_in_order(monkeypatch, rows: int, width: int, chunk: int) -> None:
    import tolcli.codecs.base as base

    monkeypatch.setattr(base, "FIT_CHUNK_VALUES", chunk)
    blocks = list(base.fit_chunks(rows, width))
    step = max(1, chunk // width)  # rows per block: the most whose values fit in `chunk`, at least one
    assert [list(range(rows))[b] for b in blocks] == [
        list(range(s, min(s + step, rows))) for s in range(0, max(rows, 1), step)
    ]  # no rows: one empty block


def _bitwise(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous().view(torch.uint8)


def test_blocked_scale_searches_equal_one_block(monkeypatch) -> None:
    """Every group is fitted alone, so fitting 7 rows at a time must give the whole batch's result bit for bit (a
    misordered or dropped block changes it)."""
    import tolcli.codecs.base as base
    from tolcli.codecs.mixed import fit_group_codes
    from tolcli.codecs.quant import quantize_int4, quantize_int8, quantize_lowbit, quantize_nf4

    x = table(45, 128, seed=11) ** 3  # heavy tails: the clipping search moves
    x[3] = 0.0  # a constant group: its scale kept, not refitted
    fits = {
        "mixed 2 bits": lambda: fit_group_codes(x.reshape(45, 4, 32), 2),
        "mixed 5 bits": lambda: fit_group_codes(x.reshape(45, 2, 64), 5),
        "int4": lambda: quantize_int4(x, 64, False, "mse"),
        "int4 symmetric": lambda: quantize_int4(x, 32, True, "mse"),
        "nf4": lambda: quantize_nf4(x, 64, "mse"),
        "int8": lambda: quantize_int8(x, 128, "mse"),
        "int3": lambda: quantize_lowbit(x, 64, 3, "mse"),
    }
    for name, fit in fits.items():
        monkeypatch.setattr(base, "FIT_CHUNK_VALUES", 1 << 40)
        whole = fit()
        monkeypatch.setattr(base, "FIT_CHUNK_VALUES", 7 * 128)  # 7 rows a block: 7 blocks, the last of 3 rows
        blocked = fit()
        assert len(whole) == len(blocked), name
        for a, b in zip(whole, blocked, strict=True):
            assert (a is None) == (b is None), name
            if a is not None:
                assert a.shape == b.shape and a.dtype == b.dtype, name
                assert torch.equal(_bitwise(a), _bitwise(b)), name


@pytest.mark.parametrize("name", sorted(FIT_CODECS))
def test_zero_and_constant_groups_get_the_level_nearest_zero_and_decode_exactly(name: str) -> None:
    """A group with nothing to spread has scale 0 (asymmetric codes: the offset holds the value) and, by
    docs/bundle-format.md, the code of the level nearest 0 (a tie: the lower). 0.375 is exact in fp16."""
    x = torch.zeros(2, 128)
    x[1] = 0.375
    codec = FIT_CODECS[name]("mse")
    enc = codec.encode(x)
    dec = _decode(codec, enc, 2)
    assert (dec[0] == 0).all()
    levels = _levels(codec)
    zero_level = int(levels.abs().argmin())  # argmin takes the first (lower) of equal magnitudes
    codes = enc["codes"][0]
    if isinstance(codec, Int8Codec):
        assert (codes == 0).all()  # int8 stores the level itself
    elif isinstance(codec, (Int4Codec, NF4Codec)):
        assert (codes == zero_level | zero_level << 4).all()  # two 4-bit codes a byte
    else:
        assert zero_level == 0 and (codes == 0).all()
    if "offsets" in enc:  # asymmetric: the constant row too has scale 0, code 0, its value in the offset
        assert (enc["scales"][1] == 0).all() and (enc["codes"][1] == 0).all()
        assert (enc["offsets"][1].float() == 0.375).all() and (dec[1] == 0.375).all()


def test_scale_searches_do_not_depend_on_the_inputs_memory_layout() -> None:
    """The same values column-major (a transposed view's layout) must give the same bits as row-major: the group
    sums must not add in the layout's order (they did when a search kept its input's strides)."""
    from tolcli.codecs.mixed import fit_group_codes, quantize_class
    from tolcli.codecs.quant import quantize_int4, quantize_nf4

    x = table(48, 128, seed=3) + 1000.0  # a large offset: the sums' rounding decides between clipping candidates
    xt = x.t().contiguous().t()
    assert torch.equal(x, xt) and xt.stride() != x.stride()
    fits = {
        "mixed 1 bit": lambda t: fit_group_codes(t.reshape(48, 4, 32), 1),
        "mixed class 8 bits": lambda t: quantize_class(t, 8, 32),
        "int4": lambda t: quantize_int4(t, 32, False, "mse"),
        "nf4": lambda t: quantize_nf4(t, 64, "mse"),
    }
    for name, fit in fits.items():
        for a, b in zip(fit(x), fit(xt), strict=True):
            assert torch.equal(_bitwise(a), _bitwise(b)), name
