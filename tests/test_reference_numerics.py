"""Numerics checked against derivations made here: closed forms, brute force, slow references, published tables.

No expected value below is computed by the code under test. Mutants these tests must kill: ``mutants/numerics.toml``.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from statistics import NormalDist

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tolcli.codecs import DictAccess, Int4Codec, Int8Codec
from tolcli.codecs.quant import (
    NF4_LEVELS,
    dequantize_int8,
    dequantize_nf4,
    quantize_int4,
    quantize_int8,
    quantize_nf4,
)
from tolcli.codecs.svd import factorize, gram_spectrum
from tolcli.scoring import compare, plan_windows, window_batches


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Turn a hang (e.g. a window loop that never advances) into a failure instead of a stuck run."""

    def _raise(signum: int, frame: object) -> None:
        raise TimeoutError(f"took longer than {seconds} s (loop not advancing?)")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ==== 1. KL(ref || variant), top-1 agreement and NLL in evaluate.compare ==================================
VARIANT = object()  # sentinel ContextFreeSource: the fake model answers it with the variant logits

# Hand-picked logits for 5 positions over a 4-token vocabulary. The reference is peaked, the variant flat,
# so KL(ref || var) and KL(var || ref) differ clearly. Row argmaxes: ref 0,1,2,3,3 / var 0,0,2,1,3: they
# agree at positions 0, 2 and 4 -> 3 of 5 (counted by hand).
REF_LOGITS = [
    [3.0, 0.5, -1.0, 0.0],
    [0.2, 2.5, 0.1, -0.5],
    [-1.0, 0.0, 4.0, 1.0],
    [1.0, 1.2, 0.3, 2.0],
    [0.0, -2.0, 0.5, 3.5],
]
VAR_LOGITS = [
    [1.0, 0.8, 0.0, 0.2],
    [1.5, 0.5, 0.4, 0.0],
    [0.0, 0.5, 1.5, 1.2],
    [0.3, 1.8, 0.2, 0.9],
    [0.5, 0.0, 0.4, 1.0],
]
HAND_TOP1_AGREE = 3
# t_0 .. t_5; the targets t_1..t_5 = 2,3,0,0,1 never equal the variant's argmax (so comparing argmaxes
# with the targets instead of with the reference's argmax gives 0, not 3).
TOKENS = [0, 2, 3, 0, 0, 1]


class FixedLogits(torch.nn.Module):
    """Fake Transformer: fixed (1, T, V) logits chosen by ``source`` (None: reference, VARIANT: variant)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.ref = torch.tensor(REF_LOGITS)
        self.var = torch.tensor(VAR_LOGITS)

    def forward(self, idx: Tensor, source: object) -> Tensor:
        assert idx.shape == (1, len(REF_LOGITS)), idx.shape  # one window covering every target
        return (self.ref if source is None else self.var)[None]


def _log_softmax_py(row: list[float]) -> list[float]:
    """log softmax in plain python floats (nats)."""
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _kl_py(p_logits: list[list[float]], q_logits: list[list[float]]) -> float:
    """sum over positions of KL(p || q) = sum_v p_v (log p_v - log q_v), explicit double sum, nats."""
    total = 0.0
    for pr, qr in zip(p_logits, q_logits, strict=True):
        lp, lq = _log_softmax_py(pr), _log_softmax_py(qr)
        total += sum(math.exp(a) * (a - b) for a, b in zip(lp, lq, strict=True))
    return total


def test_compare_kl_top1_nll_against_hand_derivation() -> None:
    # Expected: KL from torch's kl_div (input = log q, target = log p -> KL(p || q)) and from an explicit
    # python double sum; top-1 from the hand count above; NLL from -sum of log_softmax at the targets.
    stats = compare(FixedLogits(), torch.tensor(TOKENS), [("ref", None), ("var", VARIANT)], ctx=16)
    ref, var = stats
    n = len(TOKENS) - 1

    ref_logp = F.log_softmax(torch.tensor(REF_LOGITS, dtype=torch.float64), dim=-1)
    var_logp = F.log_softmax(torch.tensor(VAR_LOGITS, dtype=torch.float64), dim=-1)
    kl_torch = F.kl_div(var_logp, ref_logp, log_target=True, reduction="sum").item()
    kl_py = _kl_py(REF_LOGITS, VAR_LOGITS)
    kl_reversed = _kl_py(VAR_LOGITS, REF_LOGITS)
    assert kl_torch == pytest.approx(kl_py, rel=1e-12)
    assert abs(kl_py - kl_reversed) > 0.3 * kl_py  # the data can tell the two directions apart

    assert var.tokens == ref.tokens == n
    assert var.kl_sum == pytest.approx(kl_py, rel=1e-5)
    assert var.mean_kl == pytest.approx(kl_py / n, rel=1e-5)
    assert abs(var.kl_sum - kl_reversed) > 0.2 * kl_py
    assert ref.kl_sum == 0.0

    assert var.top1_agree == HAND_TOP1_AGREE
    assert var.top1_agreement == pytest.approx(HAND_TOP1_AGREE / n)
    assert ref.top1_agree == n

    targets = TOKENS[1:]
    nll_ref = -sum(_log_softmax_py(r)[t] for r, t in zip(REF_LOGITS, targets, strict=True))
    nll_var = -sum(_log_softmax_py(r)[t] for r, t in zip(VAR_LOGITS, targets, strict=True))
    assert ref.nll_sum == pytest.approx(nll_ref, rel=1e-6)
    assert var.nll_sum == pytest.approx(nll_var, rel=1e-6)
    assert var.perplexity == pytest.approx(math.exp(nll_var / n), rel=1e-6)


class ContextFree(torch.nn.Module):
    """Fake Transformer whose logits at each position depend only on that position's input token."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.ref = torch.randn(vocab, vocab, generator=g) * 2.0
        self.var = self.ref + torch.randn(vocab, vocab, generator=g)

    def forward(self, idx: Tensor, source: object) -> Tensor:
        return (self.ref if source is None else self.var)[idx]


