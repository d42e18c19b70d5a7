"""Convert a bundle between containers, losslessly: same manifest, same tensor bytes and hashes."""

from __future__ import annotations

from pathlib import Path

from tolcli.bundle.reader import open_bundle
from tolcli.bundle.writer import container_for, write_bundle


def convert_bundle(
    src: str | Path,
    dst: str | Path,
    *,
    container: str | None = None,
    compression: str | None = None,
    force: bool = False,
) -> Path:
    """Rewrite ``src`` as ``dst`` (container from ``container`` or the suffix). The manifest is kept as is,
    so converting back gives a byte-identical file; every tensor is re-hashed while it is copied."""
    dst = Path(dst)
    kind = container_for(dst, container)
    with open_bundle(src) as b:
        manifest = {k: v for k, v in b.manifest.items() if k != "tensors"}
        entries = [b.entry(n) for n in b.tensor_names]
        return write_bundle(dst, entries, manifest, container=kind, force=force, compression=compression)
