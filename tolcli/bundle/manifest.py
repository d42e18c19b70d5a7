"""The bundle manifest: its JSON Schema (``tolcli schema``), canonical encoding, and validation.

The manifest is canonical JSON (sorted keys, no insignificant whitespace, UTF-8), so the same content
always gives the same bytes. On every read it is parsed by the hardened loader (:mod:`tolcli.jsonsafe`), its sizes
are bounded before anything else looks at it (layers, tensors, ...), it is validated against
:data:`MANIFEST_SCHEMA` with strict types (an integer is an integer literal, never ``1.0``; a boolean is ``true`` or
``false``, never ``"false"``; each codec's ``params`` have a schema of their own), and then its meaning is checked
(:func:`check_manifest`): every tensor is bound to its layer, role and codec, and nothing is stored that no layer
reads. Last it is checked against the bundle's actual tensors (:func:`check_against_tensors`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from typing import Any

import jsonschema

from tolcli._lazy import lazy_import
from tolcli.bundle.spec import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_DIM,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_HIDDEN,
    MAX_MANIFEST_LAYERS,
    MAX_MANIFEST_VOCAB,
    MAX_NDIM,
    MAX_SHARED_GROUPS,
    MAX_TENSORS,
    MAX_TOKENIZER_BYTES,
    SHARED_PREFIX,
    TOKENIZER_TENSOR,
)
from tolcli.config import SOURCE_FINGERPRINT_PATTERN
from tolcli.dtypes import DTYPES
from tolcli.errors import InputError, TolcliError
from tolcli.jsonsafe import cut, loads, short

codecs = lazy_import("tolcli.codecs")  # torch: only when a layer is checked, not for `tolcli schema`

_SHA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_NAT = {"type": "integer", "minimum": 0}
_FLOAT_DTYPE = {"enum": ["F32", "F16", "BF16"]}
_GROUP_4BIT = {"type": "integer", "enum": [32, 64, 128]}
_FIT = {"enum": ["minmax", "mse"], "description": "how the scales were fitted (absent: minmax); decoding ignores it"}
_CENTER = {
    "const": True,
    "description": "the table was centred on its mean row: role `mean` F32 [1, C], added when decoding (absent: not)",
}
# Array and object sizes, checked before the schema (a million dropped layers must not take minutes to refuse).
MAX_FILES = 1 << 16
MAX_LIST = 1 << 16
MAX_SPECIAL_TOKENS = 1 << 20
FP16_MAX = 65504.0


def _params(codec: str, schema: dict[str, Any]) -> dict[str, Any]:
    """``params`` must match ``schema`` when ``codec`` is the codec's name (a JSON Schema if/then)."""
    return {
        "if": {"required": ["codec"], "properties": {"codec": {"const": codec}}},
        "then": {"properties": {"params": schema}},
    }


def _closed(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "additionalProperties": False, "properties": properties}


