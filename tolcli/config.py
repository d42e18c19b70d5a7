"""Model configuration: the Hugging-Face-style ``config.json`` keys tolcli understands, validated.

See ``docs/checkpoint-format.md`` for the meaning of each key.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tolcli.errors import CheckpointError
from tolcli.jsonsafe import load_file, short

MODEL_TYPES: tuple[str, ...] = ("memoryllm", "flex_memoryllm", "llama")
MEMORY_NORM_TYPES: tuple[str, ...] = ("layernorm", "rmsnorm")

# Sanity bounds checked before anything is allocated from a config (a forged config must not make
# tolcli allocate terabytes). They are far above any real model.
MAX_VOCAB = 1 << 24
MAX_HIDDEN = 1 << 17
MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_CONFIG_BYTES = 16 << 20  # real configs are a few KiB
# A source fingerprint (tolcli.pairing): "sha256:" and 64 lowercase hex digits.
SOURCE_FINGERPRINT_PATTERN = r"^sha256:[0-9a-f]{64}$"


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a llama / MemoryLLM / Flex-MemoryLLM checkpoint."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    memory_norm_type: str = "layernorm"
    memory_norm_eps: float = 1e-5
    ffn_alpha: float = 1.0
    context_intermediate_size: int = 0
    stripped: bool = False  # ``tolcli_stripped``: the context-free FFN weights were removed (run from a bundle)
    bos_token_id: int | None = None  # the tokenizer's begin-of-text id, when config.json names one
    eos_token_id: int | None = None  # end-of-text id (the first, when config.json lists several)
    source_fingerprint: str | None = None  # ``tolcli_source_fingerprint``: what strip recorded (tolcli.pairing)

    # ---- derived -------------------------------------------------------------------------------
    @property
    def has_memory(self) -> bool:
        """True when the model has context-free (token-wise) FFNs, i.e. ToLs."""
        return self.model_type in ("memoryllm", "flex_memoryllm")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | Path = "config.json") -> ModelConfig:
        """Build and validate a config from a ``config.json`` dictionary.

        Unknown keys are ignored (HF configs carry many); known keys are type- and range-checked.
        """
        if not isinstance(data, dict):
            raise CheckpointError("config must be a JSON object", path=source)
        mt = data.get("model_type")
        if mt not in MODEL_TYPES:
            raise CheckpointError(
                f"unknown model_type {short(mt, 80)}; expected one of {', '.join(MODEL_TYPES)}",
                path=source,
                hint="set model_type in config.json (see docs/checkpoint-format.md)",
            )

        def req_int(key: str, lo: int = 1, hi: int = 1 << 31) -> int:
            if key not in data:
                raise CheckpointError(f"missing required key {key!r}", path=source)
            return _int(data[key], key, source, lo, hi)

        hidden = req_int("hidden_size", 1, MAX_HIDDEN)
        heads = req_int("num_attention_heads", 1, MAX_HEADS)
        kv = _int(data.get("num_key_value_heads", heads), "num_key_value_heads", source, 1, MAX_HEADS)
        if heads % kv:
            raise CheckpointError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}", path=source
            )
        head_dim_raw = data.get("head_dim")
        if head_dim_raw is None:
            if hidden % heads:
                raise CheckpointError(
                    f"hidden_size={hidden} is not divisible by num_attention_heads={heads}; set head_dim",
                    path=source,
                )
            head_dim = hidden // heads
        else:
            head_dim = _int(head_dim_raw, "head_dim", source, 1, MAX_HIDDEN)
        if head_dim % 2:
            raise CheckpointError(f"head_dim={head_dim} must be even for RoPE", path=source)
        norm = data.get("memory_norm_type", "layernorm")
        if norm not in MEMORY_NORM_TYPES:
            raise CheckpointError(
                f"memory_norm_type={short(norm, 80)}; expected one of {', '.join(MEMORY_NORM_TYPES)}", path=source
            )
        ctx = 0
        if mt == "flex_memoryllm":
            ctx = req_int("context_intermediate_size", 1, 1 << 24)
        rms_eps = _float(data.get("rms_norm_eps", 1e-5), "rms_norm_eps", source)
        return cls(
            model_type=mt,
            vocab_size=req_int("vocab_size", 1, MAX_VOCAB),
            hidden_size=hidden,
            intermediate_size=req_int("intermediate_size", 1, 1 << 24),
            num_hidden_layers=req_int("num_hidden_layers", 1, MAX_LAYERS),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=rms_eps,
            rope_theta=_float(data.get("rope_theta", 10000.0), "rope_theta", source),
            max_position_embeddings=_int(
                data.get("max_position_embeddings", 2048), "max_position_embeddings", source, 1, 1 << 24
            ),
            tie_word_embeddings=_bool(data.get("tie_word_embeddings", False), "tie_word_embeddings", source),
            memory_norm_type=norm,
            memory_norm_eps=_float(data.get("memory_norm_eps", 1e-5), "memory_norm_eps", source),
            ffn_alpha=_float(data.get("ffn_alpha", 1.0), "ffn_alpha", source),
            context_intermediate_size=ctx,
            stripped=_bool(data.get("tolcli_stripped", False), "tolcli_stripped", source),
            bos_token_id=_token_id(data.get("bos_token_id"), "bos_token_id", source),
            eos_token_id=_token_id(data.get("eos_token_id"), "eos_token_id", source),
            source_fingerprint=_fingerprint(data.get("tolcli_source_fingerprint"), source),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` with the hardened JSON loader (:mod:`tolcli.jsonsafe`): a regular file of at most
        :data:`MAX_CONFIG_BYTES`, no NaN, no huge integers, no repeated keys, bounded nesting."""
        path = Path(path)
        data = load_file(path, max_bytes=MAX_CONFIG_BYTES, error=CheckpointError, label="config file")
        return cls.from_dict(data, source=path)

    def to_dict(self) -> dict[str, Any]:
        """The config as ``config.json`` keys (only the keys that apply to this model type)."""
        d = dataclasses.asdict(self)
        stripped = d.pop("stripped")
        if stripped:
            d["tolcli_stripped"] = True
        fingerprint = d.pop("source_fingerprint")
        if fingerprint is not None:
            d["tolcli_source_fingerprint"] = fingerprint
        if not self.has_memory:
            for k in ("memory_norm_type", "memory_norm_eps", "ffn_alpha"):
                d.pop(k)
        if self.model_type != "flex_memoryllm":
            d.pop("context_intermediate_size")
        for k in ("bos_token_id", "eos_token_id"):
            if d[k] is None:
                d.pop(k)
        return d


