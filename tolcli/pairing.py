"""Tie ToL bundles to the checkpoint they were computed from: the *source fingerprint*.

A bundle's tables are a function of a few config values and of the token embedding and every layer's context-free
FFN (memory norm, gate, up, down), nothing else. :func:`source_fingerprint` hashes exactly those, in a canonical
serialisation (``docs/bundle-format.md``, "Source fingerprint"), so it does not depend on file names, sharding, the
order of tensors in files, the container (safetensors or torch), foreign tensor names (a tensor map), or on the
tensors the ToLs do not use (attention, the LM head, the context-aware FFN of flex_memoryllm). ``precompute``
records it in the manifest (``source.fingerprint``), ``strip`` in the stripped ``config.json``
(``tolcli_source_fingerprint``), and :func:`check_pairing` compares the two sides before a bundle is used with a
checkpoint.

The serialisation, version 1 (every line ends with ``\\n``; integers in decimal):

1. the line ``tolcli.source-fingerprint.v1``;
2. one line ``KEY=VALUE`` per config key of :data:`FINGERPRINT_KEYS`, in that order: strings as they are, integers
   in decimal, floats as ``f64:`` and the 16 lowercase hex digits of their IEEE 754 binary64 bits (big-endian,
   i.e. the bits as one unsigned 64-bit integer: ``1e-5`` is ``f64:3ee4f8b588e368f1``);
3. per tensor of :func:`fingerprint_tensors`, in that order: the line ``tensor NAME DTYPE SHAPE NBYTES`` (canonical
   name, ``F32``/``F16``/``BF16``, the dimensions joined by ``,``, the byte count), then the tensor's bytes as
   stored (little-endian, row-major).

The fingerprint is ``sha256:`` and the lowercase hex SHA-256 of those bytes.
"""

from __future__ import annotations

import hashlib
import struct
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from tolcli.checkpoint import Checkpoint
from tolcli.dtypes import TORCH_TO_DTYPE, tensor_to_numpy
from tolcli.errors import InputError
from tolcli.layout import EMBED, layer_name

if TYPE_CHECKING:
    from tolcli.bundle.reader import Bundle

