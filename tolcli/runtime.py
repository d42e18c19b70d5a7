"""A runtime for ToL lookups: the K most frequent tokens' rows of every layer in (device) memory, misses
read from the bundle (memory-mapped), with hit-rate accounting.

Token frequencies are Zipf-like: in the demo's held-out text the 256 most frequent of 4,096 tokens
cover 65% of the positions (1,024 cover 90%), so a small resident cache serves most lookups while the
full tables stay on storage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tolcli.bundle.reader import Bundle, check_out, open_bundle
from tolcli.errors import InputError, UsageError
from tolcli.precompute import resolve_device
from tolcli.text import load_token_weights, read_tokens


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
        # [present layers, K, hidden], read in one all-layers lookup; ``rows[layer]`` are views of it
        self.resident = bundle.lookup_layers(self.tokens).to(self.device)
        self.rows = {layer: self.resident[k] for k, layer in enumerate(bundle.present_layers)}
        self.stats = CacheStats()

    @property
    def resident_bytes(self) -> int:
        return self.resident.numel() * self.resident.element_size()

    def _slots(self, token_ids: Tensor) -> tuple[Tensor, tuple[int, ...], Tensor, Tensor]:
        """``(flat ids, their shape, cache slots, hit mask)``, counted in :attr:`stats`; ids outside the vocabulary
        are refused."""
        ids = token_ids.to(torch.long).cpu()
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.bundle.vocab_size):
            raise InputError(f"token id outside the vocabulary [0, {self.bundle.vocab_size})", path=self.bundle.path)
        slots = self.slot[flat]
        hit = slots >= 0
        self.stats.lookups += flat.numel()
        self.stats.hits += int(hit.sum())
        return flat, tuple(ids.shape), slots, hit

    def lookup(self, layer: int, token_ids: Tensor) -> Tensor:
        """Rows of ``layer`` for ``token_ids`` (any shape); ids outside the vocabulary are refused."""
        flat, shape, slots, hit = self._slots(token_ids)
        out = torch.empty(flat.numel(), self.bundle.hidden_size, dtype=torch.float32, device=self.device)
        if bool(hit.any()):
            out[hit.to(self.device)] = self.rows[layer][slots[hit].to(self.device)]
        miss = ~hit
        if bool(miss.any()):
            out[miss.to(self.device)] = self.bundle.lookup(layer, flat[miss]).to(self.device)
        return out.reshape(*shape, self.bundle.hidden_size)

    def lookup_layers(self, token_ids: Tensor, *, out: Tensor | None = None) -> Tensor:
        """Rows of every present layer for ``token_ids`` (any shape), exactly what
        :meth:`~tolcli.bundle.reader.Bundle.lookup_layers` returns, on :attr:`device`: hits from the resident rows,
        misses in one all-layers read of the bundle. ``out``: a contiguous fp32 buffer of that shape on
        :attr:`device`, written in place."""
        flat, shape, slots, hit = self._slots(token_ids)
        want = (len(self.bundle.present_layers), *shape, self.bundle.hidden_size)
        if out is None:
            out = torch.empty(want, dtype=torch.float32, device=self.device)
        else:
            check_out(out, want, self.device)
        rows = out.view(want[0], flat.numel(), want[-1])
        if bool(hit.all()):
            torch.index_select(self.resident, 1, slots.to(self.device), out=rows)
            return out
        if not bool(hit.any()) and self.device.type == "cpu":
            self.bundle.lookup_layers(flat, out=rows)
            return out
        miss = ~hit
        rows[:, hit.to(self.device)] = self.resident[:, slots[hit].to(self.device)]
        rows[:, miss.to(self.device)] = self.bundle.lookup_layers(flat[miss]).to(self.device)
        return out

    def __call__(self, layer: int, token_ids: Tensor, x0: Tensor) -> Tensor | None:
        """A :class:`tolcli.model.ContextFreeSource` through the cache."""
        if layer not in self.bundle.layers:
            return None
        return self.lookup(layer, token_ids).to(device=x0.device, dtype=x0.dtype)


def bench_lookup(
    bundle: str | Path,
    data: str | Path,
    *,
    cache_tokens: int = 1024,
    token_weights: str | Path | None = None,
    calibration: str | Path | None = None,
    batch: int = 4096,
    device: str = "auto",
) -> dict[str, Any]:
    """Lookup throughput of a bundle over ``data``'s token stream, read directly and through a
    :class:`HotTokenCache` of ``cache_tokens`` rows per layer; hot tokens come from ``token_weights`` or
    ``calibration``, else from the data itself (an optimistic bound). Returns the measurements.

    Example:
        >>> import tempfile, pathlib
        >>> from tolcli import precompute, demo_checkpoint_path, demo_heldout_path
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> _ = precompute(demo_checkpoint_path(), out, dtype="fp16", layers="0")
        >>> r = bench_lookup(out, demo_heldout_path(), cache_tokens=256, device="cpu")
        >>> r["layers"], 0.5 < r["hit_rate"] <= 1.0
        (1, True)
    """
    if batch < 1:
        raise UsageError(f"`batch` must be >= 1, got {batch}")
    dev = resolve_device(device)
    with open_bundle(bundle) as b:
        tok = b.tokenizer()
        ids = read_tokens(data, tok, b.vocab_size)
        if token_weights is None and calibration is None:
            counts, source = torch.bincount(ids, minlength=b.vocab_size).double(), "the data itself"
        else:
            counts, info = load_token_weights(
                b.vocab_size, weights_file=token_weights, calibration=calibration, tokenizer=tok, floor=0.0
            )
            source = info["name"]
        if not b.layers:
            raise InputError("the bundle has no present layer", path=bundle)
        layers = sorted(b.layers)

        def run(fn) -> float:
            t0 = time.perf_counter()
            for s in range(0, ids.numel(), batch):
                chunk = ids[s : s + batch]
                for layer in layers:
                    fn(layer, chunk)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        direct = run(lambda layer, chunk: b.lookup(layer, chunk).to(dev))
        cache = HotTokenCache(b, hot_tokens(counts, cache_tokens), dev)
        cached = run(cache.lookup)
    rows = ids.numel() * len(layers)
    return {
        "bundle": str(bundle),
        "tokens": ids.numel(),
        "layers": len(layers),
        "cache_tokens": cache.tokens.numel(),
        "hot_tokens_from": source,
        "resident_bytes": cache.resident_bytes,
        "hit_rate": cache.stats.hit_rate,
        "rows_per_s_direct": rows / direct,
        "rows_per_s_cached": rows / cached,
        "speedup": direct / cached,
        "device": dev.type,
    }
