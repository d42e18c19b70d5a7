"""Convert a bundle between containers, losslessly: same manifest, same tensor bytes and hashes."""

from __future__ import annotations

from pathlib import Path

from tolcli.bundle.entries import TensorEntry
from tolcli.bundle.reader import open_bundle
from tolcli.bundle.writer import WriteOptions, write_bundle
from tolcli.fsutil import check_output
from tolcli.progress import NullProgress, Progress


def convert_bundle(
    src: str | Path,
    dst: str | Path,
    *,
    container: str | None = None,
    compression: str | None = None,
    force: bool = False,
    max_shard_size: int | str | None = None,
    verify_input: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Rewrite ``src`` as ``dst`` (container from ``container`` or the suffix; ``max_shard_size`` makes a
    sharded directory, and a sharded source becomes one file without it). The manifest is kept as is, so
    converting back gives a byte-identical file; every tensor is re-hashed while it is copied.

    Example:
        >>> import tempfile, pathlib
        >>> from tolcli import convert_bundle, precompute, demo_checkpoint_path
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> st = precompute(demo_checkpoint_path(), d / "t.safetensors", dtype="bf16").path
        >>> back = convert_bundle(convert_bundle(st, d / "t.h5"), d / "back.safetensors")
        >>> back.read_bytes() == st.read_bytes()
        True
    """
    dst = Path(dst)
    options = WriteOptions.make(
        dst, container=container, compression=compression, max_shard_size=max_shard_size, force=force
    )
    # refuse an existing output (or a directory --force may not replace) before reading and verifying the input
    check_output(dst, force=force, directory=options.sharded, make_parent=False)
    with open_bundle(src, verify=verify_input) as b:
        manifest = {k: v for k, v in b.manifest.items() if k != "tensors"}
        progress = progress or NullProgress()
        entries = [_counted(b.entry(n), progress) for n in b.tensor_names]
        progress.start("convert", sum(e.nbytes for e in entries))
        path = write_bundle(dst, entries, manifest, options)
        progress.finish()
        return path


def _counted(entry: TensorEntry, progress: Progress) -> TensorEntry:
    """The same entry, advancing ``progress`` by each block's bytes."""

    def blocks():
        for block in entry.blocks():
            yield block
            progress.advance(block.nbytes)

    return TensorEntry(entry.name, entry.dtype, entry.shape, entry.sha256, blocks)
