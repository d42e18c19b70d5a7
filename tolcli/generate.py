"""Text generation with a KV cache: a full checkpoint with its own FFNs, or a (stripped) checkpoint with a ToL bundle.

Each step runs only the new token through the model (:class:`tolcli.model.KVCache`); with a bundle, the step's
rows for every layer come from one lookup (:class:`StepSource`), memory-mapped from the bundle, optionally through
the hot-token cache. Sampling follows the usual rules, in this order: temperature (0: greedy argmax), top-k, then
top-p (the smallest set of most likely tokens whose probability reaches ``top_p``; at least one token), drawn with
a ``torch.Generator`` seeded by ``seed`` so a run is reproducible.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tolcli.bundle.reader import open_bundle
from tolcli.checkpoint import Checkpoint, open_checkpoint
from tolcli.errors import UsageError
from tolcli.model import ContextFreeSource, KVCache, Transformer, load_model
from tolcli.pairing import check_pairing
from tolcli.precompute import resolve_device
from tolcli.runtime import HotTokenCache, hot_tokens
from tolcli.streams import special_tokens
from tolcli.text import load_tokenizer


@dataclass(frozen=True)
class SamplingOptions:
    """How the next token is chosen; ``temperature=0`` is greedy.

    Example:
        >>> SamplingOptions(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=1).top_p
        0.9
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"`max_new_tokens` must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            raise UsageError(f"`temperature` must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"`top_k` must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"`top_p` must be in (0, 1], got {self.top_p}")


def next_token(logits: Tensor, options: SamplingOptions, generator: torch.Generator) -> int:
    """The next token from one position's logits (V,) under ``options`` (module docstring)."""
    logits = logits.double()
    if options.temperature == 0:
        return int(logits.argmax())
    logits = logits / options.temperature
    if options.top_k is not None and options.top_k < logits.numel():
        kth = logits.topk(options.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if options.top_p is not None and options.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass of the more likely tokens
        sorted_p = sorted_p.masked_fill(before >= options.top_p, 0.0)  # keeps the first token always
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


class StepSource:
    """A context-free source for one decoding step: every layer's rows for the step's tokens fetched in one call
    (``lookup(ids) -> [layers, n, h]``), then served layer by layer."""

    def __init__(self, layers: list[int], lookup: Callable[[Tensor], Tensor]):
        self.index = {layer: k for k, layer in enumerate(layers)}
        self.lookup = lookup
        self._ids: Tensor | None = None
        self._rows: Tensor | None = None

    def __call__(self, layer: int, token_ids: Tensor, x0: Tensor) -> Tensor | None:
        k = self.index.get(layer)
        if k is None:
            return None
        if self._ids is None or not torch.equal(self._ids, token_ids):
            self._ids = token_ids.clone()
            self._rows = self.lookup(token_ids.reshape(-1).cpu())  # (layers, B*T, h)
        assert self._rows is not None
        return self._rows[k].reshape(*token_ids.shape, -1).to(device=x0.device, dtype=x0.dtype)


def bundle_step_source(bundle: Any, *, cache: Any | None = None) -> StepSource:
    """A :class:`StepSource` over a bundle's present layers: through the hot-token cache when given, else the
    bundle's all-layers lookup (or one lookup per layer on a reader without it)."""
    layers = sorted(bundle.layers)
    if cache is not None:
        return StepSource(layers, lambda ids: torch.stack([cache.lookup(i, ids) for i in layers]))
    if hasattr(bundle, "lookup_layers"):
        return StepSource(layers, bundle.lookup_layers)
    return StepSource(layers, lambda ids: torch.stack([bundle.lookup(i, ids) for i in layers]))


@dataclass
class Generation:
    """What :func:`generate` produced: the prompt and new token ids, and timings (seconds)."""

    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    stopped: str = "max_new_tokens"

    @property
    def ms_per_token(self) -> float:
        return 1000 * sum(self.step_seconds) / max(1, len(self.step_seconds))

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_ids": self.prompt_ids,
            "new_ids": self.new_ids,
            "prefill_seconds": round(self.prefill_seconds, 6),
            "ms_per_token": round(self.ms_per_token, 3),
            "stopped": self.stopped,
        }


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int] | Tensor,
    *,
    source: ContextFreeSource | None = None,
    options: SamplingOptions | None = None,
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Continue ``prompt_ids`` by up to ``options.max_new_tokens`` tokens with a KV cache.

    ``source=None`` uses the model's own FFNs; a bundle's :func:`bundle_step_source` (or ``bundle.as_source()``)
    runs the context-free terms from ToLs. ``on_token`` is called with each new id as it is chosen.

    Example:
        >>> from tolcli import load_model, open_checkpoint, demo_checkpoint_path
        >>> from tolcli.generate import generate, SamplingOptions
        >>> model = load_model(open_checkpoint(demo_checkpoint_path()))
        >>> len(generate(model, [10, 20, 30], options=SamplingOptions(max_new_tokens=5)).new_ids)
        5
    """
    options = options or SamplingOptions()
    ids = [int(t) for t in (prompt_ids.tolist() if isinstance(prompt_ids, Tensor) else prompt_ids)]
    if not ids:
        raise UsageError("the prompt is empty: give at least one token")
    limit = model.cfg.max_position_embeddings
    if len(ids) + options.max_new_tokens > limit:
        raise UsageError(
            f"prompt ({len(ids)} tokens) + `max_new_tokens` ({options.max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({limit})"
        )
    device = model.model.embed_tokens.weight.device
    cache = KVCache(model.cfg, capacity=len(ids) + options.max_new_tokens, device=device)
    gen = torch.Generator().manual_seed(options.seed)
    out = Generation(ids)
    t0 = time.perf_counter()
    logits = model(torch.tensor([ids], device=device), source, cache=cache)[0, -1]
    out.prefill_seconds = time.perf_counter() - t0
    for step in range(options.max_new_tokens):
        tok = next_token(logits.cpu(), options, gen)
        out.new_ids.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in options.stop_ids:
            out.stopped = "stop token"
            break
        if step == options.max_new_tokens - 1:
            break
        t0 = time.perf_counter()
        logits = model(torch.tensor([[tok]], device=device), source, cache=cache)[0, -1]
        out.step_seconds.append(time.perf_counter() - t0)
    return out


@dataclass
class TextGeneration:
    """:func:`generate_text`'s result: the text after the prompt, and the token-level record."""

    text: str
    generation: Generation
    model: str
    tol: str | None

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "tol": self.tol, "text": self.text, **self.generation.to_json()}


