"""The bundle manifest: its JSON Schema (``tolcli schema``), canonical encoding, and validation.

The manifest is canonical JSON (sorted keys, no insignificant whitespace, UTF-8), so the same content
always gives the same bytes. It is validated against :data:`MANIFEST_SCHEMA` and then against the
bundle's actual tensors on every read.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jsonschema

from tolcli.bundle.spec import FORMAT_NAME, FORMAT_VERSION, TOKENIZER_TENSOR
from tolcli.dtypes import DTYPES
from tolcli.errors import InputError

_SHA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_NAT = {"type": "integer", "minimum": 0}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://tolcli.dev/schema/bundle-manifest-v1.json",
    "title": "tolcli ToL bundle manifest, format version 1",
    "type": "object",
    "required": ["format", "format_version", "tolcli_version", "source", "model", "vocabulary", "layers", "tensors"],
    "additionalProperties": False,
    "properties": {
        "format": {"const": FORMAT_NAME},
        "format_version": {"const": FORMAT_VERSION},
        "tolcli_version": {"type": "string"},
        "created": {"type": "string", "description": "UTC time from SOURCE_DATE_EPOCH; absent when it is unset"},
        "source": {
            "type": "object",
            "required": ["checkpoint", "files", "config"],
            "additionalProperties": False,
            "properties": {
                "checkpoint": {"type": "string", "description": "directory (or file) name, without its path"},
                "files": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "bytes", "sha256"],
                        "additionalProperties": False,
                        "properties": {"name": {"type": "string"}, "bytes": _NAT, "sha256": _SHA},
                    },
                },
                "config": {"type": "object", "description": "the checkpoint's config as tolcli read it"},
            },
        },
        "model": {
            "type": "object",
            "required": ["type", "vocab_size", "hidden_size", "num_layers", "ffn_alpha", "memory_norm_type"],
            "additionalProperties": False,
            "properties": {
                "type": {"enum": ["memoryllm", "flex_memoryllm"]},
                "vocab_size": {"type": "integer", "minimum": 1},
                "hidden_size": {"type": "integer", "minimum": 1},
                "num_layers": {"type": "integer", "minimum": 1},
                "ffn_alpha": {"type": "number"},
                "memory_norm_type": {"enum": ["layernorm", "rmsnorm"]},
            },
        },
        "vocabulary": {
            "type": "object",
            "required": ["size", "embedded", "tokenizer_sha256", "special_tokens"],
            "additionalProperties": False,
            "properties": {
                "size": {"type": "integer", "minimum": 1},
                "embedded": {
                    "type": "boolean",
                    "description": f"tokenizer.json bytes are the {TOKENIZER_TENSOR!r} tensor",
                },
                "tokenizer_sha256": {"oneOf": [_SHA, {"type": "null"}]},
                "special_tokens": {"type": "array", "items": {"type": "string"}},
            },
        },
        "layers": {
            "type": "array",
            "description": "one entry per original layer index, in order",
            "items": {
                "type": "object",
                "required": ["index", "status"],
                "additionalProperties": False,
                "properties": {
                    "index": _NAT,
                    "status": {"enum": ["present", "dropped"]},
                    "codec": {"type": "string"},
                    "params": {"type": "object"},
                    "tensors": {
                        "type": "object",
                        "additionalProperties": {"type": "string"},
                        "description": "codec role -> tensor name",
                    },
                    "stored_bytes": _NAT,
                    "bits_per_value": {"type": "number", "minimum": 0},
                    "rel_error": {
                        "type": ["number", "null"],
                        "description": "||stored - exact||_F / ||exact||_F vs the fp32 computation",
                    },
                    "weighted_rel_error": {"type": ["number", "null"]},
                    "max_abs": {"type": ["number", "null"]},
                    "fp16_overflow": {**_NAT, "description": "values with |x| > 65504 (would overflow fp16)"},
                },
                "if": {"properties": {"status": {"const": "present"}}},
                "then": {"required": ["codec", "params", "tensors", "stored_bytes", "bits_per_value"]},
            },
        },
        "tensors": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["dtype", "shape", "bytes", "sha256"],
                "additionalProperties": False,
                "properties": {
                    "dtype": {"enum": sorted(DTYPES)},
                    "shape": {"type": "array", "items": _NAT},
                    "bytes": _NAT,
                    "sha256": _SHA,
                },
            },
        },
        "warnings": {"type": "array", "items": {"type": "string"}},
        "history": {
            "type": "array",
            "description": "the commands that produced this bundle, oldest first",
            "items": {"type": "object", "required": ["command"], "properties": {"command": {"type": "string"}}},
        },
    },
}


def canonical_json(obj: Any) -> str:
    """Sorted keys, compact separators, no NaN: the same content always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def created_timestamp() -> str | None:
    """RFC 3339 UTC time from ``SOURCE_DATE_EPOCH``, or None when unset (outputs stay reproducible)."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw.strip() == "":
        return None
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(raw)))
    except (ValueError, OverflowError, OSError):
        raise InputError(f"SOURCE_DATE_EPOCH={raw!r} is not a Unix timestamp") from None


def parse_manifest(text: str | bytes, *, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"manifest is not valid JSON ({e})", path=where) from None
    validate_schema(doc, where=where)
    return doc


def validate_schema(doc: Any, *, where: str) -> None:
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if (
        isinstance(doc, dict)
        and doc.get("format") == FORMAT_NAME
        and isinstance(version, int)
        and version > FORMAT_VERSION
    ):
        raise InputError(
            f"bundle format version {version} is newer than this tolcli understands ({FORMAT_VERSION})",
            path=where,
            hint="upgrade tolcli",
        )
    err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(MANIFEST_SCHEMA).iter_errors(doc))
    if err is not None:
        loc = "/".join(str(p) for p in err.absolute_path) or "(root)"
        raise InputError(f"manifest is invalid at {loc}: {err.message[:300]}", path=where)


def check_against_tensors(
    manifest: dict[str, Any], stored: dict[str, tuple[str, tuple[int, ...]]], *, where: str
) -> None:
    """The manifest and the stored tensors (name -> (dtype, shape)) must agree exactly."""
    from tolcli.codecs import codec_from_manifest

    declared = manifest["tensors"]
    for name in sorted(set(declared) | set(stored)):
        if name not in stored:
            raise InputError(f"manifest lists tensor {name!r} but the bundle does not hold it", path=where)
        if name not in declared:
            raise InputError(f"bundle holds tensor {name!r} that the manifest does not list", path=where)
        d, (dtype, shape) = declared[name], stored[name]
        if d["dtype"] != dtype or tuple(d["shape"]) != shape:
            raise InputError(
                f"tensor {name!r} is stored as {dtype}{list(shape)} but the manifest says {d['dtype']}{d['shape']}",
                path=where,
            )
        n = DTYPES[dtype].itemsize * math.prod(shape)
        if d["bytes"] != n:
            raise InputError(f"tensor {name!r}: manifest says {d['bytes']} bytes, shape implies {n}", path=where)
    model = manifest["model"]
    layers = manifest["layers"]
    if [e["index"] for e in layers] != list(range(model["num_layers"])):
        raise InputError(f"manifest layers must list indices 0..{model['num_layers'] - 1} in order", path=where)
    if manifest["vocabulary"]["size"] != model["vocab_size"]:
        raise InputError("manifest vocabulary.size differs from model.vocab_size", path=where)
    if manifest["vocabulary"]["embedded"] != (TOKENIZER_TENSOR in declared):
        raise InputError("manifest vocabulary.embedded disagrees with the tokenizer tensor", path=where)
    for e in layers:
        if e["status"] != "present":
            continue
        codec = codec_from_manifest(e["codec"], e["params"])
        specs = codec.tensor_specs(model["vocab_size"], model["hidden_size"])
        if set(e["tensors"]) != set(specs):
            raise InputError(
                f"layer {e['index']}: codec {e['codec']} stores roles {sorted(specs)}, "
                f"manifest lists {sorted(e['tensors'])}",
                path=where,
            )
        for role, (shape, dtype) in specs.items():
            name = e["tensors"][role]
            if name not in declared:
                raise InputError(f"layer {e['index']}: tensor {name!r} is missing", path=where)
            if declared[name]["dtype"] != dtype or tuple(declared[name]["shape"]) != shape:
                raise InputError(
                    f"layer {e['index']}: tensor {name!r} is {declared[name]['dtype']}{declared[name]['shape']}, "
                    f"codec {e['codec']} {e['params']} expects {dtype}{list(shape)}",
                    path=where,
                )
