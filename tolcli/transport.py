"""zstd transport for bundles: ``tolcli pack`` / ``tolcli unpack``, streaming, with content checksums.

A ``.zst`` written by ``pack`` is one standard zstd frame (content size and XXH64 content checksum
included), so ``zstd -d`` reads it too. ``unpack`` bounds the decompression window, requires a complete
frame of exactly the declared size, checks the result is a valid bundle, and writes atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zstandard as zstd

from tolcli.errors import InputError, UsageError
from tolcli.fsutil import atomic_output
from tolcli.progress import NullProgress, Progress

MAX_WINDOW_BYTES = 1 << 27  # 128 MiB: zstd's default limit for levels <= 19, so any standard frame fits
CHUNK = 1 << 20


@dataclass(frozen=True)
class TransportResult:
    path: Path
    bytes_in: int
    bytes_out: int

    @property
    def ratio(self) -> float:
        """Uncompressed / compressed size."""
        big, small = max(self.bytes_in, self.bytes_out), min(self.bytes_in, self.bytes_out)
        return big / small if small else float("inf")


def pack(
    src: str | Path,
    dst: str | Path,
    *,
    level: int = 3,
    threads: int = -1,
    force: bool = False,
    progress: Progress | None = None,
) -> TransportResult:
    """Compress a bundle (any file) into one zstd frame. ``threads=-1`` uses every core."""
    src, dst = Path(src), Path(dst)
    if not 1 <= level <= 22:
        raise UsageError(f"`level` must be in 1..22, got {level}")
    if not src.is_file():
        raise InputError("input not found", path=src)
    size = src.stat().st_size
    cctx = zstd.ZstdCompressor(level=level, threads=threads, write_checksum=True, write_content_size=True)
    progress = progress or NullProgress()
    progress.start("pack", size)
    with (
        atomic_output(dst, force=force) as tmp,
        open(src, "rb") as fi,
        open(tmp, "wb") as fo,
        cctx.stream_writer(fo, size=size, write_size=CHUNK, closefd=False) as writer,  # closed (frame ended) first
    ):
        while chunk := fi.read(CHUNK):
            writer.write(chunk)
            progress.advance(len(chunk))
    progress.finish()
    return TransportResult(dst, size, dst.stat().st_size)


def unpack(
    src: str | Path,
    dst: str | Path,
    *,
    force: bool = False,
    check_bundle: bool = True,
    progress: Progress | None = None,
) -> TransportResult:
    """Decompress a ``.zst`` made by :func:`pack`; refuses corrupted, truncated or oversized-window input."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputError("input not found", path=src)
    with open(src, "rb") as f:
        head = f.read(18)
    try:
        declared = zstd.frame_content_size(head)
    except zstd.ZstdError:
        raise InputError("not a zstd file", path=src) from None
    dctx = zstd.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
    with atomic_output(dst, force=force) as tmp:
        written = 0
        try:
            dobj = dctx.decompressobj(write_size=CHUNK)
            with open(src, "rb") as fi, open(tmp, "wb") as fo:
                progress = progress or NullProgress()
                progress.start("unpack", src.stat().st_size)
                while chunk := fi.read(CHUNK):
                    progress.advance(len(chunk))
                    if dobj.eof:
                        raise InputError("unexpected data after the zstd frame", path=src)
                    out = dobj.decompress(chunk)
                    fo.write(out)
                    written += len(out)
        except zstd.ZstdError as e:
            raise InputError(f"corrupted zstd data ({e})", path=src) from None
        if progress is not None:
            progress.finish()
        if not dobj.eof:
            raise InputError("truncated zstd file (the frame does not end)", path=src)
        if declared >= 0 and written != declared:
            raise InputError(f"zstd frame declares {declared} bytes but holds {written}", path=src)
        if check_bundle:
            from tolcli.bundle.reader import open_bundle

            open_bundle(tmp).close()
    return TransportResult(dst, src.stat().st_size, written)