FINGERPRINT_VERSION_LINE = "tolcli.source-fingerprint.v1"
# The config keys the context-free path reads (tolcli.model.MemoryFFN, tolcli.precompute), in serialisation order.
FINGERPRINT_KEYS: tuple[str, ...] = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "memory_norm_type",
    "memory_norm_eps",
    "ffn_alpha",
)
# Each layer's tensors in serialisation order; the LayerNorm bias only when the checkpoint has it.
LAYER_SUFFIXES: tuple[str, ...] = (
    "memory_layernorm.weight",
    "memory_layernorm.bias",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
ALLOW_HINT = "pass `allow_source_mismatch` if this is intended"

_cache: weakref.WeakKeyDictionary[Checkpoint, str] = weakref.WeakKeyDictionary()


def config_lines(ckpt: Checkpoint) -> str:
    """Part 2 of the serialisation: ``KEY=VALUE`` lines of :data:`FINGERPRINT_KEYS`."""
    lines = []
    for key in FINGERPRINT_KEYS:
        value = getattr(ckpt.config, key)
        if isinstance(value, float):
            value = "f64:" + struct.pack(">d", value).hex()
        lines.append(f"{key}={value}\n")
    return "".join(lines)


def fingerprint_tensors(ckpt: Checkpoint) -> list[str]:
    """The canonical names hashed, in order: the token embedding, then per layer ``0 .. L-1`` its memory norm
    weight (and bias, when present), gate, up and down projections."""
    names = [EMBED]
    for i in range(ckpt.config.num_hidden_layers):
        names += [layer_name(i, s) for s in LAYER_SUFFIXES if ckpt.has(layer_name(i, s))]
    return names


def _tensor_records(ckpt: Checkpoint) -> Iterator[bytes | memoryview]:
    """Part 3 of the serialisation, one tensor read at a time (header line, then its stored bytes)."""
    for name in fingerprint_tensors(ckpt):
        t = ckpt.load(name, dtype=None)
        arr = np.ascontiguousarray(tensor_to_numpy(t))
        dims = ",".join(str(d) for d in t.shape)
        yield f"tensor {name} {TORCH_TO_DTYPE[t.dtype].name} {dims} {arr.nbytes}\n".encode()
        yield memoryview(arr.reshape(-1).view(np.uint8))
        del t, arr


def compute_fingerprint(ckpt: Checkpoint) -> str:
    """The fingerprint of a full memory checkpoint, computed from its weights (no cache; see the module)."""
    h = hashlib.sha256(f"{FINGERPRINT_VERSION_LINE}\n{config_lines(ckpt)}".encode())
    for part in _tensor_records(ckpt):
        h.update(part)
    return "sha256:" + h.hexdigest()


def source_fingerprint(ckpt: Checkpoint) -> str | None:
    """What determines the checkpoint's ToLs, as ``sha256:<hex>``; cached per :class:`Checkpoint` object.

    A stripped checkpoint gives the fingerprint ``strip`` recorded in its ``config.json`` (None when absent); a
    model without context-free FFNs (llama) gives None.

    Example:
        >>> from tolcli import open_checkpoint, demo_checkpoint_path
        >>> from tolcli.pairing import source_fingerprint
        >>> source_fingerprint(open_checkpoint(demo_checkpoint_path()))[:7]
        'sha256:'
    """
    cfg = ckpt.config
    if not cfg.has_memory:
        return None
    if cfg.stripped:
        return cfg.source_fingerprint
    if ckpt not in _cache:
        _cache[ckpt] = compute_fingerprint(ckpt)
    return _cache[ckpt]


def short(fingerprint: str) -> str:
    """``sha256:`` and the first 12 hex digits, for messages."""
    return fingerprint[:19]


def check_shapes(ckpt: Checkpoint, bundle: Bundle) -> None:
    """The bundle's vocabulary, width and layer count must be the checkpoint's (InputError naming both)."""
    cfg = ckpt.config
    if (bundle.vocab_size, bundle.hidden_size, bundle.num_layers) != (
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.num_hidden_layers,
    ):
        raise InputError(
            f"bundle (vocab {bundle.vocab_size}, hidden {bundle.hidden_size}, {bundle.num_layers} layers) does not "
            f"match the checkpoint {ckpt.path} (vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, "
            f"{cfg.num_hidden_layers} layers)",
            path=bundle.path,
        )


def check_pairing(
    ckpt: Checkpoint, bundle: Bundle, *, allow_mismatch: bool, note: Callable[[str], None] = lambda s: None
) -> None:
    """Was ``bundle`` computed from ``ckpt``? First :func:`check_shapes`; then the manifest's ``source.fingerprint``
    against :func:`source_fingerprint`:

    - both known and equal: nothing is said;
    - both known and different: :class:`~tolcli.errors.InputError` naming the bundle and both short hashes, or,
      with ``allow_mismatch``, ``note("warning: ...")`` and the caller continues;
    - either unknown (a bundle written before fingerprints were recorded, a checkpoint stripped before that, a
      model without memory): ``note("warning: cannot check ...")`` and the caller continues, since neither side
      contradicts the other. A known mismatch is never passed silently.
    """
    check_shapes(ckpt, bundle)
    want = bundle.manifest["source"].get("fingerprint")
    have = source_fingerprint(ckpt)
    if want is None or have is None:
        why = "the bundle records no source fingerprint" if want is None else _unknown_reason(ckpt)
        note(f"warning: cannot check that {bundle.path} was computed from {ckpt.path}: {why}")
        return
    if want == have:
        return
    msg = (
        f"bundle was computed from another checkpoint (source fingerprint {short(want)}) than {ckpt.path} "
        f"({short(have)})"
    )
    if not allow_mismatch:
        raise InputError(msg, path=bundle.path, hint=ALLOW_HINT)
    note(f"warning: {bundle.path}: {msg}")


def _unknown_reason(ckpt: Checkpoint) -> str:
    if not ckpt.config.has_memory:
        return f"model_type {ckpt.config.model_type!r} has no context-free FFN"
    return "the stripped checkpoint records no source fingerprint (tolcli_source_fingerprint in config.json)"