def _int(v: Any, key: str, source: str | Path, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise CheckpointError(f"{key} must be an integer, got {short(v, 80)}", path=source)
    if not lo <= v <= hi:
        raise CheckpointError(f"{key}={v} is out of range [{lo}, {hi}]", path=source)
    return v


def _float(v: Any, key: str, source: str | Path) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise CheckpointError(f"{key} must be a finite number, got {short(v, 80)}", path=source)
    return float(v)


def _bool(v: Any, key: str, source: str | Path) -> bool:
    if not isinstance(v, bool):
        raise CheckpointError(f"{key} must be true or false, got {short(v, 80)}", path=source)
    return v


def _token_id(v: Any, key: str, source: str | Path) -> int | None:
    """A special token id: absent/null, an integer, or a non-empty list of integers (the first is used)."""
    if v is None:
        return None
    if isinstance(v, list):
        if not v:
            return None
        v = v[0]
    return _int(v, key, source, 0, MAX_VOCAB - 1)


def _fingerprint(v: Any, source: str | Path) -> str | None:
    """``tolcli_source_fingerprint``: absent/null, or ``sha256:`` and 64 lowercase hex digits."""
    if v is None:
        return None
    if not isinstance(v, str) or not re.fullmatch(SOURCE_FINGERPRINT_PATTERN, v):
        raise CheckpointError(
            f"tolcli_source_fingerprint must be 'sha256:' and 64 lowercase hex digits, got {short(v, 80)}",
            path=source,
        )
    return v
