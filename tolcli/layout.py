"""The canonical checkpoint layout: tensor names, shapes and roles, as data.

Hugging-Face-Llama naming (``docs/checkpoint-format.md``). Every tensor a checkpoint may hold is listed
here with its expected shape and its *group*, so that a reader can (a) validate a checkpoint from its
headers alone and (b) load only the groups a command needs (precompute never touches attention).
"""

from __future__ import annotations

from dataclasses import dataclass

from tolcli.config import ModelConfig
from tolcli.errors import UsageError

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

# Groups. ``memory_ffn`` is the context-free FFN whose outputs become ToLs.
EMBEDDING = "embedding"
ATTENTION = "attention"
MEMORY_FFN = "memory_ffn"
CONTEXT_FFN = "context_ffn"
HEAD = "head"
GROUPS: tuple[str, ...] = (EMBEDDING, ATTENTION, MEMORY_FFN, CONTEXT_FFN, HEAD)

# Tensors that HF checkpoints sometimes carry and that hold no weights; skipped by name.
IGNORED_SUFFIXES: tuple[str, ...] = (".rotary_emb.inv_freq",)


def layer_name(i: int, suffix: str) -> str:
    return f"model.layers.{i}.{suffix}"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    group: str
    layer: int | None = None
    optional: bool = False


def expected_tensors(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor a checkpoint of this config holds, by canonical name."""
    h, v = cfg.hidden_size, cfg.vocab_size
    specs: list[TensorSpec] = [TensorSpec(EMBED, (v, h), EMBEDDING)]
    for i in range(cfg.num_hidden_layers):

        def add(suffix: str, shape: tuple[int, ...], group: str, optional: bool = False, i: int = i) -> None:
            specs.append(TensorSpec(layer_name(i, suffix), shape, group, i, optional))

        add("input_layernorm.weight", (h,), ATTENTION)
        add("self_attn.q_proj.weight", (cfg.q_size, h), ATTENTION)
        add("self_attn.k_proj.weight", (cfg.kv_size, h), ATTENTION)
        add("self_attn.v_proj.weight", (cfg.kv_size, h), ATTENTION)
        add("self_attn.o_proj.weight", (h, cfg.q_size), ATTENTION)
        mlp_group = MEMORY_FFN if cfg.has_memory else CONTEXT_FFN
        ffn = cfg.intermediate_size
        if not (cfg.has_memory and cfg.stripped):  # a stripped checkpoint has no context-free FFN
            add("mlp.gate_proj.weight", (ffn, h), mlp_group)
            add("mlp.up_proj.weight", (ffn, h), mlp_group)
            add("mlp.down_proj.weight", (h, ffn), mlp_group)
        if cfg.has_memory and not cfg.stripped:
            add("memory_layernorm.weight", (h,), MEMORY_FFN)
            if cfg.memory_norm_type == "layernorm":
                add("memory_layernorm.bias", (h,), MEMORY_FFN, optional=True)
        if cfg.model_type in ("llama", "flex_memoryllm"):
            add("post_attention_layernorm.weight", (h,), CONTEXT_FFN)
        if cfg.model_type == "flex_memoryllm":
            c = cfg.context_intermediate_size
            add("context_mlp.gate_proj.weight", (c, h), CONTEXT_FFN)
            add("context_mlp.up_proj.weight", (c, h), CONTEXT_FFN)
            add("context_mlp.down_proj.weight", (h, c), CONTEXT_FFN)
    specs.append(TensorSpec(FINAL_NORM, (h,), HEAD))
    specs.append(TensorSpec(LM_HEAD, (v, h), HEAD, optional=cfg.tie_word_embeddings))
    return {s.name: s for s in specs}


def parse_layer_spec(spec: str, num_layers: int) -> list[int]:
    """``"0-3,7,10-"`` -> sorted layer indices (ranges inclusive; an open end runs to the last layer)."""
    out: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a) if a else 0, int(b) if b else num_layers - 1
            else:
                lo = hi = int(part)
        except ValueError:
            raise UsageError(f"bad layer spec {spec!r}: expected e.g. '0-3,7' or '12-'") from None
        if not 0 <= lo <= hi < num_layers:
            raise UsageError(f"layer spec {spec!r} is outside 0..{num_layers - 1}")
        out.update(range(lo, hi + 1))
    if not out:
        raise UsageError(f"layer spec {spec!r} selects no layer")
    return sorted(out)


def memory_ffn_names(cfg: ModelConfig, layer: int) -> dict[str, str]:
    """Canonical names of one layer's context-free FFN, by role (gate, up, down, norm_w, norm_b)."""
    return {
        "gate": layer_name(layer, "mlp.gate_proj.weight"),
        "up": layer_name(layer, "mlp.up_proj.weight"),
        "down": layer_name(layer, "mlp.down_proj.weight"),
        "norm_w": layer_name(layer, "memory_layernorm.weight"),
        "norm_b": layer_name(layer, "memory_layernorm.bias"),
    }
