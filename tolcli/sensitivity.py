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

from tolcli.evaluate import plan_windows
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


def token_sensitivity(
    model: Transformer,
    tokens: Tensor,
    *,
    ctx: int = 256,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> tuple[Tensor, Tensor]:
    """``(S, counts)``: ``S[l, t]`` (fp64 [layers, vocab]) sums ``||dLoss/dterm_l||^2`` over the positions
    holding token ``t``; ``counts[t]`` is how often ``t`` occurs. Windows of ``ctx`` tokens, no overlap."""
    cfg = model.cfg
    L, V = cfg.num_hidden_layers, cfg.vocab_size
    S = torch.zeros(L, V, dtype=torch.float64)
    counts = torch.zeros(V, dtype=torch.float64)
    length, windows = plan_windows(tokens.numel(), ctx, ctx)
    progress = progress or NullProgress()
    progress.start("sensitivity", len(windows))
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for b in range(0, len(windows), batch_size):
            batch = windows[b : b + batch_size]
            idx = torch.stack([tokens[w.start : w.start + length + 1] for w in batch])  # (B, T+1)
            src = _GradSource(model)
            logits = model(idx[:, :-1], src)  # (B, T, V)
            F.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten(), reduction="sum").backward()
            for layer, (term, ids) in src.terms.items():
                S[layer].index_add_(0, ids.flatten(), term.grad.double().pow(2).sum(-1).flatten())  # type: ignore[union-attr]
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
