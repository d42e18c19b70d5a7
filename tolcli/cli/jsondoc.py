"""The ``--json`` documents: one envelope on every command's document, the error document, and their JSON Schemas.

This module is the one place the documents' shapes are declared: :data:`COMMAND_KEYS` lists each command's own
keys, :data:`ENVELOPE` the keys every document shares; :func:`document_schema` builds the published JSON Schema
(draft 2020-12) that ``tolcli schema COMMAND`` prints and ``tests/test_json_output.py`` validates every command's
output against. docs/json-output.md describes them for people. Torch-free (``tolcli schema`` stays fast).

Versioning: :data:`SCHEMA_VERSION` rises when a key is removed or renamed or changes type or meaning; adding a key
does not raise it (readers ignore keys they do not know; the schemas list every key, so a test fails until it
is declared here and documented).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tolcli import __version__
from tolcli.errors import EXIT_CODE_MEANINGS, ExitCode

SCHEMA_VERSION = 1
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_ID = "https://tolcli.dev/schema/{name}-output-v{v}.json"

Schema = dict[str, Any]

_STR: Schema = {"type": "string"}
_STR_OR_NULL: Schema = {"type": ["string", "null"]}
_NAT: Schema = {"type": "integer", "minimum": 0}
_NAT_OR_NULL: Schema = {"type": ["integer", "null"], "minimum": 0}
_NUM: Schema = {"type": "number"}
_NUM_OR_NULL: Schema = {"type": ["number", "null"]}
_BOOL: Schema = {"type": "boolean"}
_OBJ: Schema = {"type": "object"}
_STRS: Schema = {"type": "array", "items": _STR}
LAYERS: Schema = {
    "type": "array",
    "items": _NAT,
    "uniqueItems": True,
    "description": "layer indices, ascending (every command reports layers this way)",
}
_MANIFEST: Schema = {"$ref": "https://tolcli.dev/schema/bundle-manifest-v1.json"}
_CODE_STATS: Schema = {
    "type": "object",
    "additionalProperties": False,
    "required": [
        "index",
        "codec",
        "codes",
        "stored_bits_per_code",
        "entropy_bits_per_code",
        "stored_bytes",
        "zstd_bytes",
        "entropy_coded_bytes",
    ],
    "properties": {
        "index": {"type": "integer", "minimum": 0, "description": "the layer"},
        "codec": {"type": "string"},
        "codes": {"type": "integer", "minimum": 0, "description": "integer codes the layer stores (0: none)"},
        "stored_bits_per_code": {"type": ["number", "null"], "description": "their stored width (null: no codes)"},
        "entropy_bits_per_code": {
            "type": ["number", "null"],
            "description": "their empirical order-0 entropy, per code tensor, averaged over the codes",
        },
        "stored_bytes": {"type": "integer", "minimum": 0, "description": "every tensor of the layer"},
        "zstd_bytes": {"type": "integer", "minimum": 0, "description": "the same, each tensor zstd level 3"},
        "entropy_coded_bytes": {
            "type": "integer",
            "minimum": 0,
            "description": "stored_bytes with the code tensors at their entropy (an ideal order-0 coder)",
        },
    },
}


def _d(schema: Schema, description: str) -> Schema:
    return {**schema, "description": description}


ERROR_CODES = {c.name.lower(): int(c) for c in ExitCode if c != ExitCode.OK}

ERROR_OBJECT: Schema = {
    "type": "object",
    "additionalProperties": False,
    "required": ["code", "exit_code", "message", "hint", "path"],
    "properties": {
        "code": _d({"enum": list(ERROR_CODES)}, "the exit code's name: " + ", ".join(ERROR_CODES)),
        "exit_code": _d({"enum": list(ERROR_CODES.values())}, "the process's exit code (docs/errors.md)"),
        "message": _d(_STR, "what is wrong, on one line (the stderr line without its hint)"),
        "hint": _d(_STR_OR_NULL, "how to fix it, or null"),
        "path": _d(_STR_OR_NULL, "the file concerned, or null"),
    },
}

# key -> (schema, description): the keys of every document, success or error.
ENVELOPE: dict[str, tuple[Schema, str]] = {
    "tolcli_version": (_STR, "the tolcli that wrote the document"),
    "command": (_STR, "the command, e.g. eval-ppl"),
    "schema_version": ({"const": SCHEMA_VERSION}, "this document's schema version (docs/json-output.md)"),
    "ok": (_BOOL, "true when the command succeeded (exit 0); false with `error` otherwise"),
    "input": (_STR_OR_NULL, "the primary input (checkpoint, bundle or archive) as given; null if none"),
    "inputs": (_STRS, "every input path or checkpoint the command read, the primary one first"),
    "output": (_STR_OR_NULL, "the file or directory written; null when the command writes nothing"),
    "bytes_written": (_NAT_OR_NULL, "bytes of `output` (a directory: all its files); null when nothing was written"),
    "seconds": (_NUM, "wall time of the command, from parsing to this document"),
    "error": (ERROR_OBJECT, "present exactly when `ok` is false: what failed"),
}

_GATE: Schema = {
    "type": "object",
    "additionalProperties": False,
    "required": ["max_increase_pct", "significant", "verdict", "failed"],
    "properties": {
        "max_increase_pct": _d(_NUM_OR_NULL, "--max-increase, or null when no gate was set"),
        "significant": _d(_BOOL, "--gate-significant: fail only when the whole interval exceeds the limit"),
        "verdict": _d({"enum": ["pass", "fail", None]}, "pass or fail; null when no gate was set"),
        "failed": _d(_STRS, "names of the variants that failed the gate (empty when it passed or was not set)"),
    },
}

_VARIANT: Schema = {
    "type": "object",
    "required": ["name", "kind", "ppl", "ppl_stderr", "ppl_change_pct", "mean_kl", "top1_agreement", "tokens"],
    "properties": {
        "name": _STR,
        "kind": {"enum": ["baseline", "bundle", "drop", "reference"]},
        "ppl": _NUM_OR_NULL,
        "ppl_stderr": _NUM_OR_NULL,
        "ppl_change_pct": _NUM_OR_NULL,
        "mean_kl": _NUM_OR_NULL,
        "top1_agreement": _NUM_OR_NULL,
        "tokens": _NAT,
        "bytes": _NAT_OR_NULL,
        "layers_present": LAYERS,
        "layers_kept": LAYERS,
    },
}

_ROW: Schema = {
    "type": "object",
    "required": ["name", "family", "ppl", "ppl_change_pct", "mean_kl", "top1_agreement", "stored_bytes"],
    "properties": {
        "name": _STR,
        "family": _STR,
        "ppl": _NUM_OR_NULL,
        "ppl_change_pct": _NUM_OR_NULL,
        "mean_kl": _NUM_OR_NULL,
        "top1_agreement": _NUM_OR_NULL,
        "stored_bytes": _NAT_OR_NULL,
    },
}

_BUNDLE_SUMMARY: Schema = {
    "type": "object",
    "additionalProperties": False,
    "required": [
        "container",
        "file_bytes",
        "layers_present",
        "layers_dropped",
        "stored_bytes",
        "dense_fp16_bytes",
        "fraction_of_dense_fp16",
        "error_feedback",
    ],
    "properties": {
        "container": _STR,
        "file_bytes": _NAT,
        "layers_present": LAYERS,
        "layers_dropped": _NAT,
        "stored_bytes": _NAT,
        "dense_fp16_bytes": _NAT,
        "fraction_of_dense_fp16": _NUM,
        "error_feedback": _BOOL,
    },
}

# command -> {key: (schema, description)}: every key a command adds to the envelope (all of them always present).
COMMAND_KEYS: dict[str, dict[str, tuple[Schema, str]]] = {
    "info": {
        "checkpoint": (_STR, "the checkpoint's resolved path"),
        "model_type": (_STR, "memoryllm or llama"),
        "config": (_OBJ, "the model configuration"),
        "parameters": (_OBJ, "parameter counts: embedding, attention, memory_ffn, context_ffn, head, total, active"),
        "storage": (_OBJ, "stored dtypes, weight files, tensor bytes, whether a tokenizer is present"),
        "tol": (_OBJ, "ToL tables: layers, rows, width, bytes per layer and in total per storage type"),
    },
    "inspect": {
        "path": (_STR, "the bundle (same as `input`; kept from schema version 0)"),
        "layers_present": (LAYERS, "the layers the bundle stores"),
        "summary": (_BUNDLE_SUMMARY, "size figures; `summary.layers_present` is the same list as `layers_present`"),
        "manifest": (_MANIFEST, "the bundle's manifest (tolcli schema)"),
        "code_statistics": (
            {"type": ["array", "null"], "items": _CODE_STATS},
            "null unless --entropy: per present layer, its codes' entropy against their stored bits, and zstd sizes",
        ),
    },
    "verify": {
        "path": (_STR, "the bundle (same as `input`; kept from schema version 0)"),
        "layers_present": (LAYERS, "the layers the bundle stores"),
        "tensors": (_NAT, "tensors verified"),
        "bytes": (_NAT, "tensor bytes hashed and checked"),
    },
    "convert": {
        "bytes": (_NAT, "bytes of `output` (same as `bytes_written`; kept from schema version 0)"),
    },
    "drop": {
        "bytes": (_NAT, "bytes of `output` (same as `bytes_written`; kept from schema version 0)"),
        "layers_present": (LAYERS, "the layers the written bundle stores"),
    },
    "compress": {
        "bytes": (_NAT, "bytes of `output` (same as `bytes_written`; kept from schema version 0)"),
        "layers_present": (LAYERS, "the layers the written bundle stores"),
        "stored_bytes": (_NAT, "codec bytes of the present layers (tokenizer not counted)"),
        "fraction_of_dense_fp16": (_NUM, "stored_bytes over every layer's dense fp16 table"),
        "ranks": ({"type": "object", "additionalProperties": _NAT}, "SVD rank per layer index (empty if no SVD)"),
        "rel_error": ({"type": "object", "additionalProperties": _NUM_OR_NULL}, "relative error per layer index"),
        "plan": (
            {"type": ["object", "null"]},
            "scheme auto: budget_bytes, stored_bytes, weighted_sq_error, per layer index the chosen codec with "
            "its stored_bytes and weighted_sq_error, and validation (null without --validate: else the plans "
            "evaluated, each with label, stored_bytes, weighted_sq_error, mean_kl, ppl_change_pct and its codec "
            "per layer); null otherwise",
        ),
        "manifest": (_MANIFEST, "the written bundle's manifest"),
    },
    "precompute": {
        "bytes": (_NAT, "bytes of `output` (same as `bytes_written`; kept from schema version 0)"),
        "layers_present": (LAYERS, "the layers the written bundle stores"),
        "layers_computed": (_NAT, "layers computed by this run (fewer than present after --resume)"),
        "manifest": (_MANIFEST, "the written bundle's manifest"),
    },
    "pack": {
        "bytes_in": (_NAT, "bytes of the bundle read"),
        "bytes_out": (_NAT, "bytes of the .zst written (same as `bytes_written`)"),
        "ratio": (_NUM, "bytes_in / bytes_out"),
    },
    "unpack": {
        "bytes": (_NAT, "bytes of `output` (same as `bytes_written`; kept from schema version 0)"),
    },
    "eval-ppl": {
        "protocol": (_OBJ, "what was scored and how: model, data files, ctx, stride, rule, confidence, gate options"),
        "variants": ({"type": "array", "items": _VARIANT}, "one entry per variant, the reference first"),
        "per_file": ({"type": "array", "items": _OBJ}, "perplexity per data file and variant"),
        "gate": (_GATE, "the quality gate: threshold, verdict and failing variants"),
    },
    "sweep": {
        "directory": (_STR, "the sweep directory (same as `output`; kept from schema version 0)"),
        "rows": ({"type": "array", "items": _ROW}, "one row per variant, as in results.json"),
        "protocol": (_OBJ, "eval-ppl's protocol block plus the sweep's options"),
        "plots": (_STRS, "the figures written"),
        "gate": (_GATE, "the quality gate: threshold, verdict and failing variants"),
    },
    "strip": {
        "tensors_kept": (_NAT, "tensors in the stripped checkpoint"),
        "tensors_removed": (_NAT, "context-free FFN tensors removed"),
        "bytes_removed": (_NAT, "bytes of the removed tensors"),
        "source_fingerprint": (_STR_OR_NULL, "the original checkpoint's fingerprint, recorded for pairing"),
    },
    "bench-lookup": {
        "bundle": (_STR, "the bundle (same as `input`; kept from schema version 0)"),
        "tokens": (_NAT, "token ids looked up"),
        "layers": (_NAT, "layers per lookup"),
        "cache_tokens": (_NAT, "hot tokens kept resident per layer"),
        "hot_tokens_from": (_STR, "where the hot tokens came from"),
        "resident_bytes": (_NAT, "bytes held by the cache"),
        "device": (_STR, "cpu or cuda"),
        "hit_rate": (_NUM, "fraction of lookups served by the cache"),
        "rows_per_s_direct": (_NUM, "rows per second read from the bundle"),
        "rows_per_s_cached": (_NUM, "rows per second with the cache"),
        "speedup": (_NUM, "rows_per_s_cached / rows_per_s_direct"),
    },
    "generate": {
        "prompt": (_STR, "the prompt as given"),
        "model": (_STR, "the checkpoint used"),
        "tol": (_STR_OR_NULL, "the bundle the context-free FFNs came from, or null"),
        "text": (_STR, "the generated text after the prompt"),
        "prompt_ids": ({"type": "array", "items": _NAT}, "the prompt's token ids"),
        "new_ids": ({"type": "array", "items": _NAT}, "the generated token ids"),
        "prefill_seconds": (_NUM, "seconds of the prompt's forward pass"),
        "ms_per_token": (_NUM, "milliseconds per generated token after the first"),
        "stopped": (_STR, "why generation stopped: max_new_tokens or stop token"),
    },
    "export-hf": {
        "tol": (_STR_OR_NULL, "the bundle recorded for a stripped checkpoint, or null"),
    },
    "schema": {
        "schemas": (_STRS, "the names `tolcli schema NAME` accepts"),
    },
}

COMMANDS: tuple[str, ...] = tuple(COMMAND_KEYS)
SCHEMA_NAMES: tuple[str, ...] = ("manifest", "error", *COMMANDS)


def _object(keys: dict[str, tuple[Schema, str]], required: Sequence[str]) -> Schema:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(required),
        "properties": {k: _d(s, d) for k, (s, d) in keys.items()},
    }


def _with_manifest(schema: Schema) -> Schema:
    """Embed the manifest schema (a resource of its own) where a document refers to it."""
    from tolcli.bundle.manifest import MANIFEST_SCHEMA

    return {**schema, "$defs": {"manifest": MANIFEST_SCHEMA}}


def document_schema(name: str) -> Schema:
    """The published JSON Schema of ``name``: a command's ``--json`` document, ``error`` (the document of a failure
    before a command's result exists), or ``manifest`` (a bundle's manifest)."""
    if name == "manifest":
        from tolcli.bundle.manifest import MANIFEST_SCHEMA

        return MANIFEST_SCHEMA
    head = {"$schema": SCHEMA_DIALECT, "$id": _ID.format(name=name, v=SCHEMA_VERSION)}
    always = [k for k in ENVELOPE if k != "error"]
    if name == "error":
        env = {**ENVELOPE, "command": (_STR_OR_NULL, "the command named on the command line, or null")}
        env["ok"] = ({"const": False}, "always false")
        body = _object(env, [*always, "error"])
        return {**head, "title": "tolcli --json error document", **body}
    if name not in COMMAND_KEYS:
        raise KeyError(name)
    keys = {**ENVELOPE, **COMMAND_KEYS[name]}
    keys["command"] = ({"const": name}, ENVELOPE["command"][1])
    body = _object(keys, [*always, *COMMAND_KEYS[name]])
    body["if"] = {"properties": {"ok": {"const": False}}}
    body["then"] = {"required": ["error"]}
    body["else"] = {"not": {"required": ["error"]}}
    schema = {**head, "title": f"tolcli {name} --json document", **body}
    return _with_manifest(schema) if any(s is _MANIFEST for s, _ in COMMAND_KEYS[name].values()) else schema


@dataclass
class _Run:
    """What the running command declared, for its document and for an error document."""

    command: str | None = None
    inputs: list[str] = field(default_factory=list)
    output: str | None = None
    t0: float = field(default_factory=time.monotonic)
    emitted: bool = False


_RUN = _Run()


def begin(command: str | None = None) -> None:
    """Start a run (``main`` calls it first): the clock starts, nothing declared, nothing emitted."""
    global _RUN
    _RUN = _Run(command=command)


def declare(command: str, inputs: Sequence[str | Path | None], output: str | Path | None) -> None:
    """A command names what it reads and writes before working, so that an error document can say so."""
    _RUN.command = command
    _RUN.inputs = [str(p) for p in inputs if p is not None]
    _RUN.output = None if output is None else str(output)


def emitted() -> bool:
    """Whether this run has printed its document (then an error adds none)."""
    return _RUN.emitted


def mark_emitted() -> None:
    _RUN.emitted = True


def envelope(*, ok: bool = True, output: str | Path | None = None, written: bool = True) -> dict[str, Any]:
    """The keys every document starts with; ``output`` overrides the declared one (the path actually written)."""
    out = _RUN.output if output is None else str(output)
    size = tree_bytes(Path(out)) if written and out is not None and Path(out).exists() else None
    return {
        "tolcli_version": __version__,
        "command": _RUN.command,
        "schema_version": SCHEMA_VERSION,
        "ok": ok,
        "input": _RUN.inputs[0] if _RUN.inputs else None,
        "inputs": list(_RUN.inputs),
        "output": out,
        "bytes_written": size,
        "seconds": round(time.monotonic() - _RUN.t0, 3),
    }


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of every regular file under a directory (a sweep's bundles too); links not followed."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def error_object(code: ExitCode, message: str, *, hint: str | None = None, path: str | Path | None = None) -> dict:
    """The ``error`` member of a document."""
    code = ExitCode(code)
    assert code in EXIT_CODE_MEANINGS and code != ExitCode.OK
    return {
        "code": code.name.lower(),
        "exit_code": int(code),
        "message": message,
        "hint": hint,
        "path": None if path is None else str(path),
    }


def error_document(error: dict[str, Any], command: str | None) -> dict[str, Any]:
    """The document a failure prints under ``--json`` when the command printed none."""
    if _RUN.command is None:
        _RUN.command = command
    return {**envelope(ok=False, written=False), "output": _RUN.output, "error": error}
