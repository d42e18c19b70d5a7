"""``tolcli pack`` and ``unpack``: zstd transport with content checksums."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from tolcli._lazy import lazy_import
from tolcli.cli._common import (
    BundleArg,
    ForceOpt,
    JsonOpt,
    Output,
    QuietOpt,
    RichProgress,
    Sha256sumsOpt,
    fmt_bytes,
)
from tolcli.fsutil import check_sums_path, write_sha256sums

transport = lazy_import("tolcli.transport")


def pack_cmd(
    bundle: BundleArg,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT.zst", help="The .zst to write.")],
    level: Annotated[int, typer.Option("--level", help="zstd level, 1-22.")] = 3,
    threads: Annotated[int, typer.Option("--threads", help="Compression threads (-1: every core).")] = -1,
    force: ForceOpt = False,
    sha256sums: Sha256sumsOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compress a bundle for transport: one standard zstd frame with a content checksum (zstd -d reads it).

    Example:

        tolcli pack tol.safetensors -o tol.safetensors.zst --level 19
    """
    out = Output(json=json_out, quiet=quiet, command="pack", inputs=[bundle], output=output)
    if sha256sums:
        check_sums_path(sha256sums, output, bundle)
    t0 = time.monotonic()
    res = transport.pack(bundle, output, level=level, threads=threads, force=force, progress=RichProgress(out))
    if sha256sums:
        write_sha256sums(Path(sha256sums), [res.path])
    if json_out:
        out.emit_doc({"bytes_in": res.bytes_in, "bytes_out": res.bytes_out, "ratio": res.ratio}, output=res.path)
        return
    out.print(
        f"wrote {res.path} ({fmt_bytes(res.bytes_out)}, x{res.ratio:.3f} smaller) in {time.monotonic() - t0:.1f}s"
    )


def unpack_cmd(
    archive: Annotated[Path, typer.Argument(help="A .zst written by tolcli pack.")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT", help="The bundle to write.")],
    force: ForceOpt = False,
    sha256sums: Sha256sumsOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Decompress a packed bundle; refuses corrupted or truncated input, and checks the result is a bundle.

    Example:

        tolcli unpack tol.safetensors.zst -o tol.safetensors && tolcli verify tol.safetensors
    """
    out = Output(json=json_out, quiet=quiet, command="unpack", inputs=[archive], output=output)
    t0 = time.monotonic()
    if sha256sums:
        check_sums_path(sha256sums, output, archive)
    res = transport.unpack(archive, output, force=force, progress=RichProgress(out))
    if sha256sums:
        write_sha256sums(Path(sha256sums), [res.path])
    if json_out:
        out.emit_doc({"bytes": res.bytes_out}, output=res.path)
        return
    out.print(f"wrote {res.path} ({fmt_bytes(res.bytes_out)}) in {time.monotonic() - t0:.1f}s")