# The parameters of each built-in codec, exactly as the writers record them (docs/bundle-format.md, "Codecs").
CODEC_PARAMS_SCHEMAS: dict[str, dict[str, Any]] = {
    "dense": _closed(["dtype"], {"dtype": _FLOAT_DTYPE}),
    "int4": _closed(
        ["bits", "group_size", "symmetric"],
        {
            "bits": {"type": "integer", "const": 4},
            "group_size": _GROUP_4BIT,
            "symmetric": {"type": "boolean"},
            "fit": _FIT,
            "center": _CENTER,
        },
    ),
    "nf4": _closed(
        ["bits", "group_size"],
        {"bits": {"type": "integer", "const": 4}, "group_size": _GROUP_4BIT, "fit": _FIT, "center": _CENTER},
    ),
    "int8": _closed(
        ["bits", "group_size"],
        {
            "bits": {"type": "integer", "const": 8},
            "group_size": {"type": "integer", "minimum": 1, "maximum": MAX_DIM},
            "fit": _FIT,
            "center": _CENTER,
        },
    ),
    **{
        f"int{b}": _closed(
            ["bits", "group_size"],
            {"bits": {"type": "integer", "const": b}, "group_size": _GROUP_4BIT, "fit": _FIT, "center": _CENTER},
        )
        for b in (3, 2)
    },
    "svd": _closed(
        ["rank", "a", "method", "weighted"],
        {
            "rank": {"type": "integer", "minimum": 1, "maximum": MAX_MANIFEST_VOCAB},
            "a": {
                # any registered row-wise codec (a new codec needs no change here); built-ins checked by their schema
                **_closed(["codec", "params"], {"codec": {"type": "string"}, "params": {}}),
                "$ref": "#/$defs/codec_params",
            },
            "b_dtype": {
                **_FLOAT_DTYPE,
                "description": "B's dtype when B is one dense tensor (exactly one of b_dtype, b)",
            },
            "b": {
                # B's rows coded by a row-wise codec: roles B.<role>
                **_closed(["codec", "params"], {"codec": {"type": "string"}, "params": {}}),
                "$ref": "#/$defs/codec_params",
            },
            "residual": {
                # T - A B coded per layer by any codec but svd: roles R.<role>, added to A B
                **_closed(["codec", "params"], {"codec": {"type": "string"}, "params": {}}),
                "$ref": "#/$defs/codec_params",
            },
            "method": {"enum": ["exact", "randomized"]},
            "weighted": {"type": "boolean"},
            "oversample": {"type": "integer", "minimum": 0, "maximum": MAX_MANIFEST_HIDDEN},
            "power_iters": {"type": "integer", "minimum": 0, "maximum": 64},
            "seed": {"type": "integer", "minimum": 0, "maximum": (1 << 63) - 1},
            "gram": {"enum": ["fp32", "fp64"]},
            "normalize": {
                "const": True,
                "description": "A's columns were scaled by powers of two folded into B (absent: not); informational",
            },
            "shared": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_SHARED_GROUPS - 1,
                "description": "cross-layer SVD: A is the tensors shared.{shared}.A.*, read by every layer of the "
                "group (absent: A is this layer's own)",
            },
        },
    ),
}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://tolcli.dev/schema/bundle-manifest-v1.json",
    "title": "tolcli ToL bundle manifest, format version 1",
    "$defs": {
        "codec_params": {
            "description": "a codec's params by codec name (others: checked by a canonical round trip when read)",
            "allOf": [_params(name, schema) for name, schema in CODEC_PARAMS_SCHEMAS.items()],
        }
    },
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
                    "maxItems": MAX_FILES,
                    "items": {
                        "type": "object",
                        "required": ["name", "bytes", "sha256"],
                        "additionalProperties": False,
                        "properties": {"name": {"type": "string"}, "bytes": _NAT, "sha256": _SHA},
                    },
                },
                "config": {"type": "object", "description": "the checkpoint's config as tolcli read it"},
                "fingerprint": {
                    "type": "string",
                    "pattern": SOURCE_FINGERPRINT_PATTERN,
                    "minLength": 71,
                    "maxLength": 71,
                    "description": "sha256 of what determines the ToLs (docs/bundle-format.md); older bundles lack it",
                },
            },
        },
        "model": {
            "type": "object",
            "required": ["type", "vocab_size", "hidden_size", "num_layers", "ffn_alpha", "memory_norm_type"],
            "additionalProperties": False,
            "properties": {
                "type": {"enum": ["memoryllm", "flex_memoryllm"]},
                "vocab_size": {"type": "integer", "minimum": 1, "maximum": MAX_MANIFEST_VOCAB},
                "hidden_size": {"type": "integer", "minimum": 1, "maximum": MAX_MANIFEST_HIDDEN},
                "num_layers": {"type": "integer", "minimum": 1, "maximum": MAX_MANIFEST_LAYERS},
                "ffn_alpha": {"type": "number"},
                "memory_norm_type": {"enum": ["layernorm", "rmsnorm"]},
            },
        },
        "vocabulary": {
            "type": "object",
            "required": ["size", "embedded", "tokenizer_sha256", "special_tokens"],
            "additionalProperties": False,
            "properties": {
                "size": {"type": "integer", "minimum": 1, "maximum": MAX_MANIFEST_VOCAB},
                "embedded": {
                    "type": "boolean",
                    "description": f"tokenizer.json bytes are the {TOKENIZER_TENSOR!r} tensor",
                },
                "tokenizer_sha256": {"oneOf": [_SHA, {"type": "null"}]},
                "special_tokens": {"type": "array", "maxItems": MAX_SPECIAL_TOKENS, "items": {"type": "string"}},
            },
        },
        "layers": {
            "type": "array",
            "description": "one entry per original layer index, in order",
            "maxItems": MAX_MANIFEST_LAYERS,
            "items": {
                "type": "object",
                "required": ["index", "status"],
                "additionalProperties": False,
                "properties": {
                    "index": {**_NAT, "maximum": MAX_MANIFEST_LAYERS - 1},
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
                        "description": "||stored - exact||_F / ||exact||_F vs the fp32 computation; after more "
                        "than one lossy step (bf16 -> int4, int4 -> int4), the bound e0 + e1 (1 + e0)",
                    },
                    "weighted_rel_error": {"type": ["number", "null"]},
                    "max_abs": {"type": ["number", "null"], "minimum": 0},
                    "fp16_overflow": {**_NAT, "description": "values with |x| > 65504 (would overflow fp16)"},
                },
                "allOf": [
                    {
                        "if": {"properties": {"status": {"const": "present"}}},
                        "then": {"required": ["codec", "params", "tensors", "stored_bytes", "bits_per_value"]},
                        "else": {"not": {"anyOf": [{"required": [k]} for k in ("codec", "params", "tensors")]}},
                    },
                    {"$ref": "#/$defs/codec_params"},
                ],
            },
        },
        "tensors": {
            "type": "object",
            "maxProperties": MAX_TENSORS,
            "additionalProperties": {
                "type": "object",
                "required": ["dtype", "shape", "bytes", "sha256"],
                "additionalProperties": False,
                "properties": {
                    "dtype": {"enum": sorted(DTYPES)},
                    "shape": {"type": "array", "maxItems": MAX_NDIM, "items": {**_NAT, "maximum": MAX_DIM}},
                    "bytes": _NAT,
                    "sha256": _SHA,
                },
            },
        },
        "warnings": {"type": "array", "maxItems": MAX_LIST, "items": {"type": "string"}},
        "history": {
            "type": "array",
            "maxItems": MAX_LIST,
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
    """Parse (:func:`tolcli.jsonsafe.loads`) and schema-validate a manifest (:func:`validate_schema`)."""
    doc = loads(text, path=where, what="manifest is not valid JSON", max_bytes=MAX_MANIFEST_BYTES)
    validate_schema(doc, where=where)
    return doc


def _is_integer(checker: Any, instance: Any) -> bool:
    """JSON Schema calls ``1.0`` an integer; a manifest may not: sizes, shapes and indices are integer literals."""
    return isinstance(instance, int) and not isinstance(instance, bool)


_StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)
_VALIDATOR = _StrictValidator(MANIFEST_SCHEMA)


