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
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tolcli.bundle import container as registry
from tolcli.bundle.container import ContainerReader
from tolcli.bundle.entries import TensorEntry, data_order
from tolcli.bundle.manifest import canonical_json
from tolcli.errors import InputError, VerifyError
from tolcli.fsutil import atomic_dir, sha256_file

INDEX_NAME = "tol.index.json"
SHARDED_FORMAT = "tolcli.tol.sharded"
SHARDED_VERSION = 1
MAX_INDEX_BYTES = 64 << 20


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
        try:
            if index_path.stat().st_size > MAX_INDEX_BYTES:
                raise InputError(f"{INDEX_NAME} is larger than {MAX_INDEX_BYTES >> 20} MiB", path=index_path)
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"a directory bundle needs {INDEX_NAME}", path=directory) from None
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the shard index ({e})", path=index_path) from None
        ok = (
            isinstance(index, dict)
            and index.get("format") == SHARDED_FORMAT
            and isinstance(index.get("manifest"), dict)
            and isinstance(index.get("shards"), list)
            and isinstance(index.get("weight_map"), dict)
        )
        if not ok:
            raise InputError(f"not a tolcli shard index (format {SHARDED_FORMAT!r} expected)", path=index_path)
        if index.get("format_version") != SHARDED_VERSION:
            raise InputError(
                f"shard index version {index.get('format_version')!r} is not supported",
                path=index_path,
                hint="upgrade tolcli",
            )
        self.manifest_text = canonical_json(index["manifest"])
        self.shards: dict[str, ContainerReader] = {}
        kinds: set[str] = set()
        try:
            for rec in index["shards"]:
                name = rec.get("name") if isinstance(rec, dict) else None
                if not isinstance(name, str) or Path(name).name != name:
                    raise InputError(f"bad shard entry {rec!r}", path=index_path)
                f = directory / name
                if not f.is_file():
                    raise InputError(f"shard {name} is missing", path=directory)
                if f.stat().st_size != rec.get("bytes"):
                    raise VerifyError(
                        f"shard {name} has {f.stat().st_size} bytes, the index says {rec.get('bytes')}", path=directory
                    )
                self.shards[name] = registry.container_of(f).open(f, shard=True)
                kinds.add(self.shards[name].container)
            self.weight_map: dict[str, str] = index["weight_map"]
            for name, reader in self.shards.items():
                held = set(reader.stored())
                listed = {t for t, s in self.weight_map.items() if s == name}
                if held != listed:
                    extra = sorted(held ^ listed)[:3]
                    raise InputError(f"shard {name} and the index disagree about tensors {extra}", path=directory)
            missing = set(self.weight_map.values()) - set(self.shards)
            if missing:
                raise InputError(
                    f"the weight map names shards not in the index: {sorted(missing)[:3]}", path=index_path
                )
        except BaseException:
            self.close()
            raise
        self.records = index["shards"]
        self.container = kinds.pop() if len(kinds) == 1 else registry.DEFAULT  # mixed (or no) shards: the default

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

    def close(self) -> None:
        for r in self.shards.values():
            r.close()