@pytest.mark.parametrize(("ctx", "stride", "batch"), [(4, 3, 2), (5, 5, 3), (6, 1, 4), (7, 4, 1)])
def test_compare_multi_window_sums_every_target_once(ctx: int, stride: int, batch: int) -> None:
    # Expected: a python sum over every target t_j (j = 1..n-1), each exactly once, of the per-position
    # quantities for input token t_{j-1}; the logits do not depend on context, so windows must not matter.
    vocab, n = 6, 23
    model = ContextFree(vocab)
    tokens = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(3))
    ref_rows, var_rows = model.ref.tolist(), model.var.tolist()
    toks = tokens.tolist()
    with time_limit(5.0):
        ref, var = compare(model, tokens, [("ref", None), ("var", VARIANT)], ctx=ctx, stride=stride, batch_size=batch)
    kl = sum(_kl_py([ref_rows[toks[j - 1]]], [var_rows[toks[j - 1]]]) for j in range(1, n))
    nll = -sum(_log_softmax_py(var_rows[toks[j - 1]])[toks[j]] for j in range(1, n))
    agree = sum(
        max(range(vocab), key=ref_rows[toks[j - 1]].__getitem__)
        == max(range(vocab), key=var_rows[toks[j - 1]].__getitem__)
        for j in range(1, n)
    )
    assert var.tokens == ref.tokens == n - 1
    assert ref.kl_sum == 0.0 and ref.top1_agree == n - 1
    assert var.kl_sum == pytest.approx(kl, rel=1e-5)
    assert var.nll_sum == pytest.approx(nll, rel=1e-5)
    assert var.top1_agree == agree


# ==== 2. NF4 levels =========================================================================================
# Published NF4 table: QLoRA paper (Dettmers et al. 2023) Appendix E / bitsandbytes, typed in by hand.
QLORA_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def qlora_normal_map(offset: float = 0.9677083) -> list[float]:
    """QLoRA's create_normal_map: 8 positive N(0,1) quantiles, 7 negative, and 0, divided by the max."""
    nd = NormalDist()

    def linspace(a: float, b: float, k: int) -> list[float]:
        return [a + (b - a) * i / (k - 1) for i in range(k)]

    pos = [nd.inv_cdf(p) for p in linspace(offset, 0.5, 9)[:-1]]
    neg = [-nd.inv_cdf(p) for p in linspace(offset, 0.5, 8)[:-1]]
    vals = sorted([*pos, 0.0, *neg])
    top = max(vals)
    return [v / top for v in vals]


