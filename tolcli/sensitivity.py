"""How much each layer's context-free term matters to the loss, per token: weights in loss units.

For calibration text, run the model and backpropagate the summed cross-entropy to each layer's
context-free term (the ToL row the layer adds at each position). A perturbation ``e`` of that row
changes the loss by about ``g . e``; for errors with no preferred direction the expected squared change
is ``||g||^2 ||e||^2 / h``. So ``S[l, t] = sum over occurrences of token t of ||g_l||^2`` weights layer
``l``'s squared row errors in (estimated) loss units, comparable across layers: adaptive-rank SVD then
spends bytes where the loss, not the raw reconstruction error, says they matter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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
    chain: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(S, counts)``: ``S[l, t]`` (fp64 [layers, vocab]) sums ``||dLoss/dterm_l(p)||^2`` over the positions
    ``p`` holding token ``t``; ``counts[t]`` is how often ``t`` occurs as an input.

    ``chain``: the layers a bundle coded with error feedback holds, in order (:mod:`tolcli.feedback`). A
    coding error ``e`` of layer ``l`` is then added to ``term_l`` and taken from the next layer of the chain,
    ``l'``, so it changes the loss by about ``(g_l - g_l') . e``: ``S[l]`` sums ``||g_l - g_l'||^2`` instead (the
    last layer of the chain keeps ``||g_l||^2``). Rows of layers outside the chain are 0.

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
            for layer, g, ids in _layer_grads(src.terms, chain):
                S[layer].index_add_(0, ids.flatten().cpu(), g.double().pow(2).sum(-1).flatten().cpu())
            counts.index_add_(0, idx[:, :-1].flatten(), torch.ones(idx[:, :-1].numel(), dtype=torch.float64))
            progress.advance(len(batch))
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
        progress.finish()
    return S, counts


def _layer_grads(
    terms: dict[int, tuple[Tensor, Tensor]], chain: Sequence[int] | None
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(layer, the gradient its coding error meets, token ids)``: ``dLoss/dterm_l``, or with error feedback along
    ``chain`` that minus the next chained layer's."""
    if chain is None:
        for layer, (term, ids) in terms.items():
            yield layer, term.grad, ids  # type: ignore[misc]
        return
    missing = [i for i in chain if i not in terms]
    if missing:  # pragma: no cover - pairing refuses a model without the bundle's layers first
        raise InputError(f"the model has no context-free term at layer(s) {missing} of the bundle")
    for k, layer in enumerate(chain):
        term, ids = terms[layer]
        g = term.grad
        if k + 1 < len(chain):
            g = g - terms[chain[k + 1]][0].grad  # type: ignore[operator]
        yield layer, g, ids  # type: ignore[misc]


def sensitivity_weights(S: Tensor, counts: Tensor, floor: float) -> Tensor:
    """Per-layer token weights ``S[l] + floor * (mean sensitivity of one occurrence in layer l)``: the floor
    keeps tokens the calibration text never saw from being ignored (as ``counts + floor`` does)."""
    per_occurrence = S.sum(1, keepdim=True) / counts.sum().clamp_min(1.0)  # (L, 1)
    return S + floor * per_occurrence
