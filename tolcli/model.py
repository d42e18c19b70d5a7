"""Reference models in plain torch: llama, MemoryLLM and Flex-MemoryLLM in one implementation.

Module attribute names mirror the canonical checkpoint names (``model.layers.{i}.mlp.up_proj.weight``),
so a state dict loads with ``strict=True`` and nothing is renamed or skipped silently.

Semantics (``docs/checkpoint-format.md``):

- llama:           ``h = x + Attn(RMS(x));  x' = h + MLP(RMS_post(h))``
- memoryllm:       ``x' = x + Attn(RMS(x)) + alpha * MLP(MemNorm_i(X0))``
- flex_memoryllm:  ``h = x + Attn(RMS(x));  x' = h + CtxMLP(RMS_post(h)) + alpha * MLP(MemNorm_i(X0))``

where ``X0`` is the token embedding. The context-free term ``alpha * MLP_i(MemNorm_i(X0))`` comes from a
pluggable :class:`ContextFreeSource`: the model's own FFNs (the default), a lookup table, or a ToL bundle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tolcli.checkpoint import Checkpoint
from tolcli.config import ModelConfig
from tolcli.errors import CheckpointError
from tolcli.layout import EMBED, LM_HEAD, MEMORY_FFN, expected_tensors, memory_ffn_names


def _work(x: Tensor) -> Tensor:
    """``x`` in at least fp32 (bf16/fp16 are upcast; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = _work(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32, with an optional bias (the memory norm of MemoryLLM)."""

    def __init__(self, dim: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        xf = _work(x)
        b = None if self.bias is None else self.bias.to(xf.dtype)
        return F.layer_norm(xf, (x.shape[-1],), self.weight.to(xf.dtype), b, self.eps).to(x.dtype)


def memory_norm(cfg: ModelConfig, bias: bool) -> nn.Module:
    if cfg.memory_norm_type == "rmsnorm":
        return RMSNorm(cfg.hidden_size, cfg.memory_norm_eps)
    return LayerNorm(cfg.hidden_size, cfg.memory_norm_eps, bias)


class FeedForward(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_tables(
    cfg: ModelConfig, seq_len: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos/sin tables [T, head_dim] in fp32, or fp64 for an fp64 model (HF Llama's default RoPE)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.int64).to(dtype) / d))
    t = torch.arange(seq_len, device=device, dtype=dtype)
    freqs = torch.outer(t, inv_freq)  # (T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, d)
    return emb.cos(), emb.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    xf = _work(x)
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=False)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerKV | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if cache is not None:  # keys and values of earlier positions, then causal within the new block
            start = cache.length
            k, v = cache.append(k, v)
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        if self.n_kv != self.n_head:
            rep = self.n_head // self.n_kv
            k = k.repeat_interleave(rep, dim=1)  # (B, nh, T, hd)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class LayerKV:
    """One layer's cached keys and values (after RoPE), preallocated for ``capacity`` positions (gpt-fast style)."""

    def __init__(self, batch: int, n_kv: int, capacity: int, head_dim: int, *, dtype: torch.dtype, device) -> None:
        self.k = torch.zeros(batch, n_kv, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new positions; return keys and values of every position so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache full: {end} positions, capacity {self.k.shape[2]}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer for incremental decoding: ``model(ids, source, cache=cache)`` runs only the
    new positions ``cache.length .. cache.length + T - 1`` and appends them.

    Example:
        >>> import torch
        >>> from tolcli import load_model, open_checkpoint, demo_checkpoint_path, KVCache
        >>> model = load_model(open_checkpoint(demo_checkpoint_path()))
        >>> cache = KVCache(model.cfg, capacity=8)
        >>> _ = model([1, 2, 3], cache=cache); step = model([4], cache=cache)
        >>> bool(torch.allclose(step[0, -1], model([1, 2, 3, 4])[0, -1], atol=1e-5)), cache.length
        (True, 4)
    """

    def __init__(
        self, cfg: ModelConfig, *, batch: int = 1, capacity: int | None = None, dtype=torch.float32, device="cpu"
    ):
        self.capacity = capacity or cfg.max_position_embeddings
        self.layers = [
            LayerKV(batch, cfg.num_key_value_heads, self.capacity, cfg.head_dim, dtype=dtype, device=device)
            for _ in range(cfg.num_hidden_layers)
        ]

    @property
    def length(self) -> int:
        return self.layers[0].length


def context_free_term(norm: nn.Module, mlp: Callable[[Tensor], Tensor], alpha: float, x0: Tensor) -> Tensor:
    """``alpha * MLP(MemNorm(x0))``: the term a memory layer adds, and exactly what a ToL row stores."""
    return alpha * mlp(norm(x0))


class MemoryFFN(nn.Module):
    """One layer's context-free FFN on its own (precompute loads these one at a time)."""

    def __init__(self, cfg: ModelConfig, *, memory_norm_bias: bool = False):
        super().__init__()
        self.alpha = cfg.ffn_alpha
        self.memory_layernorm = memory_norm(cfg, memory_norm_bias)
        self.mlp = FeedForward(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x0: Tensor) -> Tensor:
        return context_free_term(self.memory_layernorm, self.mlp, self.alpha, x0)


def load_memory_ffn(ckpt: Checkpoint, layer: int, *, device: str | torch.device = "cpu") -> MemoryFFN:
    """Layer ``layer``'s context-free FFN from a checkpoint, in fp32; reads only its own tensors."""
    names = memory_ffn_names(ckpt.config, layer)
    bias = ckpt.has(names["norm_b"])
    with torch.device("meta"):
        ffn = MemoryFFN(ckpt.config, memory_norm_bias=bias)
    state = {
        "memory_layernorm.weight": names["norm_w"],
        "mlp.gate_proj.weight": names["gate"],
        "mlp.up_proj.weight": names["up"],
        "mlp.down_proj.weight": names["down"],
    }
    if bias:
        state["memory_layernorm.bias"] = names["norm_b"]
    ffn.load_state_dict({k: ckpt.load(v, device=device) for k, v in state.items()}, strict=True, assign=True)
    return ffn.eval()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, *, memory_ffn: bool = True, memory_norm_bias: bool = False):
        super().__init__()
        self.cfg = cfg
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        if cfg.model_type in ("llama", "flex_memoryllm"):
            self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.model_type == "llama":
            self.mlp = FeedForward(cfg.hidden_size, cfg.intermediate_size)
        if cfg.model_type == "flex_memoryllm":
            self.context_mlp = FeedForward(cfg.hidden_size, cfg.context_intermediate_size)
        self.has_memory_ffn = cfg.has_memory and memory_ffn
        if self.has_memory_ffn:
            self.memory_layernorm = memory_norm(cfg, memory_norm_bias)
            self.mlp = FeedForward(cfg.hidden_size, cfg.intermediate_size)

    def memory_term(self, x0: Tensor) -> Tensor:
        """The context-free term ``alpha * MLP(MemNorm(x0))`` this layer adds (what a ToL row stores)."""
        if not self.has_memory_ffn:
            raise CheckpointError(
                "this model has no context-free FFN weights (a stripped checkpoint?)",
                hint="run it with a ToL bundle: eval-ppl CHECKPOINT --tol BUNDLE",
            )
        return context_free_term(self.memory_layernorm, self.mlp, self.cfg.ffn_alpha, x0)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, memory: Tensor | None, cache: LayerKV | None = None
    ) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        if self.cfg.model_type == "llama":
            return h + self.mlp(self.post_attention_layernorm(h))
        if self.cfg.model_type == "flex_memoryllm":
            h = h + self.context_mlp(self.post_attention_layernorm(h))
        if memory is not None:
            h = h + memory.to(h.dtype)
        return h


class ContextFreeSource(Protocol):
    """Where the context-free term of each layer comes from.

    Called with the layer index, the token ids (B, T) and the token embeddings X0 (B, T, h); returns the
    term to add (B, T, h), already scaled by ``ffn_alpha``, or ``None`` when the layer contributes
    nothing (a dropped or absent layer).
    """

    def __call__(self, layer: int, token_ids: Tensor, x0: Tensor) -> Tensor | None: ...


class FFNSource:
    """The model's own context-free FFNs (the baseline)."""

    def __init__(self, model: Transformer):
        self.layers = model.model.layers

    def __call__(self, layer: int, token_ids: Tensor, x0: Tensor) -> Tensor | None:
        return self.layers[layer].memory_term(x0)


class ZeroSource:
    """Every context-free term is zero (measures how much the FFN memory matters)."""

    def __call__(self, layer: int, token_ids: Tensor, x0: Tensor) -> Tensor | None:
        return None


class TableSource:
    """Lookup tables ``{layer: Tensor[V, h]}``; layers absent from the mapping contribute zero."""

    def __init__(self, tables: Mapping[int, Tensor]):
        self.tables = dict(tables)

    def __call__(self, layer: int, token_ids: Tensor, x0: Tensor) -> Tensor | None:
        table = self.tables.get(layer)
        if table is None:
            return None
        return table[token_ids.to(table.device)].to(x0.device)


class DropSource:
    """Another source with some layers removed (they contribute zero): measures layer dropping."""

    def __init__(self, inner: ContextFreeSource, dropped: set[int]):
        self.inner, self.dropped = inner, set(dropped)

    def __call__(self, layer: int, token_ids: Tensor, x0: Tensor) -> Tensor | None:
        return None if layer in self.dropped else self.inner(layer, token_ids, x0)


class _Inner(nn.Module):
    def __init__(self, cfg: ModelConfig, memory_ffn: bool, memory_norm_bias: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(cfg, memory_ffn=memory_ffn, memory_norm_bias=memory_norm_bias) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """One decoder-only model for llama / memoryllm / flex_memoryllm configs.

    Args:
        cfg: the architecture.
        memory_ffn: build the context-free FFNs (False for a stripped checkpoint run from a bundle).
        memory_norm_bias: the memory LayerNorm has a bias.
    """

    def __init__(self, cfg: ModelConfig, *, memory_ffn: bool = True, memory_norm_bias: bool = False):
        super().__init__()
        self.cfg = cfg
        self.model = _Inner(cfg, memory_ffn, memory_norm_bias)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """nanoGPT-style init: normal(0, std) matrices, unit norms, zero biases."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if p.ndim == 2:
                    p.normal_(0.0, std, generator=generator)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.fill_(1.0)

    def forward(
        self, idx: Tensor | list[int], source: ContextFreeSource | None = None, *, cache: KVCache | None = None
    ) -> Tensor:
        """Logits (B, T, V) for token ids ``idx``: (B, T), or one sequence as a 1-D tensor or a list (B = 1).

        ``source`` supplies the context-free terms; ``None`` uses the model's own FFNs. With ``cache``, ``idx``
        holds only the new positions, which attend to the cached ones (incremental decoding).
        """
        idx = as_token_batch(idx, self.model.embed_tokens.weight.device)
        cfg = self.cfg
        _, T = idx.shape
        x0 = self.model.embed_tokens(idx)  # (B, T, h)
        start = 0 if cache is None else cache.length
        cos, sin = rope_tables(cfg, start + T, idx.device, torch.promote_types(x0.dtype, torch.float32))
        cos, sin = cos[start:], sin[start:]
        if cfg.has_memory and source is None:
            source = FFNSource(self)
        x = x0
        for i, layer in enumerate(self.model.layers):
            memory = source(i, idx, x0) if (cfg.has_memory and source is not None) else None
            x = layer(x, cos, sin, memory, None if cache is None else cache.layers[i])
        return self.lm_head(self.model.norm(x))  # (B, T, V)


def as_token_batch(idx: Tensor | list[int], device: torch.device) -> Tensor:
    """Token ids as a (B, T) int64 tensor: a (B, T) tensor as it is, a 1-D tensor or a list as one sequence.
    Floats and booleans are refused (they would index silently)."""
    if isinstance(idx, (list, tuple)):
        idx = torch.tensor(idx, dtype=torch.long)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"token ids must be integers, got {idx.dtype}")
    if idx.ndim == 1:
        idx = idx[None, :]
    if idx.ndim != 2:
        raise ValueError(f"token ids must be (B, T), (T,) or a list, got shape {tuple(idx.shape)}")
    return idx.to(device=device, dtype=torch.long)


def load_model(
    ckpt: Checkpoint,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    memory_ffn: bool = True,
) -> Transformer:
    """Build a :class:`Transformer` from a checkpoint.

    The model is built on the meta device and the checkpoint's tensors are assigned into it, so no
    weight is held twice. Every parameter must come from the checkpoint (strict), with its exact shape.
    ``memory_ffn=False`` skips the context-free FFN weights (they are then never read); a stripped
    checkpoint never has them.

    Example:
        >>> import torch
        >>> from tolcli import load_model, open_checkpoint, demo_checkpoint_path, ZeroSource
        >>> model = load_model(open_checkpoint(demo_checkpoint_path()))
        >>> ids = torch.tensor([[10, 20, 30]])
        >>> model(ids).shape, bool((model(ids) != model(ids, ZeroSource())).any())
        (torch.Size([1, 3, 4096]), True)
    """
    cfg = ckpt.config
    memory_ffn = memory_ffn and not cfg.stripped
    specs = expected_tensors(cfg)
    wanted = [
        s.name
        for s in specs.values()
        if ckpt.has(s.name)
        and (memory_ffn or s.group != MEMORY_FFN)
        and not (s.name == LM_HEAD and cfg.tie_word_embeddings)
    ]
    bias = any(n.endswith("memory_layernorm.bias") for n in wanted)
    with torch.device("meta"):
        model = Transformer(cfg, memory_ffn=memory_ffn, memory_norm_bias=bias)
    state = {name: ckpt.load(name, dtype=dtype, device=device) for name in wanted}
    if cfg.tie_word_embeddings:
        state[LM_HEAD] = state[EMBED]
    model.load_state_dict(state, strict=True, assign=True)  # every key used, every shape equal
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
