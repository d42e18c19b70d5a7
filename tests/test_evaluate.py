"""The scoring rule: every token after the first scored exactly once, with the longest context allowed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tolcli import load_model, open_checkpoint
from tolcli.errors import InputError, UsageError
from tolcli.scoring import plan_windows, score


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 400), ctx=st.integers(1, 64), data=st.data())
def test_every_token_scored_once(n: int, ctx: int, data) -> None:
    stride = data.draw(st.integers(1, ctx))
    length, windows = plan_windows(n, ctx, stride)
    assert length == min(ctx, n - 1)
    scored: list[int] = []
    for w in windows:
        assert w.start >= 0 and w.start + length <= n - 1  # full-length, inside the stream
        targets = list(range(w.start + 1 + w.first_scored, w.start + length + 1))
        assert targets, "a window that scores nothing"
        for p in targets:
            assert p - w.start >= min(p, length - stride + 1)  # context length guarantee
        scored += targets
    assert scored == list(range(1, n))


def test_bad_window_options() -> None:
    with pytest.raises(UsageError):
        plan_windows(10, 4, 5)
    with pytest.raises(InputError):
        plan_windows(1, 4, 4)


@pytest.fixture
def model(make_ckpt):
    return load_model(open_checkpoint(make_ckpt("memoryllm")))


def test_score_single_window_equals_direct_cross_entropy(model) -> None:
    x = torch.randint(0, 101, (50,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = F.cross_entropy(model(x[None, :-1])[0], x[1:], reduction="sum").item()
    s = score(model, x, ctx=64)
    assert s.tokens == 49
    assert math.isclose(s.nll_sum, ref, rel_tol=1e-6)


@pytest.mark.parametrize(("ctx", "stride", "batch"), [(8, 1, 3), (8, 8, 2), (8, 3, 5)])
def test_score_equals_brute_force_per_token(model, ctx: int, stride: int, batch: int) -> None:
    """Brute force: score each token alone, with the context the rule promises (stride 1: the last ctx tokens)."""
    x = torch.randint(0, 101, (40,), generator=torch.Generator().manual_seed(1))
    length, windows = plan_windows(40, ctx, stride)
    ctx_start = {}
    for w in windows:
        for p in range(w.start + 1 + w.first_scored, w.start + length + 1):
            ctx_start[p] = w.start
    if stride == 1:
        assert all(ctx_start[p] == max(0, p - ctx) for p in ctx_start)
    total = 0.0
    with torch.no_grad():
        for p, s0 in ctx_start.items():
            logits = model(x[None, s0:p])[0, -1]
            total -= F.log_softmax(logits, -1)[x[p]].item()
    got = score(model, x, ctx=ctx, stride=stride, batch_size=batch)
    assert got.tokens == 39
    assert math.isclose(got.nll_sum, total, rel_tol=1e-5)