def _bound_sizes(doc: dict[str, Any], where: str) -> None:
    """The manifest's arrays and maps, counted before the schema walks them (a manifest of a million dropped layers
    is refused in the time it takes to parse it)."""
    source = doc.get("source") if isinstance(doc.get("source"), dict) else {}
    vocabulary = doc.get("vocabulary") if isinstance(doc.get("vocabulary"), dict) else {}
    for name, value, limit in (
        ("layers", doc.get("layers"), MAX_MANIFEST_LAYERS),
        ("tensors", doc.get("tensors"), MAX_TENSORS),
        ("source.files", source.get("files"), MAX_FILES),
        ("vocabulary.special_tokens", vocabulary.get("special_tokens"), MAX_SPECIAL_TOKENS),
        ("warnings", doc.get("warnings"), MAX_LIST),
        ("history", doc.get("history"), MAX_LIST),
    ):
        if isinstance(value, list | dict) and len(value) > limit:
            raise InputError(f"manifest {name} has {len(value):,} entries (limit {limit:,})", path=where)


def validate_schema(doc: Any, *, where: str) -> None:
    """The manifest against :data:`MANIFEST_SCHEMA`, with strict types (:func:`_is_integer`), sizes bounded first."""
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if (
        isinstance(doc, dict)
        and doc.get("format") == FORMAT_NAME
        and isinstance(version, int)
        and not isinstance(version, bool)
        and version > FORMAT_VERSION
    ):
        raise InputError(
            f"bundle format version {short(version, 40)} is newer than this tolcli understands ({FORMAT_VERSION})",
            path=where,
            hint="upgrade tolcli",
        )
    if isinstance(doc, dict):
        _bound_sizes(doc, where)
    err = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(doc))
    if err is not None:
        loc = "/".join(str(p)[:80] for p in err.absolute_path) or "(root)"
        raise InputError(f"manifest is invalid at {cut(loc, 200)}: {cut(err.message)}", path=where)


