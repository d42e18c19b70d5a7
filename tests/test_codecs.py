"""Codecs against slow, obvious reference implementations, and their error bounds."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tolcli.codecs import NF4_LEVELS, Codec, DenseCodec, DictAccess, Int4Codec, Int8Codec, NF4Codec, SVDCodec
from tolcli.codecs.quant import pack_nibbles, unpack_nibbles
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
            if symmetric:
                s = f16_round(np.float32(np.abs(grp).max()) / np.float32(7.0), +1)
                q = [0 if s == 0 else int(min(7, max(-8, np.round(v / np.float32(s))))) + 8 for v in grp]
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
    x = table(50, 256, seed=1, scale=3.0)
    codec = Int4Codec(group, symmetric)
    enc = codec.encode(x)
    err = (_decode(codec, enc, 50) - x).abs().reshape(50, -1, group)
    step = enc["scales"].float().unsqueeze(-1)
    assert (err <= step / 2 * (1 + 1e-5) + 1e-6).all()


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