def test_nf4_levels_match_published_table_and_normal_quantiles() -> None:
    # Expected: the published table (typed above) and the quantile construction it comes from.
    levels = NF4_LEVELS.tolist()
    assert len(levels) == 16
    assert levels == pytest.approx(QLORA_NF4, abs=1e-7)
    assert levels == pytest.approx(qlora_normal_map(), abs=1e-6)
    construction = qlora_normal_map()
    assert max(abs(a - b) for a, b in zip(QLORA_NF4, construction, strict=True)) < 1e-6  # table == construction


# ---- fp16 by exhaustion: every finite fp16 value, sorted --------------------------------------------------
_ALL_F16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
F16_SORTED = np.unique(_ALL_F16[np.isfinite(_ALL_F16)].astype(np.float64))


def f16_ceil(x: float) -> float:
    """The smallest fp16 >= x, by search over all fp16 values."""
    return float(F16_SORTED[np.searchsorted(F16_SORTED, x, side="left")])


def f16_floor(x: float) -> float:
    """The largest fp16 <= x, by search over all fp16 values."""
    return float(F16_SORTED[np.searchsorted(F16_SORTED, x, side="right") - 1])


def f16_below(x: float) -> float:
    """The largest fp16 < x."""
    return float(F16_SORTED[np.searchsorted(F16_SORTED, x, side="left") - 1])


def _unpack(packed: Tensor) -> np.ndarray:
    """Nibble order from the quant module docstring: byte k holds element 2k in bits 0-3, 2k+1 in 4-7."""
    p = packed.numpy().astype(np.int64)
    out = np.empty((p.shape[0], 2 * p.shape[1]), dtype=np.int64)
    out[:, 0::2] = p % 16
    out[:, 1::2] = p // 16
    return out