def check_against_tensors(
    manifest: dict[str, Any], stored: dict[str, tuple[str, tuple[int, ...]]], *, where: str
) -> None:
    """The manifest and the stored tensors (name -> (dtype, shape)) must agree exactly; then
    :func:`check_manifest`."""
    declared = manifest["tensors"]
    for name in sorted(set(declared) | set(stored)):
        if name not in stored:
            raise InputError(f"manifest lists tensor {short(name)} but the bundle does not hold it", path=where)
        if name not in declared:
            raise InputError(f"bundle holds tensor {short(name)} that the manifest does not list", path=where)
        d, (dtype, shape) = declared[name], stored[name]
        if d["dtype"] != dtype or tuple(d["shape"]) != shape:
            raise InputError(
                f"tensor {short(name)} is stored as {cut(str(dtype), 40)}{list(shape)} "
                f"but the manifest says {d['dtype']}{d['shape']}",
                path=where,
            )
        n = DTYPES[dtype].itemsize * math.prod(shape)
        if d["bytes"] != n:
            raise InputError(f"tensor {short(name)}: manifest says {d['bytes']} bytes, shape implies {n}", path=where)
    check_manifest(manifest, where=where)


def _codec(e: dict[str, Any], where: str) -> Any:
    """The codec of a present layer entry, its params checked strictly (built-ins by their schema, others by a
    canonical round trip)."""
    name, params = e["codec"], e["params"]
    registry = codecs.Codec.registry
    if name not in registry:
        raise InputError(
            f"layer {e['index']}: unknown codec {short(name, 80)}; this tolcli knows {', '.join(sorted(registry))}",
            path=where,
            hint="upgrade tolcli",
        )
    try:
        codec = codecs.codec_from_manifest(name, params)
    except TolcliError as err:
        raise InputError(f"layer {e['index']}: {cut(err.message)}", path=where) from None
    _check_canonical(codec, params, e["index"], where)
    return codec


def _check_canonical(codec: Any, params: dict[str, Any], index: int, where: str) -> None:
    """Parameters of a codec without a schema (``mixed``, or any codec a plugin registers), nested ones included (an
    svd's ``a``, ``b`` and ``residual``), must be exactly what the codec built from them writes."""
    if codec.name not in CODEC_PARAMS_SCHEMAS and canonical_json(codec.params()) != canonical_json(params):
        raise InputError(
            f"layer {index}: codec {codec.name} parameters {short(params)} are not in their canonical form "
            f"{short(codec.params())}",
            path=where,
        )
    for key, inner in codec.nested().items():
        _check_canonical(inner, params[key]["params"], index, where)


