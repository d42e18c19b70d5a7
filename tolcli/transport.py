"""zstd transport for bundles: ``tolcli pack`` / ``tolcli unpack``, streaming, with content checksums.

A ``.zst`` written by ``pack`` is one standard zstd frame (content size and XXH64 content checksum
included), so ``zstd -d`` reads it too. ``unpack`` takes nothing on trust: before writing a byte it requires a
regular file holding one frame that declares its content size and carries a content checksum, a window of at most
128 MiB, and a declared size that fits the free space at the destination and is at most
:data:`MAX_RATIO` times the compressed size (past :data:`MIN_BOMB_BYTES`; a 32 KB file declaring 1 GiB is a
decompression bomb). While decompressing it stops at the declared size, refuses data after the frame, and, when the
output must be a bundle, refuses content that is no bundle container (or whose container contradicts the output's
suffix) as soon as its first bytes are out. At the end the output must be exactly the declared size, pass the
checksum, and open as a bundle; it is written atomically.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import zstandard as zstd

from tolcli._lazy import lazy_import
from tolcli.bundle import container as registry
from tolcli.errors import InputError, OutputError, UsageError
from tolcli.fsutil import atomic_output
from tolcli.jsonsafe import regular_file
from tolcli.progress import NullProgress, Progress

reader = lazy_import("tolcli.bundle.reader")  # torch, only to check an unpacked bundle

MAX_WINDOW_BYTES = 1 << 27  # 128 MiB: zstd's default limit for levels <= 19, so any standard frame fits
CHUNK = 1 << 20
# Bundles compress 1.1x - 4x with zstd; a frame expanding more than this (beyond a floor) is refused unread.
MAX_RATIO = 256
MIN_BOMB_BYTES = 64 << 20
_FRAME_HEADER_MAX = 18


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
    if not src.exists():
        raise InputError("input not found", path=src)
    size = regular_file(src, what="input").st_size
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


def frame_parameters(src: Path) -> tuple[int, int]:
    """``(declared content size, compressed size)`` of a ``.zst`` made by :func:`pack`, from its frame header alone;
    refuses what :func:`unpack` must not start on (see the module docstring)."""
    size = regular_file(src, what="input").st_size
    with open(src, "rb") as f:
        head = f.read(_FRAME_HEADER_MAX)
    try:
        params = zstd.get_frame_parameters(head)
    except zstd.ZstdError:
        raise InputError("not a zstd file", path=src) from None
    if params.window_size > MAX_WINDOW_BYTES:
        raise InputError(
            f"the zstd frame requires too much memory: a {params.window_size >> 20} MiB window "
            f"(limit {MAX_WINDOW_BYTES >> 20} MiB)",
            path=src,
        )
    declared = params.content_size
    if declared < 0 or declared == zstd.CONTENTSIZE_UNKNOWN:
        raise InputError("the zstd frame does not declare its content size (not made by tolcli pack)", path=src)
    if not params.has_checksum:
        raise InputError("the zstd frame has no content checksum (not made by tolcli pack)", path=src)
    if declared > max(MIN_BOMB_BYTES, MAX_RATIO * size):
        raise InputError(
            f"{size:,} compressed bytes declare {declared:,} bytes (more than {MAX_RATIO}x): "
            "refusing a decompression bomb",
            path=src,
        )
    return declared, size


def unpack(
    src: str | Path,
    dst: str | Path,
    *,
    force: bool = False,
    check_bundle: bool = True,
    progress: Progress | None = None,
) -> TransportResult:
    """Decompress a ``.zst`` made by :func:`pack`; refuses corrupted, truncated, checksum-less, trailing-data,
    oversized-window or bomb input before (or as soon as) it shows, never writing past the declared size."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise InputError("input not found", path=src)
    declared, size = frame_parameters(src)
    parent = dst.parent if dst.parent.exists() else None
    if parent is not None:
        free = shutil.disk_usage(parent).free
        if declared > free:
            raise OutputError(
                f"the bundle needs {declared:,} bytes, {parent} has {free:,} free; nothing was written", path=dst
            )
    dctx = zstd.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
    progress = progress or NullProgress()
    with atomic_output(dst, force=force) as tmp:
        written = 0
        head = b""
        try:
            dobj = dctx.decompressobj(write_size=CHUNK)
            with open(src, "rb") as fi, open(tmp, "wb") as fo:
                progress.start("unpack", size)
                while chunk := fi.read(CHUNK):
                    progress.advance(len(chunk))
                    if dobj.eof:
                        raise InputError("unexpected data after the zstd frame", path=src)
                    out = dobj.decompress(chunk)
                    if written + len(out) > declared:
                        raise InputError(
                            f"corrupted zstd data (the frame holds more than the {declared:,} bytes it declares)",
                            path=src,
                        )
                    if check_bundle and len(head) < 64:
                        head += out[: 64 - len(head)]
                        if len(head) >= 64 or (dobj.eof and written + len(out) == declared):
                            _check_container(head, src, dst)
                    fo.write(out)
                    written += len(out)
        except zstd.ZstdError as e:
            raise InputError(f"corrupted zstd data ({e})", path=src) from None
        progress.finish()
        if not dobj.eof:
            raise InputError("truncated zstd file (the frame does not end)", path=src)
        if dobj.unused_data:
            raise InputError(f"{len(dobj.unused_data):,} bytes of unexpected data after the zstd frame", path=src)
        if written != declared:
            raise InputError(f"zstd frame declares {declared} bytes but holds {written}", path=src)
        if check_bundle:
            reader.open_bundle(tmp).close()
    return TransportResult(dst, size, written)


def _check_container(head: bytes, src: Path, dst: Path) -> None:
    """The first decompressed bytes must be a bundle container's, and match the output's suffix."""
    found = registry.sniff(head)
    if found is None:
        raise InputError("the zstd frame does not hold a bundle (no known container)", path=src)
    registry.check_suffix(dst, found)
