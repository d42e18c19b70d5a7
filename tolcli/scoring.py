"""Which tokens a perplexity run scores, with which context (the protocols), and per-token scores of several
variants on the same windows.

A *plan* is a list of :class:`Window` over one or more token sequences. Window ``w`` feeds
``seq[w.start : w.start + w.length]`` (its first token replaced by ``w.head`` when set) and scores the logits at
positions ``w.first_scored .. w.stop - 1``, the logit at ``j`` predicting ``seq[w.start + j + 1]``. Four protocols
(``docs/evaluation.md`` gives each one's source):

- ``tolcli`` (default): windows of ``L = min(ctx, N - 1)`` input tokens whose starts advance by ``stride``
  (``1 <= stride <= ctx``); the last window is moved back so that it is full length; each window scores only the
  targets no earlier window scored. So every token after the first is scored exactly once, with at least
  ``L - stride + 1`` tokens of context.
- ``hf-sliding``: the Hugging Face "Perplexity of fixed-length models" loop: windows ``[b, min(b + ctx, N))`` for
  ``b = 0, stride, 2 stride, ...``; a window's labels are its last ``end - prev_end`` tokens, and the model's label
  shift drops the window's first position; each window's mean loss is weighted by ``valid labels - 1`` (the guide's
  ``num_loss_tokens``), which :attr:`Window.weight` spreads over its scored tokens.
- ``lm-eval-rolling``: lm-evaluation-harness's ``loglikelihood_rolling``: per document, a prefix token (BOS, else
  EOS) then disjoint windows of ``ctx`` predictions, every window full length; every token of every document is
  scored. On the sequence ``[prefix] + doc`` this is the tolcli rule with ``stride = ctx``.
- ``llama-cpp``: llama.cpp's ``perplexity``: chunks of ``ctx`` tokens (the tail that does not fill a chunk is
  dropped; at least ``2 ctx`` tokens), the first token of each chunk replaced by BOS when the tokenizer adds one,
  and only the logits at ``ctx // 2 .. ctx - 2`` scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tolcli.choices import PROTOCOLS
from tolcli.errors import InputError, UsageError
from tolcli.model import ContextFreeSource, Transformer


@dataclass(frozen=True)
class Window:
    start: int  # first input position in its sequence
    first_scored: int  # logit index of the first scored position
    length: int = 0  # input tokens
    stop: int = 0  # logit index after the last scored position
    seq: int = 0  # which sequence of the plan
    head: int | None = None  # replaces the first input token (llama.cpp's BOS)
    weight: float = 1.0  # weight of each of this window's scored tokens in the mean NLL (hf-sliding)

    @property
    def n_scored(self) -> int:
        return self.stop - self.first_scored


@dataclass(frozen=True)
class Specials:
    """The special tokens a protocol may use: BOS and EOS ids (None when unknown), and whether the tokenizer
    puts BOS in front of what it encodes (llama.cpp's ``add_bos``)."""

    bos: int | None = None
    eos: int | None = None
    adds_bos: bool = False


@dataclass(frozen=True)
class Plan:
    """The windows a protocol scores over its token sequences (one per data file, or one per document)."""

    protocol: str
    sequences: list[Tensor]
    windows: list[Window]

    @property
    def tokens_scored(self) -> int:
        return sum(w.n_scored for w in self.windows)

    def weights(self) -> np.ndarray | None:
        """Per scored token, in scoring order; None when every weight is 1."""
        if all(w.weight == 1.0 for w in self.windows):
            return None
        return np.concatenate([np.full(w.n_scored, w.weight) for w in self.windows])


def _check_ctx(ctx: int, stride: int) -> None:
    if ctx < 1 or not 1 <= stride <= ctx:
        raise UsageError(f"need `ctx` >= 1 and 1 <= `stride` <= `ctx`, got ctx={ctx} stride={stride}")


def plan_windows(n_tokens: int, ctx: int, stride: int) -> tuple[int, list[Window]]:
    """The tolcli rule: window length ``L`` and the windows covering ``n_tokens`` tokens (module docstring)."""
    if n_tokens < 2:
        raise InputError(f"need at least 2 tokens to score, got {n_tokens}")
    _check_ctx(ctx, stride)
    length = min(ctx, n_tokens - 1)
    windows: list[Window] = []
    last = 0  # highest target position scored so far
    s = 0
    while last < n_tokens - 1:
        s = min(s, n_tokens - 1 - length)
        windows.append(Window(s, last + 1 - (s + 1), length, length))
        last = s + length
        s += stride
    return length, windows


def hf_sliding_windows(n_tokens: int, ctx: int, stride: int) -> list[Window]:
    """The Hugging Face guide's windows (module docstring). A window whose labels are all dropped by the shift
    (a last window of one token) scores nothing and is left out: in the guide it adds ``NaN * 0``."""
    if n_tokens < 2:
        raise InputError(f"need at least 2 tokens to score, got {n_tokens}")
    _check_ctx(ctx, stride)
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        length, valid = end - begin, min(end - prev_end, end - begin)
        lo = max(length - valid, 1)  # first label position the shifted loss scores
        if length - lo > 0:
            windows.append(Window(begin, lo - 1, length, length - 1, weight=(valid - 1) / (length - lo)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def llama_cpp_windows(n_tokens: int, ctx: int, specials: Specials) -> list[Window]:
    """llama.cpp's perplexity chunks (module docstring)."""
    if ctx < 3:
        raise UsageError(f"llama-cpp scores logits ctx/2 .. ctx-2 of each chunk: need `ctx` >= 3, got {ctx}")
    if n_tokens < 2 * ctx:
        raise InputError(
            f"the llama-cpp protocol needs at least 2 x ctx = {2 * ctx} tokens, got {n_tokens}",
            hint="use a smaller --ctx or more text",
        )
    head = specials.bos if specials.adds_bos else None
    return [Window(i * ctx, ctx // 2, ctx, ctx - 1, head=head) for i in range(n_tokens // ctx)]


def prefix_token(specials: Specials) -> int:
    """lm-evaluation-harness's ``prefix_token_id``: BOS when the model has one, else EOS."""
    tok = specials.bos if specials.bos is not None else specials.eos
    if tok is None:
        raise UsageError(
            "the lm-eval-rolling protocol conditions each document on a BOS or EOS token, and this model has neither",
            hint="set bos_token_id or eos_token_id in config.json",
        )
    return tok


def make_plan(
    protocol: str,
    sequences: Sequence[Tensor],
    *,
    ctx: int,
    stride: int | None = None,
    specials: Specials = Specials(),
) -> Plan:
    """The windows of ``protocol`` over ``sequences``: token streams for tolcli, hf-sliding and llama-cpp; for
    lm-eval-rolling, one sequence per document (the prefix token is added here)."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown `protocol` {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if stride is not None and stride != ctx and protocol in ("lm-eval-rolling", "llama-cpp"):
        raise UsageError(f"`stride` applies to the tolcli and hf-sliding protocols; {protocol} steps by `ctx`")
    stride = ctx if stride is None else stride
    seqs = [s.to(torch.long).flatten() for s in sequences]
    if protocol == "lm-eval-rolling":
        prefix = torch.tensor([prefix_token(specials)], dtype=torch.long)
        seqs = [torch.cat([prefix, s]) for s in seqs if s.numel()]
    windows: list[Window] = []
    for k, s in enumerate(seqs):
        n = s.numel()
        if protocol == "hf-sliding":
            ws = hf_sliding_windows(n, ctx, stride)
        elif protocol == "llama-cpp":
            ws = llama_cpp_windows(n, ctx, specials)
        else:
            ws = plan_windows(n, ctx, stride)[1]
        windows += [Window(w.start, w.first_scored, w.length, w.stop, k, w.head, w.weight) for w in ws]
    return Plan(protocol, seqs, windows)


@dataclass(frozen=True)
class Batch:
    inputs: Tensor  # (B, L) token ids
    keep: Tensor  # (B, L) bool: the scored logits
    targets: Tensor  # (N,) the scored tokens, row-major over keep


def plan_batches(plan: Plan, *, batch_size: int, device: torch.device | str) -> Iterator[Batch]:
    """Consecutive windows of equal length, at most ``batch_size`` per batch; scored tokens in plan order."""
    i = 0
    for size in _group_sizes(plan, batch_size):
        group = plan.windows[i : i + size]
        i += size
        length = group[0].length
        rows, tgts = [], []
        keep = torch.zeros(len(group), length, dtype=torch.bool)
        for r, w in enumerate(group):
            seq = plan.sequences[w.seq]
            row = seq[w.start : w.start + length].clone()
            if w.head is not None:
                row[0] = w.head
            rows.append(row)
            keep[r, w.first_scored : w.stop] = True
            tgts.append(seq[w.start + w.first_scored + 1 : w.start + w.stop + 1])
        yield Batch(torch.stack(rows).to(device), keep.to(device), torch.cat(tgts).to(device))


def window_batches(
    tokens: Tensor, *, ctx: int, stride: int, batch_size: int, device: torch.device | str
) -> Iterator[tuple[Tensor, Tensor]]:
    """The tolcli rule as ``(idx, keep)`` per batch: ``idx`` (B, L+1) token windows, ``keep`` (B, L) the scored
    targets of ``idx[:, 1:]``."""
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


def count_plan_batches(plan: Plan, batch_size: int) -> int:
    return sum(1 for _ in _group_sizes(plan, batch_size))


def _group_sizes(plan: Plan, batch_size: int) -> Iterator[int]:
    """Sizes of the batches: runs of consecutive windows of equal length, at most ``batch_size`` each."""
    i, ws = 0, plan.windows
    while i < len(ws):
        j = i + 1
        while j < len(ws) and j - i < batch_size and ws[j].length == ws[i].length:
            j += 1
        yield j - i
        i = j


@dataclass
class VariantStats:
    """One variant's per-token scores over the scored tokens (in plan order) and their totals.

    ``nll``: negative log-likelihood per token (nats); ``kl``: KL(reference || variant) per token (zeros for the
    reference); ``agree``: the variant's argmax equals the reference's; ``weights``: per-token weights of the mean
    NLL (None: all 1; only hf-sliding has others). Totals: ``nll_sum`` is the weighted sum."""

    name: str
    nll: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kl: np.ndarray = field(default_factory=lambda: np.zeros(0))
    agree: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    weights: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.nll.size)

    @property
    def weight_sum(self) -> float:
        return float(self.tokens if self.weights is None else self.weights.sum())

    @property
    def nll_sum(self) -> float:
        return float(self.nll.sum() if self.weights is None else (self.weights * self.nll).sum())

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.weight_sum

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def kl_sum(self) -> float:
        return float(self.kl.sum())

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.tokens

    @property
    def top1_agree(self) -> int:
        return int(self.agree.sum())

    @property
    def top1_agreement(self) -> float:
        return self.top1_agree / self.tokens


class _Collect:
    """Per-batch arrays of one variant, joined once at the end."""

    def __init__(self) -> None:
        self.nll: list[np.ndarray] = []
        self.kl: list[np.ndarray] = []
        self.agree: list[np.ndarray] = []

    def stats(self, name: str, weights: np.ndarray | None) -> VariantStats:
        def cat(parts: list[np.ndarray], dtype) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        return VariantStats(name, cat(self.nll, np.float64), cat(self.kl, np.float64), cat(self.agree, bool), weights)


class ReferenceLogits:
    """What a variant is compared with, position by position: the reference's log-probabilities. Live (the first
    variant's full distribution) or stored (:mod:`tolcli.reference`: the target's and the top-k)."""

    def kl_and_agree(self, logp: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class LiveReference(ReferenceLogits):
    def __init__(self, ref_logp: Tensor):
        self.ref_logp = ref_logp

    def kl_and_agree(self, logp: Tensor) -> tuple[Tensor, Tensor]:
        ref_logp = self.ref_logp
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).double()
        return kl, ref_logp.argmax(-1) == logp.argmax(-1)


class TopKReference(ReferenceLogits):
    """KL against a stored top-k of the reference: ``sum_topk p (log p - log q)`` plus the rest of the mass as one
    outcome, ``r_p (log r_p - log r_q)``. By the log-sum inequality this is a lower bound of the full KL, exact when
    the top-k is the whole vocabulary. Top-1 agreement is exact (the reference's argmax is stored first)."""

    def __init__(self, topk_ids: Tensor, topk_logp: Tensor, vocab_size: int):
        self.ids, self.logp, self.full = topk_ids.long(), topk_logp.double(), topk_ids.shape[1] >= vocab_size

    def kl_and_agree(self, logp: Tensor) -> tuple[Tensor, Tensor]:
        q = logp.double().gather(1, self.ids)
        p = self.logp.exp()
        kl = (p * (self.logp - q)).sum(-1)
        if not self.full:
            rest_p = (1.0 - p.sum(-1)).clamp_min(0.0)
            rest_q = (1.0 - q.exp().sum(-1)).clamp_min(1e-300)
            kl = kl + torch.where(rest_p > 0, rest_p * (rest_p.clamp_min(1e-300).log() - rest_q.log()), 0.0)
        return kl, self.ids[:, 0] == logp.argmax(-1)


@dataclass
class RefCapture:
    """The reference's per-token record for ``--save-reference``: the target's log-probability, and the top-k."""

    top_k: int
    target_logp: list[Tensor] = field(default_factory=list)
    topk_ids: list[Tensor] = field(default_factory=list)
    topk_logp: list[Tensor] = field(default_factory=list)

    def add(self, logp: Tensor, targets: Tensor) -> None:
        k = min(self.top_k, logp.shape[-1])
        vals, ids = logp.topk(k, dim=-1)  # sorted: the argmax first
        self.target_logp.append(logp.gather(1, targets[:, None])[:, 0].float().cpu())
        self.topk_ids.append(ids.to(torch.int32).cpu())
        self.topk_logp.append(vals.float().cpu())


@dataclass
class StoredRef:
    """A stored reference, sliced batch by batch in plan order (see :mod:`tolcli.reference`)."""

    name: str
    target_logp: Tensor  # (N,) float32
    topk_ids: Tensor  # (N, k) int32
    topk_logp: Tensor  # (N, k) float32
    vocab_size: int


@torch.no_grad()
def score_plan(
    model: Transformer,
    plan: Plan,
    variants: Sequence[tuple[str, ContextFreeSource | None]],
    *,
    batch_size: int = 8,
    on_batch: Callable[[], None] | None = None,
    stored: StoredRef | None = None,
    capture: RefCapture | None = None,
) -> list[VariantStats]:
    """Score every variant on the plan's windows; the first variant is the reference for KL and top-1 agreement,
    or, with ``stored``, a stored reference is (and comes first in the result). ``capture`` records the live
    reference's log-probabilities for ``--save-reference``. ``source=None`` means the model's own FFNs."""
    device = next(model.parameters()).device
    n_out = len(variants) + (stored is not None)
    acc = [_Collect() for _ in range(n_out)]
    offset = 0
    for batch in plan_batches(plan, batch_size=batch_size, device=device):
        targets = batch.targets
        n = targets.numel()
        ref: ReferenceLogits | None = None
        if stored is not None:
            sl = slice(offset, offset + n)
            acc[0].nll.append(-stored.target_logp[sl].double().numpy())
            acc[0].kl.append(np.zeros(n))
            acc[0].agree.append(np.ones(n, dtype=bool))
            ref = TopKReference(stored.topk_ids[sl].to(device), stored.topk_logp[sl].to(device), stored.vocab_size)
        for k, (_, source) in enumerate(variants, start=stored is not None):
            logp = F.log_softmax(model(batch.inputs, source).float(), dim=-1)[batch.keep]  # (N, V)
            acc[k].nll.append(-logp.gather(1, targets[:, None])[:, 0].double().cpu().numpy())
            if ref is None:
                ref = LiveReference(logp)
                acc[k].kl.append(np.zeros(n))
                acc[k].agree.append(np.ones(n, dtype=bool))
                if capture is not None:
                    capture.add(logp, targets)
            else:
                kl, agree = ref.kl_and_agree(logp)
                acc[k].kl.append(kl.cpu().numpy())
                acc[k].agree.append(agree.cpu().numpy())
            del logp
        offset += n
        if on_batch is not None:
            on_batch()
    names = ([stored.name] if stored is not None else []) + [name for name, _ in variants]
    weights = plan.weights()
    return [a.stats(name, weights) for a, name in zip(acc, names, strict=True)]


def compare(
    model: Transformer,
    tokens: Tensor,
    variants: Sequence[tuple[str, ContextFreeSource | None]],
    *,
    ctx: int,
    stride: int | None = None,
    batch_size: int = 8,
    on_batch: Callable[[], None] | None = None,
) -> list[VariantStats]:
    """Score every variant on the same windows of one token stream with the tolcli rule; the first is the
    reference for KL and top-1 agreement. A variant is ``(name, source)``; ``source=None`` means the model's FFNs."""
    plan = make_plan("tolcli", [tokens], ctx=ctx, stride=stride)
    return score_plan(model, plan, variants, batch_size=batch_size, on_batch=on_batch)


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