def check_manifest(manifest: dict[str, Any], *, where: str) -> None:
    """What a schema cannot say: layers in order; the vocabulary consistent; every present layer's tensors named
    by its codec (``layers.{i}.{role}``, or ``shared.{g}.{role}`` for a role its codec shares) for exactly its
    codec's roles, with the codec's dtypes and shapes; ``stored_bytes`` the bytes of its tensors that no earlier
    present layer reads (:func:`attribute_bytes`); layers reading a shared tensor agreeing on what shapes it
    (:meth:`~tolcli.codecs.base.Codec.shared_key`); an ``fp16_overflow`` count no larger than the table; and no
    tensor that no layer reads (except the tokenizer, whose hash is ``vocabulary.tokenizer_sha256``). So a
    tensor is read by one layer unless its name says it is shared, and a runtime that reads tensors by their
    documented names reads what tolcli reads."""
    declared = manifest["tensors"]
    model = manifest["model"]
    if [e["index"] for e in manifest["layers"]] != list(range(model["num_layers"])):
        raise InputError(f"manifest layers must list indices 0..{model['num_layers'] - 1} in order", path=where)
    _check_vocabulary(manifest["vocabulary"], model["vocab_size"], declared, where)
    referenced: set[str] = set()
    sharers: dict[str, tuple[int, str]] = {}  # shared tensor or group -> (first layer reading it, its shared_key)
    for e in manifest["layers"]:
        if e["status"] == "present":
            referenced |= _check_layer(e, model["vocab_size"], model["hidden_size"], declared, sharers, where)
    unread = sorted(set(declared) - referenced - {TOKENIZER_TENSOR})
    if unread:
        raise InputError(
            f"tensor {short(unread[0])} is stored but no layer reads it"
            + (f" (and {len(unread) - 1} more)" if len(unread) > 1 else ""),
            path=where,
        )


def _check_vocabulary(vocabulary: dict[str, Any], V: int, declared: dict[str, Any], where: str) -> None:
    if vocabulary["size"] != V:
        raise InputError("manifest vocabulary.size differs from model.vocab_size", path=where)
    if vocabulary["embedded"] != (TOKENIZER_TENSOR in declared):
        raise InputError("manifest vocabulary.embedded disagrees with the tokenizer tensor", path=where)
    if TOKENIZER_TENSOR in declared:
        tok = declared[TOKENIZER_TENSOR]
        if tok["dtype"] != "U8" or len(tok["shape"]) != 1 or tok["bytes"] > MAX_TOKENIZER_BYTES:
            raise InputError(
                f"the tokenizer tensor must be U8 bytes (at most {MAX_TOKENIZER_BYTES:,}), "
                f"the manifest says {tok['dtype']}{tok['shape']}",
                path=where,
            )
        if vocabulary["tokenizer_sha256"] != tok["sha256"]:
            raise InputError(
                "manifest vocabulary.tokenizer_sha256 differs from the sha256 of the embedded tokenizer", path=where
            )


def attribute_bytes(layers: list[dict[str, Any]], declared: dict[str, Any], values: int) -> list[dict[str, Any]]:
    """``layers`` (manifest entries) with each present layer's ``stored_bytes`` and ``bits_per_value`` set to the
    bytes of its tensors that no earlier present layer reads: a shared tensor is counted once, in the first present
    layer that reads it, so the layers' ``stored_bytes`` sum to the bundle's table bytes. What ``compress`` writes
    and what ``drop`` recomputes when that first layer goes. ``declared``: tensor name -> its manifest record;
    ``values``: a table's values (vocabulary x hidden size), for ``bits_per_value``.

    Example:
        >>> t = {"shared.0.A.table": {"bytes": 100}, "layers.0.B": {"bytes": 8}, "layers.1.B": {"bytes": 8}}
        >>> e = lambda i: {"index": i, "status": "present", "tensors": {"A.table": "shared.0.A.table",
        ...                "B": f"layers.{i}.B"}, "stored_bytes": 0, "bits_per_value": 0}
        >>> [x["stored_bytes"] for x in attribute_bytes([e(0), e(1)], t, 16)]
        [108, 8]
        >>> out = attribute_bytes([{"index": 0, "status": "dropped"}, e(1)], t, 16)
        >>> [(x.get("stored_bytes"), x.get("bits_per_value")) for x in out]
        [(None, None), (108, 54.0)]
    """
    owned = owned_tensors((e["index"], e["tensors"]) for e in layers if e["status"] == "present")
    out = []
    for e in layers:
        if e["status"] != "present":
            out.append(e)
            continue
        stored = sum(declared[n]["bytes"] for n in owned[e["index"]].values())
        out.append({**e, "stored_bytes": stored, "bits_per_value": 8 * stored / values})
    return out


