"""Shared fuzz target: read a (possibly mangled) bundle the way every command does.

Anything but success or tolcli's own error type is a bug: :func:`read_everything` lets other
exceptions escape so that the fuzzers see them.
"""

from __future__ import annotations

from pathlib import Path

from tolcli import open_bundle
from tolcli.errors import TolcliError


def read_everything(path: Path) -> str:
    """Open, verify and look rows up; returns "ok" or the TolcliError's class name."""
    try:
        with open_bundle(path) as b:
            b.verify()
            for layer in b.layers:
                b.lookup(layer, [0, b.vocab_size - 1, 0])
            b.tokenizer_bytes()
        return "ok"
    except TolcliError as e:
        return type(e).__name__


def mutate(data: bytes, op: str, pos: int, value: int, length: int) -> bytes:
    """Deterministic mutations: flip a bit, overwrite a run, truncate, or edit the header region."""
    b = bytearray(data)
    if not b:
        return bytes(b)
    pos %= len(b)
    if op == "flip":
        b[pos] ^= 1 << (value % 8)
    elif op == "overwrite":
        for k in range(length):
            b[(pos + k) % len(b)] = (value + 31 * k) % 256
    elif op == "truncate":
        del b[pos:]
    elif op == "header":
        b[pos % min(len(b), 512)] = value % 256
    return bytes(b)
