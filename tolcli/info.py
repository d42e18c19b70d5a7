"""What a checkpoint is: architecture, parameter counts and ToL table sizes (``tolcli info``).

The arithmetic works from a config alone (no tensor is allocated), so it can describe a 1B model's
shape on any machine; given an opened checkpoint it counts the tensors actually present.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tolcli.checkpoint import Checkpoint
from tolcli.codecs import CodecSpec, Dense, Int4
from tolcli.config import ModelConfig
from tolcli.dtypes import user_dtype_name
from tolcli.layout import ATTENTION, CONTEXT_FFN, EMBEDDING, GROUPS, HEAD, MEMORY_FFN, TensorSpec, expected_tensors

# The storages ``info`` sizes ToL tables in; each codec says what one value costs (codes + per-group metadata).
TOL_STORAGES: dict[str, CodecSpec] = {
    "fp32": Dense("fp32"),
    "fp16": Dense("fp16"),
    "bf16": Dense("bf16"),
    "int4-g64": Int4(group=64),
}
TOL_STORAGE_BYTES_PER_VALUE: dict[str, float] = {k: spec.bytes_per_value() for k, spec in TOL_STORAGES.items()}


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def parameter_counts(cfg: ModelConfig, present: set[str] | None = None) -> dict[str, int]:
    """Parameters per group, plus ``total`` and ``active``.

    ``active`` follows the MemoryLLM paper: attention plus the non-memory (context-aware) FFN, i.e.
    what runs per token once the context-free FFNs are replaced by ToLs; embeddings and the output head
    are reported separately. ``present`` (tensor names actually in a checkpoint) decides optional
    tensors such as the memory norm bias; with ``None`` optional tensors are not counted.
    """
    counts = dict.fromkeys(GROUPS, 0)
    specs: dict[str, TensorSpec] = expected_tensors(cfg)
    for s in specs.values():
        if s.optional and (present is None or s.name not in present):
            continue
        counts[s.group] += _numel(s.shape)
    counts["total"] = sum(counts[g] for g in GROUPS)
    counts["active"] = counts[ATTENTION] + counts[CONTEXT_FFN]
    return counts


def tol_sizes(cfg: ModelConfig) -> dict[str, Any]:
    """ToL table sizes: one [vocab, hidden] table per context-free layer, in each storage."""
    layers = cfg.num_hidden_layers if cfg.has_memory else 0
    per_layer = cfg.vocab_size * cfg.hidden_size
    return {
        "layers": layers,
        "rows": cfg.vocab_size,
        "width": cfg.hidden_size,
        "values_per_layer": per_layer,
        "bytes_per_layer": {k: round(per_layer * b) for k, b in TOL_STORAGE_BYTES_PER_VALUE.items()},
        "bytes_total": {k: round(per_layer * layers * b) for k, b in TOL_STORAGE_BYTES_PER_VALUE.items()},
    }


def describe_config(cfg: ModelConfig, present: set[str] | None = None) -> dict[str, Any]:
    return {
        "model_type": cfg.model_type,
        "config": cfg.to_dict(),
        "parameters": parameter_counts(cfg, present),
        "tol": tol_sizes(cfg),
    }


def describe_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    """Everything ``tolcli info`` reports, as a JSON-ready dictionary.

    Example:
        >>> from tolcli import describe_checkpoint, open_checkpoint, demo_checkpoint_path
        >>> doc = describe_checkpoint(open_checkpoint(demo_checkpoint_path()))
        >>> doc["parameters"]["total"], doc["tol"]["bytes_total"]["fp16"]
        (2001280, 6291456)
    """
    out = {"checkpoint": str(ckpt.path)}
    out.update(describe_config(ckpt.config, set(ckpt.tensors)))
    dtypes = sorted({user_dtype_name(t.dtype) for t in ckpt.tensors.values()})
    out["storage"] = {
        "files": [f.name for f in ckpt.files],
        "dtypes": dtypes,
        "tensor_bytes": ckpt.total_bytes(),
        "tokenizer": ckpt.tokenizer_path is not None,
    }
    return out


__all__ = [
    "ATTENTION",
    "CONTEXT_FFN",
    "EMBEDDING",
    "HEAD",
    "MEMORY_FFN",
    "TOL_STORAGES",
    "TOL_STORAGE_BYTES_PER_VALUE",
    "describe_checkpoint",
    "describe_config",
    "parameter_counts",
    "tol_sizes",
]
