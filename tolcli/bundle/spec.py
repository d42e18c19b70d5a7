"""Bundle format v1: names, dtypes and limits. No I/O here (``docs/bundle-format.md`` is the prose).

A bundle holds, for each context-free layer ``i`` of a model, the tensors of that layer's codec, named
``layers.{i}.{role}`` (the dense codec's single role is ``table``: a [vocab, hidden] matrix), plus an
optional ``tokenizer`` (U8 bytes of ``tokenizer.json``) and a JSON manifest that describes everything.
"""

from __future__ import annotations

from tolcli.config import MAX_HIDDEN, MAX_LAYERS, MAX_VOCAB

FORMAT_NAME = "tolcli.tol"
FORMAT_VERSION = 1

# Containers, their suffixes and how files are told apart: tolcli.bundle.container.
# safetensors: the manifest is one __metadata__ entry (canonical JSON); "format": "pt" as torch expects.
ST_MANIFEST_KEY = "tol.manifest"
# HDF5: the manifest is a root attribute; tensor ``layers.3.table`` is dataset ``/layers/3/table``.
H5_MANIFEST_ATTR = "tol.manifest"

TOKENIZER_TENSOR = "tokenizer"
LAYER_PREFIX = "layers."
# Tensors read by several layers (a cross-layer SVD's A factor): ``shared.{group}.{role}``, its bytes counted in the
# first present layer that reads it (docs/bundle-format.md, "Shared tensors").
SHARED_PREFIX = "shared."
MAX_SHARED_GROUPS = 1 << 16

# Bounds checked before anything is allocated from a file's header.
MAX_HEADER_BYTES = 100 << 20
MAX_TENSORS = 1 << 16
MAX_DIM = 1 << 31
MAX_MANIFEST_BYTES = 64 << 20
# Model sizes a manifest may declare: those of a model config (tolcli.config), checked before any per-layer object
# is built from a manifest.
MAX_MANIFEST_LAYERS = MAX_LAYERS
MAX_MANIFEST_VOCAB = MAX_VOCAB
MAX_MANIFEST_HIDDEN = MAX_HIDDEN
MAX_NDIM = 8
# An embedded (or checkpoint) tokenizer.json: parsed with `tokenizers` before it is embedded or used.
MAX_TOKENIZER_BYTES = 64 << 20
# HDF5: groups and datasets one file may hold (each visited once), the largest chunk a read may pull in, and how
# far compressed data may expand (declared bytes beyond max(MIN, RATIO x stored bytes) are refused unread).
MAX_H5_OBJECTS = 2 * MAX_TENSORS + 16
MAX_H5_CHUNK_BYTES = 64 << 20
MAX_H5_EXPANSION = 64
MIN_H5_EXPANSION_BYTES = 64 << 20


def layer_tensor(layer: int, role: str) -> str:
    return f"{LAYER_PREFIX}{layer}.{role}"


def shared_tensor(group: int, role: str) -> str:
    return f"{SHARED_PREFIX}{group}.{role}"


def parse_layer_tensor(name: str) -> tuple[int, str] | None:
    """``layers.12.table`` -> (12, "table"); None for other names."""
    if not name.startswith(LAYER_PREFIX):
        return None
    idx, _, role = name[len(LAYER_PREFIX) :].partition(".")
    if not idx.isdigit() or not role or (len(idx) > 1 and idx[0] == "0"):
        return None
    return int(idx), role
