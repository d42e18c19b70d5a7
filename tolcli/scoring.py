"""Perplexity with one audited scoring rule.

Scoring rule (``docs/evaluation.md``): the token stream ``t_0 .. t_{N-1}`` is cut into windows of
``L = min(ctx, N - 1)`` input tokens whose starts advance by ``stride`` (``1 <= stride <= ctx``); the
last window is moved back so that it is full length. Window ``[s, s+L)`` predicts targets
``t_{s+1} .. t_{s+L}``, and only targets not scored by an earlier window count. So every token after
the first is scored exactly once, with at least ``L - stride + 1`` tokens of context (the common
Hugging Face snippet, which labels ``input_ids`` itself, drops one token per window instead).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from tolcli.errors import InputError, UsageError
from tolcli.model import ContextFreeSource, Transformer


@dataclass(frozen=True)
class Window:
    start: int  # first input position
    first_scored: int  # index (within the window's L targets) of the first target this window scores


def plan_windows(n_tokens: int, ctx: int, stride: int) -> tuple[int, list[Window]]:
    """Window length ``L`` and the windows covering ``n_tokens`` tokens (see module docstring)."""
    if n_tokens < 2:
        raise InputError(f"need at least 2 tokens to score, got {n_tokens}")
    if ctx < 1 or not 1 <= stride <= ctx:
        raise UsageError(f"need `ctx` >= 1 and 1 <= `stride` <= `ctx`, got ctx={ctx} stride={stride}")
    length = min(ctx, n_tokens - 1)
    windows: list[Window] = []
    last = 0  # highest target position scored so far
    s = 0
    while last < n_tokens - 1:
        s = min(s, n_tokens - 1 - length)
        windows.append(Window(s, last + 1 - (s + 1)))
        last = s + length
        s += stride
    return length, windows


def window_batches(
    tokens: Tensor, *, ctx: int, stride: int, batch_size: int, device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(idx, keep)`` per batch: ``idx`` (B, L+1) token windows, ``keep`` (B, L) marks the scored targets."""
    tokens = tokens.to(torch.long).flatten()
    length, windows = plan_windows(tokens.numel(), ctx, stride)
    steps = torch.arange(length, device=device)
    for b in range(0, len(windows), batch_size):
        batch = windows[b : b + batch_size]
        idx = torch.stack([tokens[w.start : w.start + length + 1] for w in batch]).to(device)  # (B, L+1)
        first = torch.tensor([w.first_scored for w in batch], device=device)
        yield idx, steps[None, :] >= first[:, None]


def count_batches(n_tokens: int, *, ctx: int, stride: int, batch_size: int) -> int:
    return math.ceil(len(plan_windows(n_tokens, ctx, stride)[1]) / batch_size)


@dataclass
class VariantStats:
    """One variant's running totals over the scored tokens."""

    name: str
    nll_sum: float = 0.0
    tokens: int = 0
    kl_sum: float = 0.0  # sum over tokens of KL(reference || variant), nats
    top1_agree: int = 0  # tokens whose argmax equals the reference's
    info: dict = field(default_factory=dict)

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.tokens

    @property
    def top1_agreement(self) -> float:
        return self.top1_agree / self.tokens


@torch.no_grad()
def compare(
    model: Transformer,
    tokens: Tensor,
    variants: Sequence[tuple[str, ContextFreeSource | None]],
    *,
    ctx: int,
    stride: int | None = None,
    batch_size: int = 8,
    on_batch=None,
) -> list[VariantStats]:
    """Score every variant on the same windows; the first is the reference for KL and top-1 agreement.

    A variant is ``(name, source)``; ``source=None`` means the model's own FFNs.
    """
    device = next(model.parameters()).device
    stats = [VariantStats(name) for name, _ in variants]
    stride = ctx if stride is None else stride
    for idx, keep in window_batches(tokens, ctx=ctx, stride=stride, batch_size=batch_size, device=device):
        targets = idx[:, 1:][keep]  # (N,)
        ref_logp = None
        for st, (_, source) in zip(stats, variants, strict=True):
            logp = F.log_softmax(model(idx[:, :-1], source).float(), dim=-1)[keep]  # (N, V)
            st.nll_sum -= logp.gather(1, targets[:, None]).double().sum().item()
            st.tokens += targets.numel()
            if ref_logp is None:
                ref_logp = logp
                st.top1_agree += targets.numel()
            else:
                st.kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum(-1).double().sum().item()
                st.top1_agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum().item())
            del logp
        if on_batch is not None:
            on_batch()
    return stats


def score(
    model: Transformer,
    tokens: Tensor,
    *,
    ctx: int,
    stride: int | None = None,
    batch_size: int = 8,
    source: ContextFreeSource | None = None,
) -> VariantStats:
    """Negative log-likelihood (nats) over every scored token with one source (``None``: the model's FFNs);
    ``.perplexity``, ``.mean_nll``, ``.nll_sum`` and ``.tokens`` as for any variant of :func:`compare`."""
    return compare(model, tokens, [("model", source)], ctx=ctx, stride=stride, batch_size=batch_size)[0]
