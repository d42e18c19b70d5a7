"""Containers: the file formats a bundle (or one shard of a sharded bundle) is stored in, and their registry.

A container is one module holding an object that satisfies :class:`Container`, plus one :func:`register`
line (the built-ins are registered at the bottom of this module). Files are told apart by content
(:func:`container_of`), and a file whose suffix names one container while its content is another's (an HDF5 file
named ``.safetensors``, a safetensors/HDF5 polyglot named ``.h5``) is refused, naming both: a runtime that picks its
reader by the suffix would read other data than tolcli. Outputs pick a container by name or suffix
(:func:`by_suffix`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from tolcli.bundle import h5_format, st_format
from tolcli.bundle.entries import TensorEntry
from tolcli.errors import InputError
from tolcli.jsonsafe import regular_file

SNIFF_BYTES = 64
# Written when nothing names a container (a sharded directory without a suffix), and opened when no container
# recognises a file: safetensors has no magic number, and its reader says what such a file is instead.
DEFAULT = "safetensors"


class ContainerReader(Protocol):
    """An open container: what :class:`~tolcli.bundle.reader.Bundle` reads through."""

    container: str  # the container's name
    manifest_text: str  # "" for a shard

    def stored(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Tensor name -> (dtype, shape), as stored."""

    def array(self, name: str) -> np.ndarray:
        """A whole tensor, in its storage numpy dtype."""

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (int64, any order, repeats allowed) of a tensor."""

    def blocks(self, name: str, rows: int) -> Iterator[np.ndarray]:
        """A tensor in blocks of ``rows`` rows; a 0-d or empty tensor is one block."""

    def close(self) -> None: ...

    # Optional: ``view(name) -> np.ndarray | None``, a zero-copy read-only view of a tensor (over a memory map) or
    # None; ``Bundle.lookup_layers`` gathers from it when present (looked up with ``getattr``).


class Container(Protocol):
    """A file format for bundles and shards: recognises, opens and writes whole files."""

    @property
    def name(self) -> str:
        """For ``--format`` and ``Bundle.container``."""

    @property
    def label(self) -> str:
        """How messages name it ("HDF5")."""

    @property
    def suffixes(self) -> tuple[str, ...]:
        """Output suffixes; the first one names shards and is suggested in messages."""

    @property
    def compressions(self) -> tuple[str, ...]:
        """Accepted values of ``compression`` (empty: none)."""

    def sniff(self, head: bytes) -> bool:
        """Whether a file whose first bytes (up to :data:`SNIFF_BYTES`) are ``head`` is in this container."""

    def open(self, path: Path, *, shard: bool = False) -> ContainerReader:
        """A validating reader; ``shard=True``: a shard of a sharded bundle, without a manifest."""

    def write(self, path: Path, entries: list[TensorEntry], manifest_json: str | None, compression: str | None) -> None:
        """Write a whole file at ``path``; with ``manifest_json`` None, a shard."""


_REGISTRY: dict[str, Container] = {}


def register(container: Container) -> Container:
    """Add a container (its name and suffixes must be new); returns it."""
    taken = {s for c in _REGISTRY.values() for s in c.suffixes}
    if container.name in _REGISTRY or taken & set(container.suffixes):
        raise ValueError(f"container {container.name!r} or one of its suffixes {container.suffixes} is registered")
    _REGISTRY[container.name] = container
    return container


def unregister(name: str) -> None:
    del _REGISTRY[name]


def containers() -> tuple[Container, ...]:
    """The registered containers, in registration order."""
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Container:
    return _REGISTRY[name]


def by_suffix(suffix: str) -> Container | None:
    """The container a (case-insensitive) suffix such as ``.H5`` names, or None."""
    suffix = suffix.lower()
    return next((c for c in _REGISTRY.values() if suffix in c.suffixes), None)


def sniff(head: bytes) -> Container | None:
    """The container that recognises a file starting with ``head``, or None."""
    return next((c for c in _REGISTRY.values() if c.sniff(head)), None)


def check_suffix(path: Path, found: Container, *, name: str | None = None) -> None:
    """Refuse a file whose suffix (of ``name``, default ``path``'s) names a container other than ``found``, the
    container its content is in. Unknown suffixes say nothing and pass."""
    suffix = Path(name).suffix if name is not None else path.suffix
    named = by_suffix(suffix.lower())
    if named is not None and named.name != found.name:
        raise InputError(
            f"named {suffix} ({named.label}) but the content is {found.label}",
            path=path,
            hint=f"rename it {found.suffixes[0]} if it is meant to be read as {found.label}",
        )


def container_of(path: Path, *, name: str | None = None) -> Container:
    """The container of an existing regular file, by content (:data:`DEFAULT` when none recognises it); a known
    suffix (of ``name``, default ``path``'s) that names another container is refused (:func:`check_suffix`)."""
    regular_file(path, what="bundle")  # before opening: a FIFO would block
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", path=path) from None
    found = sniff(head)
    if found is None:
        return get(DEFAULT)  # its reader says what the file is instead (an LFS pointer, an HTML page, ...)
    check_suffix(path, found, name=name)
    return found


register(st_format.Safetensors())
register(h5_format.HDF5())
