"""How much each layer's context-free term matters to the loss, per token: weights in loss units.

For calibration text, run the model and backpropagate the summed cross-entropy to each layer's
context-free term (the ToL row the layer adds at each position). A perturbation ``e`` of that row
changes the loss by about ``g . e``; for errors with no preferred direction the expected squared change
is ``||g||^2 ||e||^2 / h``. So ``S[l, t] = sum over occurrences of token t of ||g_l||^2`` weights layer
``l``'s squared row errors in (estimated) loss units, comparable across layers: adaptive-rank SVD then
spends bytes where the loss, not the raw reconstruction error, says they matter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tolcli.errors import InputError, UsageError
from tolcli.model import Transformer
from tolcli.progress import NullProgress, Progress


class _GradSource:
    """The model's own context-free terms, as leaves whose gradients we keep."""

    def __init__(self, model: Transformer):
        self.layers = model.model.layers
        self.terms: dict[int, tuple[Tensor, Tensor]] = {}

    def __call__(self, layer: int, token_ids: Tensor, x0: Tensor) -> Tensor:
        with torch.no_grad():
            term = self.layers[layer].memory_term(x0)
        term.requires_grad_(True)
        self.terms[layer] = (term, token_ids)
        return term


def disjoint_windows(n_tokens: int, ctx: int) -> list[tuple[int, int]]:
    """``(start, length)`` of the windows cutting ``n_tokens`` tokens into disjoint runs of at most ``ctx``
    input positions: ``[0, ctx), [ctx, 2 ctx), ...``, the last one shorter. Together they hold every input
    position ``0 .. n-2`` exactly once, and predict every target ``1 .. n-1`` exactly once."""
    if n_tokens < 2:
        raise InputError(f"need at least 2 tokens of calibration text, got {n_tokens}")
    if ctx < 1:
        raise UsageError(f"need ctx >= 1, got {ctx}")
    return [(s, min(ctx, n_tokens - 1 - s)) for s in range(0, n_tokens - 1, ctx)]


def token_sensitivity(
    model: Transformer,
    tokens: Tensor,
    *,
    ctx: int = 256,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> tuple[Tensor, Tensor]:
    """``(S, counts)``: ``S[l, t]`` (fp64 [layers, vocab]) sums ``||dLoss/dterm_l(p)||^2`` over the positions
    ``p`` holding token ``t``; ``counts[t]`` is how often ``t`` occurs as an input.

    ``Loss`` is the summed cross-entropy of every target, the text cut into disjoint windows of ``ctx``
    tokens (:func:`disjoint_windows`): each input position is in exactly one window, so each occurrence is
    counted once (``n`` tokens give ``n - 1`` positions for ``n - 1`` targets). The passes run on the model's
    device; ``S`` and ``counts`` are accumulated on the CPU."""
    cfg = model.cfg
    device = next(model.parameters()).device
    L, V = cfg.num_hidden_layers, cfg.vocab_size
    S = torch.zeros(L, V, dtype=torch.float64)
    counts = torch.zeros(V, dtype=torch.float64)
    tokens = tokens.to(torch.long).flatten()
    windows = disjoint_windows(tokens.numel(), ctx)
    # Full-length windows go in batches; a shorter last window goes alone.
    full = [w for w in windows if w[1] == windows[0][1]]
    short = windows[len(full) :]
    batches = [full[b : b + batch_size] for b in range(0, len(full), batch_size)] + ([short] if short else [])
    progress = progress or NullProgress()
    progress.start("sensitivity", len(windows))
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for batch in batches:
            idx = torch.stack([tokens[s : s + n + 1] for s, n in batch])  # (B, T+1)
            src = _GradSource(model)
            logits = model(idx[:, :-1].to(device), src)  # (B, T, V)
            target = idx[:, 1:].flatten().to(device)
            F.cross_entropy(logits.flatten(0, 1).float(), target, reduction="sum").backward()
            for layer, (term, ids) in src.terms.items():
                g2 = term.grad.double().pow(2).sum(-1).flatten().cpu()  # type: ignore[union-attr]
                S[layer].index_add_(0, ids.flatten().cpu(), g2)
            counts.index_add_(0, idx[:, :-1].flatten(), torch.ones(idx[:, :-1].numel(), dtype=torch.float64))
            progress.advance(len(batch))
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
        progress.finish()
    return S, counts


def sensitivity_weights(S: Tensor, counts: Tensor, floor: float) -> Tensor:
    """Per-layer token weights ``S[l] + floor * (mean sensitivity of one occurrence in layer l)``: the floor
    keeps tokens the calibration text never saw from being ignored (as ``counts + floor`` does)."""
    per_occurrence = S.sum(1, keepdim=True) / counts.sum().clamp_min(1.0)  # (L, 1)
    return S + floor * per_occurrence
