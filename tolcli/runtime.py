"""A runtime for ToL lookups: the K most frequent tokens' rows of every layer in (device) memory, misses
read from the bundle (memory-mapped), with hit-rate accounting.

Token frequencies are Zipf-like: in the demo's held-out text the 256 most frequent of 4,096 tokens
cover 65% of the positions (1,024 cover 90%), so a small resident cache serves most lookups while the
full tables stay on storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tolcli.bundle.reader import Bundle
from tolcli.errors import UsageError


def hot_tokens(counts: Tensor, k: int) -> Tensor:
    """The ``k`` most frequent token ids (ties broken by the smaller id), most frequent first."""
    if k < 0:
        raise UsageError(f"`k` must be >= 0, got {k}")
    k = min(k, counts.numel())
    order = torch.argsort(-counts.double(), stable=True)
    return order[:k]


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class HotTokenCache:
    """Decoded rows of ``tokens`` for every present layer, resident on ``device``; other rows come from
    the bundle on demand. ``lookup`` returns exactly what ``bundle.lookup`` returns."""

    def __init__(self, bundle: Bundle, tokens: Tensor, device: str | torch.device = "cpu"):
        self.bundle = bundle
        self.device = torch.device(device)
        self.tokens = tokens.to(torch.long).cpu()
        self.slot = torch.full((bundle.vocab_size,), -1, dtype=torch.long)
        self.slot[self.tokens] = torch.arange(self.tokens.numel())
        self.rows = {layer: bundle.lookup(layer, self.tokens).to(self.device) for layer in bundle.layers}
        self.stats = CacheStats()

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rows.values())

    def lookup(self, layer: int, token_ids: Tensor) -> Tensor:
        ids = token_ids.to(torch.long).cpu()
        flat = ids.reshape(-1)
        slots = self.slot[flat]
        hit = slots >= 0
        out = torch.empty(flat.numel(), self.bundle.hidden_size, dtype=torch.float32, device=self.device)
        if bool(hit.any()):
            out[hit.to(self.device)] = self.rows[layer][slots[hit].to(self.device)]
        miss = ~hit
        if bool(miss.any()):
            out[miss.to(self.device)] = self.bundle.lookup(layer, flat[miss]).to(self.device)
        self.stats.lookups += flat.numel()
        self.stats.hits += int(hit.sum())
        return out.reshape(*ids.shape, self.bundle.hidden_size)

    def __call__(self, layer: int, token_ids: Tensor, x0: Tensor) -> Tensor | None:
        """A :class:`tolcli.model.ContextFreeSource` through the cache."""
        if layer not in self.bundle.layers:
            return None
        return self.lookup(layer, token_ids).to(device=x0.device, dtype=x0.dtype)