def generate_text(
    checkpoint: str | Path | Checkpoint,
    prompt: str,
    *,
    tol: str | Path | None = None,
    options: SamplingOptions | None = None,
    device: str = "auto",
    cache_tokens: int = 0,
    allow_source_mismatch: bool = False,
    on_text: Callable[[str], None] | None = None,
    note: Callable[[str], None] = lambda s: None,
) -> TextGeneration:
    """Encode ``prompt`` with the checkpoint's (else the bundle's) tokenizer and continue it; ``on_text`` receives
    the decoded text as it grows (for streaming to a terminal). With ``tol``, the context-free FFNs come from the
    bundle (a stripped checkpoint needs one), checked to belong to the checkpoint (:mod:`tolcli.pairing`);
    ``cache_tokens`` > 0 keeps that many of the prompt's most frequent tokens' rows resident (hot-token cache).
    Stops at ``options.max_new_tokens`` or the model's EOS.

    Example:
        >>> from tolcli import generate_text, SamplingOptions, demo_checkpoint_path
        >>> r = generate_text(demo_checkpoint_path(), "def ", options=SamplingOptions(max_new_tokens=4))
        >>> len(r.generation.new_ids), r.generation.prompt_ids
        (4, [701, 221])
    """
    options = options or SamplingOptions()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    if ckpt.config.stripped and tol is None:
        raise UsageError(f"{ckpt.path} is stripped (no context-free FFN): generate with a bundle (`tol`)")
    bundle = None if tol is None else open_bundle(tol)
    try:
        if bundle is not None:
            check_pairing(ckpt, bundle, allow_mismatch=allow_source_mismatch, note=note)
        if ckpt.tokenizer_path is not None:
            tok = load_tokenizer(ckpt.tokenizer_path)
        elif bundle is not None and bundle.tokenizer() is not None:
            tok = bundle.tokenizer()
        else:
            raise UsageError("no tokenizer: the checkpoint has no tokenizer.json and the bundle embeds none")
        eos = special_tokens(ckpt.config, tok).eos
        if eos is not None and not options.stop_ids:
            options = replace(options, stop_ids=(eos,))
        dev = resolve_device(device)
        model = load_model(ckpt, device=dev, memory_ffn=bundle is None)
        ids = tok.encode(prompt).ids
        source = None
        if bundle is not None:
            hot = None
            if cache_tokens > 0:
                counts = torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=bundle.vocab_size)
                hot = HotTokenCache(bundle, hot_tokens(counts, cache_tokens), device=dev)
            source = bundle_step_source(bundle, cache=hot)
        new: list[int] = []

        def emit(t: int) -> None:
            new.append(t)
            if on_text is not None:
                on_text(tok.decode(new))

        gen = generate(model, ids, source=source, options=options, on_token=emit)
    finally:
        if bundle is not None:
            bundle.close()
    return TextGeneration(tok.decode(gen.new_ids), gen, ckpt.path.name, None if tol is None else str(tol))