def owned_tensors(layers: Iterable[tuple[int, dict[str, str]]]) -> dict[int, dict[str, str]]:
    """Per present layer (``(index, role -> tensor name)``, in layer order), the roles whose tensors no earlier layer
    reads, by role: where a shared tensor's bytes are counted (the manifest's ``stored_bytes``, ``inspect``).

    Example:
        >>> owned_tensors([(0, {"A": "shared.0.A", "B": "layers.0.B"}), (1, {"A": "shared.0.A", "B": "layers.1.B"})])
        {0: {'A': 'shared.0.A', 'B': 'layers.0.B'}, 1: {'B': 'layers.1.B'}}
    """
    seen: set[str] = set()
    out: dict[int, dict[str, str]] = {}
    for index, tensors in layers:
        out[index] = {}
        for role, name in sorted(tensors.items()):
            if name not in seen:
                seen.add(name)
                out[index][role] = name
    return out


def _check_layer(
    e: dict[str, Any], V: int, h: int, declared: dict[str, Any], sharers: dict[str, tuple[int, str]], where: str
) -> set[str]:
    """One present layer against its codec and the stored tensors; returns the tensor names it reads.
    ``sharers`` (updated): each shared tensor's first reader and the codec ``shared_key`` it was read with."""
    i = e["index"]
    codec = _codec(e, where)
    try:
        specs = codec.tensor_specs(V, h)
    except TolcliError as err:
        raise InputError(
            f"layer {i}: codec {e['codec']} cannot store a [{V}, {h}] table: {cut(err.message)}", path=where
        ) from None
    if set(e["tensors"]) != set(specs):
        raise InputError(
            f"layer {i}: codec {e['codec']} stores roles {sorted(specs)}, manifest lists {short(sorted(e['tensors']))}",
            path=where,
        )
    total = 0
    key = codec.shared_key()
    for role, (shape, dtype) in specs.items():
        name, want = e["tensors"][role], codec.tensor_name(i, role)
        if name != want:
            raise InputError(
                f"layer {i}: role {role} must be tensor {want!r}, the manifest names {short(name)}"
                " (tensors are bound to their layer and role)",
                path=where,
            )
        if name not in declared:
            raise InputError(f"layer {i}: tensor {name!r} is missing", path=where)
        if declared[name]["dtype"] != dtype or tuple(declared[name]["shape"]) != shape:
            raise InputError(
                f"layer {i}: tensor {name!r} is {declared[name]['dtype']}{declared[name]['shape']}, "
                f"codec {e['codec']} {short(e['params'])} expects {dtype}{list(shape)}",
                path=where,
            )
        if name.startswith(SHARED_PREFIX):
            # one group is one set of shared tensors: every layer reading any of them agrees on what shapes them
            group = SHARED_PREFIX + name[len(SHARED_PREFIX) :].partition(".")[0]
            agreed = sharers.setdefault(group, (i, key or ""))
            if agreed[1] != key:
                raise InputError(
                    f"layer {i}: shared tensor {name!r} is read by layer {agreed[0]} with other parameters "
                    f"({short(agreed[1])}; layer {i}: {short(key)})",
                    path=where,
                )
            if sharers.setdefault(name, (i, key or ""))[0] != i:
                continue  # counted in the first layer that reads it
        total += declared[name]["bytes"]
    if e["stored_bytes"] != total:
        raise InputError(
            f"layer {i}: stored_bytes is {e['stored_bytes']:,} but its tensors hold {total:,} bytes"
            " (a shared tensor counts in the first present layer that reads it)",
            path=where,
        )
    if not math.isclose(e["bits_per_value"], 8 * total / (V * h), rel_tol=1e-9):
        raise InputError(
            f"layer {i}: bits_per_value is {e['bits_per_value']!r}, its tensors give {8 * total / (V * h)!r}",
            path=where,
        )
    if e.get("fp16_overflow", 0) > V * h:
        raise InputError(
            f"layer {i}: fp16_overflow {e['fp16_overflow']:,} exceeds the table's {V * h:,} values", path=where
        )
    return set(e["tensors"].values())
