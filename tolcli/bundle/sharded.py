"""Sharded bundles: a directory with ``tol.index.json`` and shard files, for bundles too big for one file.

``tol.index.json`` (canonical JSON)::

    {"format": "tolcli.tol.sharded", "format_version": 1,
     "manifest": {... the bundle manifest, exactly as a single-file bundle holds it ...},
     "shards": [{"name": "tol-00001-of-00003.safetensors", "bytes": N, "sha256": "..."}, ...],
     "weight_map": {"layers.0.table": "tol-00001-of-00003.safetensors", ...}}

Each shard is a plain container file, such as safetensors or HDF5 (the layout of a single-file bundle), without
a manifest of its own. Tensors are assigned to shards in data order, starting a new shard when the next
tensor would push the current one past ``max_shard_size`` (a tensor larger than that gets a shard to
itself). :class:`ShardedReader` exposes the same interface as the single-file readers, so everything
that reads bundles reads both forms identically.

The reader trusts nothing in the directory: the index is read by the hardened JSON loader and must have exactly the
fields above; each shard must be a regular file whose name (no path) is listed once, and a symlink must resolve
inside the directory; a file named like a shard that the index does not list is refused; and ``verify``
(:meth:`ShardedReader.verify_files`) checks every shard's size and sha256 against the index, so the index's sha256
covers every byte of the bundle.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tolcli.bundle import container as registry
from tolcli.bundle.container import ContainerReader
from tolcli.bundle.entries import TensorEntry, data_order
from tolcli.bundle.manifest import canonical_json
from tolcli.bundle.spec import MAX_TENSORS
from tolcli.errors import InputError, VerifyError
from tolcli.fsutil import atomic_dir, sha256_file
from tolcli.jsonsafe import inside, load_file, plain_file_name, regular_file, short

INDEX_NAME = "tol.index.json"
SHARDED_FORMAT = "tolcli.tol.sharded"
SHARDED_VERSION = 1
MAX_INDEX_BYTES = 64 << 20
INDEX_FIELDS = frozenset({"format", "format_version", "manifest", "shards", "weight_map"})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHARD_NAME = re.compile(r"tol-\d{5,}-of-\d{5,}\.[A-Za-z0-9]+")


def partition(entries: list[TensorEntry], max_bytes: int) -> list[list[TensorEntry]]:
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in data_order(entries):
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_name(k: int, n: int, container: str) -> str:
    return f"tol-{k + 1:05d}-of-{n:05d}{registry.get(container).suffixes[0]}"


def write_shards(
    directory: Path, groups: list[list[TensorEntry]], names: list[str], container: str, compression: str | None
) -> list[dict[str, Any]]:
    """Write shard files into ``directory``; returns their ``shards`` records."""
    records = []
    for group, name in zip(groups, names, strict=True):
        path = directory / name
        registry.get(container).write(path, group, None, compression)
        records.append({"name": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return records


def index_document(
    manifest: dict[str, Any], records: list[dict[str, Any]], weight_map: dict[str, str]
) -> dict[str, Any]:
    return {
        "format": SHARDED_FORMAT,
        "format_version": SHARDED_VERSION,
        "manifest": manifest,
        "shards": records,
        "weight_map": dict(sorted(weight_map.items())),
    }


def write_sharded(
    path: Path,
    entries: list[TensorEntry],
    manifest: dict[str, Any],
    *,
    container: str,
    max_shard_size: int,
    compression: str | None,
    force: bool,
) -> Path:
    """Write a sharded bundle directory atomically (a temp directory renamed into place)."""
    groups = partition(entries, max_shard_size)
    names = [shard_name(k, len(groups), container) for k in range(len(groups))]
    with atomic_dir(path, force=force) as tmp:
        records = write_shards(tmp, groups, names, container, compression)
        weight_map = {e.name: n for g, n in zip(groups, names, strict=True) for e in g}
        (tmp / INDEX_NAME).write_text(canonical_json(index_document(manifest, records, weight_map)), encoding="utf-8")
    return path


class ShardedReader:
    """Reads a sharded bundle through per-shard readers; validates the index against the shards."""

    def __init__(self, directory: Path):
        self.path = directory
        index_path = directory / INDEX_NAME
        if not index_path.exists() and not index_path.is_symlink():
            raise InputError(f"a directory bundle needs {INDEX_NAME}", path=directory)
        inside(index_path, directory, what="the shard index")
        index = load_file(index_path, what="malformed shard index", max_bytes=MAX_INDEX_BYTES, label="the shard index")
        ok = (
            isinstance(index, dict)
            and index.get("format") == SHARDED_FORMAT
            and isinstance(index.get("manifest"), dict)
            and isinstance(index.get("shards"), list)
            and isinstance(index.get("weight_map"), dict)
        )
        if not ok:
            raise InputError(f"not a tolcli shard index (format {SHARDED_FORMAT!r} expected)", path=index_path)
        version = index.get("format_version")
        if type(version) is not int or version != SHARDED_VERSION:
            raise InputError(
                f"shard index version {short(version, 40)} is not supported", path=index_path, hint="upgrade tolcli"
            )
        if set(index) != INDEX_FIELDS:
            raise InputError(
                f"unexpected shard index fields {short(sorted(set(index) - INDEX_FIELDS))}", path=index_path
            )
        self.records: list[dict[str, Any]] = self._records(index["shards"], index_path)
        self.weight_map: dict[str, str] = index["weight_map"]
        if len(self.weight_map) > MAX_TENSORS or not all(isinstance(v, str) for v in self.weight_map.values()):
            raise InputError("malformed weight map (tensor name -> shard file name)", path=index_path)
        self._refuse_unlisted(index_path)
        self.manifest_text = canonical_json(index["manifest"])
        self.shards: dict[str, ContainerReader] = {}
        kinds: set[str] = set()
        try:
            for rec in self.records:
                name = rec["name"]
                f = directory / name
                if not f.exists():
                    raise InputError(f"shard {name} is missing", path=directory)
                inside(f, directory, what="shard")
                size = regular_file(f, what=f"shard {name}").st_size
                if size != rec["bytes"]:
                    raise VerifyError(f"shard {name} has {size} bytes, the index says {rec['bytes']}", path=directory)
                self.shards[name] = registry.container_of(f).open(f, shard=True)
                kinds.add(self.shards[name].container)
            for name, reader in self.shards.items():
                held = set(reader.stored())
                listed = {t for t, s in self.weight_map.items() if s == name}
                if held != listed:
                    extra = sorted(held ^ listed)[:3]
                    raise InputError(
                        f"shard {name} and the index disagree about tensors {short(extra)}", path=directory
                    )
            missing = set(self.weight_map.values()) - set(self.shards)
            if missing:
                raise InputError(
                    f"the weight map names shards not in the index: {short(sorted(missing)[:3])}", path=index_path
                )
        except BaseException:
            self.close()
            raise
        self.container = kinds.pop() if len(kinds) == 1 else registry.DEFAULT  # mixed (or no) shards: the default

    def _records(self, shards: list[Any], index_path: Path) -> list[dict[str, Any]]:
        """The ``shards`` records, strictly: ``{"name", "bytes", "sha256"}``, plain unique file names."""
        if len(shards) > MAX_TENSORS:
            raise InputError(f"the index lists {len(shards):,} shards (limit {MAX_TENSORS:,})", path=index_path)
        seen: set[str] = set()
        for rec in shards:
            name = rec.get("name") if isinstance(rec, dict) else None
            ok = (
                isinstance(rec, dict)
                and set(rec) == {"name", "bytes", "sha256"}
                and plain_file_name(name)
                and name != INDEX_NAME
                and not name.startswith(".")
                and type(rec["bytes"]) is int
                and rec["bytes"] >= 0
                and isinstance(rec["sha256"], str)
                and _SHA256.fullmatch(rec["sha256"]) is not None
            )
            if not ok:
                raise InputError(f"bad shard entry {short(rec)}", path=index_path)
            if name in seen:
                raise InputError(f"shard {short(name)} is listed twice", path=index_path)
            seen.add(name)
        return shards

    def _refuse_unlisted(self, index_path: Path) -> None:
        """A file named like a shard (``tol-*-of-*``, or any container suffix) that the index does not list: an
        extra or left-over shard, which another reader might pick up."""
        listed = {r["name"] for r in self.records}
        suffixes = {s for c in registry.containers() for s in c.suffixes}
        for p in self.path.iterdir():
            if p.name in listed or p.name == INDEX_NAME:
                continue
            if _SHARD_NAME.fullmatch(p.name) or p.suffix.lower() in suffixes:
                raise InputError(
                    f"{p.name} looks like a shard but {INDEX_NAME} does not list it",
                    path=self.path,
                    hint="remove it, or rewrite the bundle",
                )

    def verify_files(self) -> None:
        """Every shard's size and sha256 against the index (what ``verify`` adds for a sharded bundle)."""
        for rec in self.records:
            f = self.path / rec["name"]
            size = regular_file(f, what=f"shard {rec['name']}").st_size
            if size != rec["bytes"]:
                raise VerifyError(
                    f"shard {rec['name']} has {size} bytes, the index says {rec['bytes']}", path=self.path
                )
            digest = sha256_file(f)
            if digest != rec["sha256"]:
                raise VerifyError(
                    f"shard {rec['name']}: sha256 {digest[:16]}... does not match the index ({rec['sha256'][:16]}...)",
                    path=self.path,
                )

    def stored(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        out: dict[str, tuple[str, tuple[int, ...]]] = {}
        for reader in self.shards.values():
            out.update(reader.stored())
        return out

    def _reader(self, name: str) -> ContainerReader:
        return self.shards[self.weight_map[name]]

    def array(self, name: str) -> np.ndarray:
        return self._reader(name).array(name)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        return self._reader(name).rows(name, ids)

    def blocks(self, name: str, rows: int) -> Iterator[np.ndarray]:
        return self._reader(name).blocks(name, rows)

    def view(self, name: str) -> np.ndarray | None:
        """The shard's zero-copy view of a tensor (see :meth:`tolcli.bundle.reader.Bundle.lookup_layers`), or None
        where its container has none."""
        view = getattr(self._reader(name), "view", None)
        return None if view is None else view(name)

    def release(self) -> None:
        """Each shard's ``release`` (memory-mapped pages handed back to the kernel), where its container has one."""
        for r in self.shards.values():
            release = getattr(r, "release", None)
            if release is not None:
                release()

    def close(self) -> None:
        for r in self.shards.values():
            r.close()