def test_nf4_quantize_picks_nearest_level() -> None:
    # Expected: scale = smallest fp16 >= group absmax (search over all fp16); code = argmin over the
    # published levels of |x / scale - level| (brute force).
    group = 32
    g = torch.Generator().manual_seed(11)
    x = torch.randn(12, 128, generator=g) * torch.rand(12, 1, generator=g) * 3
    x[0, :group] = 0.0  # an all-zero group
    x[1, 5] = -x[1, :group].abs().max() * 1.5  # a group whose absmax is negative
    codes, scale = quantize_nf4(x, group)
    levels = np.array(QLORA_NF4, dtype=np.float32).astype(np.float64)
    q = _unpack(codes)
    deq = dequantize_nf4(codes, scale, group).numpy()
    xs = x.numpy()
    for r in range(x.shape[0]):
        for g0 in range(0, x.shape[1], group):
            vals = xs[r, g0 : g0 + group]
            s = f16_ceil(float(np.abs(vals).max()))
            assert float(scale[r, g0 // group]) == s
            normed = (vals / np.float32(s)).astype(np.float64) if s > 0 else np.zeros(group)
            want = np.abs(normed[:, None] - levels[None, :]).argmin(1)
            assert q[r, g0 : g0 + group].tolist() == want.tolist(), (r, g0)
            assert deq[r, g0 : g0 + group].tolist() == (levels[want].astype(np.float32) * np.float32(s)).tolist()


# ==== 3. int8 ===============================================================================================
def slow_int8(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group reference: scale = smallest fp16 >= absmax/127 (the fp32 quotient), codes = clamp(rint)."""
    rows, cols = x.shape
    codes = np.zeros((rows, cols), dtype=np.int64)
    scales = np.zeros((rows, cols // group), dtype=np.float64)
    for r in range(rows):
        for k, g0 in enumerate(range(0, cols, group)):
            vals = x[r, g0 : g0 + group].astype(np.float32)
            s = f16_ceil(float(np.float32(np.abs(vals).max()) / np.float32(127.0)))
            scales[r, k] = s
            if s > 0:
                codes[r, g0 : g0 + group] = np.clip(np.rint(vals / np.float32(s)), -127, 127).astype(np.int64)
    return codes, scales


@pytest.mark.parametrize(("rows", "cols", "group"), [(9, 96, 32), (5, 60, 60), (4, 40, 8)])
def test_int8_matches_slow_reference_bit_for_bit(rows: int, cols: int, group: int) -> None:
    # Expected: slow_int8 above (numpy, one group at a time, fp16 by exhaustive search).
    g = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 2, rows)[:, None]
    x[0, :group] = 0.0
    codes, scale = quantize_int8(x, group)
    want_codes, want_scales = slow_int8(x.numpy(), group)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16
    assert codes.long().numpy().tolist() == want_codes.tolist()
    assert scale.double().numpy().tolist() == want_scales.tolist()
    want_deq = want_codes.astype(np.float32).reshape(rows, -1, group) * want_scales[:, :, None].astype(np.float32)
    deq = dequantize_int8(codes, scale, group)
    assert deq.numpy().tolist() == want_deq.reshape(rows, cols).tolist()
    codec = Int8Codec(group)
    decoded = codec.decode_rows(DictAccess(codec.encode(x)), torch.arange(rows))
    assert decoded.numpy().tolist() == want_deq.reshape(rows, cols).tolist()


def test_int8_uses_all_255_levels() -> None:
    # Expected: the group k/127, k = -127..127 (absmax 1) must come back as codes exactly k, so every one
    # of the 255 codes occurs (scale = f16 ceil of 1/127 differs from 1/127 by < 0.1 %, so no code moves).
    x = torch.linspace(-1.0, 1.0, 255)[None]
    perm = torch.randperm(255, generator=torch.Generator().manual_seed(0))
    x = torch.cat([x, x[:, perm]])
    codes, scale = quantize_int8(x, 255)
    assert codes[0].tolist() == list(range(-127, 128))
    assert codes[1].tolist() == [k - 127 for k in perm.tolist()]
    assert sorted(set(codes.flatten().tolist())) == list(range(-127, 128))
    assert float(scale[0, 0]) == f16_ceil(1 / 127)


def test_int8_scale_is_rounded_up_and_nothing_clips() -> None:
    # Expected, in exact rational arithmetic: fp16 scale >= absmax/127 (outward rounding, module docstring)
    # and the next fp16 below it < absmax/127 (the smallest such); hence |x| / scale <= 127 (no clipping)
    # and |x - dequant| <= scale / 2.
    group = 16
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 128, generator=g) * torch.logspace(-4, 3, 32)[:, None]
    codes, scale = quantize_int8(x, group)
    deq = dequantize_int8(codes, scale, group).double()
    xs = x.double()
    for r in range(x.shape[0]):
        for k in range(x.shape[1] // group):
            vals = xs[r, k * group : (k + 1) * group]
            amax = Fraction(float(vals.abs().max()))
            s = Fraction(float(scale[r, k]))
            assert s >= amax / 127, (r, k)
            assert Fraction(f16_below(float(s))) < amax / 127, (r, k)
            assert all(abs(Fraction(float(v))) <= 127 * s for v in vals)
            err = (vals - deq[r, k * group : (k + 1) * group]).abs().max().item()
            assert err <= float(s) / 2
    assert codes.abs().max().item() <= 127


# ---- int4 (slow reference, same construction as int8 with 15 / 7 steps) -----------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_matches_slow_reference(symmetric: bool) -> None:
    # Expected: asymmetric offset = largest fp16 <= min, scale = smallest fp16 >= (max - offset)/15,
    # codes = clamp(rint((x - offset)/scale), 0, 15); symmetric (llama.cpp Q4_0): scale = -sign(m) * (smallest fp16
    # >= |m|/8) for m the value of largest magnitude, codes = clamp(rint(x/scale), -8, 7) + 8. fp16 rounding by
    # exhaustive search; error <= |scale|/2 (one step where the opposite side clips at level 7).
    group = 32
    g = torch.Generator().manual_seed(21)
    x = torch.randn(6, 128, generator=g) * torch.logspace(-2, 2, 6)[:, None] + 0.4
    codes, scale, offset = quantize_int4(x, group, symmetric)
    q = _unpack(codes)
    xs = x.numpy()
    deq = Int4Codec(group, symmetric).decode_rows(
        DictAccess({"codes": codes, "scales": scale, **({} if offset is None else {"offsets": offset})}),
        torch.arange(6),
    )
    for r in range(x.shape[0]):
        for k, g0 in enumerate(range(0, x.shape[1], group)):
            vals = xs[r, g0 : g0 + group].astype(np.float32)
            if symmetric:  # llama.cpp's Q4_0 rule: the value of largest magnitude m gets level -8
                m = vals[int(np.argmax(np.abs(vals)))]
                s = -np.sign(m) * f16_ceil(float(abs(m) / np.float32(8.0)))
                want = np.clip(np.rint(vals / np.float32(s)), -8, 7) + 8
                back = (want.astype(np.float32) - np.float32(8)) * np.float32(s)
            else:
                o = f16_floor(float(vals.min()))
                assert float(offset[r, k]) == o
                s = f16_ceil(float((np.float32(vals.max()) - np.float32(o)) / np.float32(15.0)))
                want = np.clip(np.rint((vals - np.float32(o)) / np.float32(s)), 0, 15)
                back = want.astype(np.float32) * np.float32(s) + np.float32(o)
            assert float(scale[r, k]) == s
            assert q[r, g0 : g0 + group].tolist() == want.astype(np.int64).tolist()
            assert deq[r, g0 : g0 + group].numpy().tolist() == back.tolist()
            # within half a step, except values beyond level 7 (m's opposite side), which clip by at most one step
            bound = np.where(vals / np.float32(s) > 7.5, abs(s), abs(s) / 2) * (1 + 1e-6)
            assert (np.abs(vals.astype(np.float64) - back) <= bound).all()


# ==== 4./5. SVD =============================================================================================
def _orthonormal(rows: int, cols: int, g: torch.Generator) -> Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def _trunc_svd(m: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(best rank-r approximation, singular values) of a float64 matrix, by torch.linalg.svd (Eckart-Young)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r], s


def _weighted_problem(vocab: int, h: int, r: int, seed: int) -> tuple[Tensor, Tensor]:
    """(table fp32, weights fp32) with W T (W = diag(sqrt w)) having a clear spectral gap after rank r."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(vocab, generator=g, dtype=torch.float64) * 3.9 + 0.1  # weights in [0.1, 4]
    spectrum = torch.tensor([10.0 - i for i in range(r)] + [1.5 * 0.8**i for i in range(h - r)], dtype=torch.float64)
    wt = (_orthonormal(vocab, h, g) * spectrum) @ _orthonormal(h, h, g).T
    return (wt / w.sqrt()[:, None]).float(), w.float()


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_weighted_factorize_is_the_closed_form_optimum(method: str) -> None:
    # Expected: with W = diag(sqrt w), argmin over rank-r X of sum_t w_t ||T_t - X_t||^2 is
    # W^-1 truncSVD_r(W T) (Eckart-Young on W T), and the minimum is the sum of W T's discarded sigma^2.
    vocab, h, r = 150, 24, 5
    table, w = _weighted_problem(vocab, h, r, seed=1)
    t64, sw = table.double(), w.double().sqrt()[:, None]
    best_wt, sig = _trunc_svd(sw * t64, r)
    best = best_wt / sw
    a, b = factorize(table, r, method=method, weights=w)
    assert a.shape == (vocab, r) and b.shape == (r, h)
    recon = a.double() @ b.double()
    assert torch.linalg.norm(recon - best) <= 1e-5 * torch.linalg.norm(best)
    err = (w.double()[:, None] * (t64 - recon) ** 2).sum().item()
    assert err == pytest.approx((sig[r:] ** 2).sum().item(), rel=1e-4)
    # the unweighted optimum is a different answer here (the weights matter)
    plain, _ = _trunc_svd(t64, r)
    assert torch.linalg.norm(plain - best) > 1e-2 * torch.linalg.norm(best)


@pytest.mark.parametrize(("vocab", "h"), [(8192 + 300, 12), (200, 16), (10, 20)])
def test_gram_spectrum_equals_squared_singular_values(vocab: int, h: int) -> None:
    # Expected: eigenvalues of T^T T are svdvals(T)^2 (torch.linalg.svdvals in fp64), descending, padded
    # with zeros when V < h; the eigenvectors are T's right singular vectors (up to sign). 8492 rows cross
    # one accumulation block (8192 rows).
    g = torch.Generator().manual_seed(vocab)
    table = torch.randn(vocab, h, generator=g) * torch.linspace(3.0, 0.2, h)
    evals, evecs = gram_spectrum(table)
    sv = torch.linalg.svdvals(table.double())
    want = torch.zeros(h, dtype=torch.float64)
    want[: sv.numel()] = sv**2
    assert evals.dtype == torch.float64 and evals.shape == (h,)
    assert (evals >= 0).all()
    assert torch.allclose(evals, want, rtol=1e-9, atol=1e-9 * want[0].item())
    _, _, vh = torch.linalg.svd(table.double(), full_matrices=False)
    k = min(vocab, h)
    cos = (evecs[:, :k] * vh[:k].T).sum(0).abs()
    assert torch.allclose(cos, torch.ones(k, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize(("vocab", "h", "r"), [(180, 20, 6), (8192 + 40, 10, 3)])
def test_unweighted_factorize_error_is_discarded_energy(vocab: int, h: int, r: int) -> None:
    # Expected: Eckart-Young: ||T - A B||_F^2 = sum of svdvals(T)[r:]^2 and A B = truncSVD_r(T), both
    # computed with torch.linalg.svd in fp64.
    g = torch.Generator().manual_seed(r)
    table = torch.randn(vocab, h, generator=g) * torch.linspace(4.0, 0.5, h)
    a, b = factorize(table, r)
    recon = a.double() @ b.double()
    best, sig = _trunc_svd(table.double(), r)
    err = ((table.double() - recon) ** 2).sum().item()
    assert err == pytest.approx((sig[r:] ** 2).sum().item(), rel=1e-4)
    assert torch.linalg.norm(recon - best) <= 1e-4 * torch.linalg.norm(best)


# ==== 6. evaluation window plan =============================================================================
def brute_windows(n: int, ctx: int, stride: int) -> tuple[int, list[tuple[int, int]], dict[int, int]]:
    """The rule of the evaluate module docstring, written out: (L, [(start, first_scored)], target -> window)."""
    length = min(ctx, n - 1)
    plan: list[tuple[int, int]] = []
    owner: dict[int, int] = {}
    for k in range(n):  # nominal starts 0, stride, 2*stride, ...; never more than n windows
        if max(owner, default=0) >= n - 1:  # every target up to t_{n-1} is scored: stop
            break
        start = min(k * stride, n - 1 - length)  # the last window moves back to full length
        new = [t for t in range(start + 1, start + length + 1) if t not in owner]
        for t in new:
            owner[t] = len(plan)
        plan.append((start, new[0] - (start + 1)))
    return length, plan, owner


def _plan(n: int, ctx: int, stride: int) -> tuple[int, list[tuple[int, int]]]:
    with time_limit(0.5):
        length, windows = plan_windows(n, ctx, stride)
    return length, [(w.start, w.first_scored) for w in windows]


def _cases() -> list[tuple[int, int, int]]:
    cases = [(n, ctx, stride) for n in range(2, 61) for ctx in range(1, 13) for stride in range(1, ctx + 1)]
    return sorted(cases, key=lambda c: c[2] == 1)  # stride 1 last: a finite failure comes before any hang


def test_plan_windows_against_brute_force_enumeration() -> None:
    # Expected: brute_windows above, from the module docstring's rule.
    for n, ctx, stride in _cases():
        length, plan = _plan(n, ctx, stride)
        want_length, want_plan, owner = brute_windows(n, ctx, stride)
        assert (length, plan) == (want_length, want_plan), (n, ctx, stride)
        assert sorted(owner) == list(range(1, n))  # every target after the first, exactly once
        got_owner = {}
        for i, (s, first) in enumerate(plan):
            assert s >= 0 and s + length <= n - 1  # window inputs and targets inside the stream
            if i > 0:
                assert first >= length - stride  # >= L - stride + 1 tokens of context (docstring)
            for t in range(s + 1 + first, s + length + 1):
                assert t not in got_owner, (n, ctx, stride, t)
                got_owner[t] = i
        assert got_owner == owner, (n, ctx, stride)


def test_window_batches_score_each_target_once() -> None:
    # Expected: with tokens = positions 0..n-1, the kept targets over all batches are 1..n-1 once each,
    # and each batch row is the contiguous slice [start, start + L] of the stream.
    for n, ctx, stride in _cases()[::7]:
        if n > 40:
            continue
        _, plan, owner = brute_windows(n, ctx, stride)
        seen: list[int] = []
        rows: list[int] = []
        with time_limit(2.0):
            for idx, keep in window_batches(torch.arange(n), ctx=ctx, stride=stride, batch_size=3, device="cpu"):
                seen += idx[:, 1:][keep].tolist()
                rows += idx[:, 0].tolist()
                assert (idx[:, 1:] - idx[:, :-1] == 1).all()
        assert sorted(seen) == list(range(1, n)), (n, ctx, stride)
        assert rows == [s for s, _ in plan]
        assert len(owner) == n - 1
