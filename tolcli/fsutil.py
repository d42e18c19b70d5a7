"""Crash-safe file output: write a temp file beside the target, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from tolcli.errors import OutputError


def check_output(path: Path, *, force: bool) -> None:
    if path.exists() and not force:
        raise OutputError("output exists", path=path, hint="pass --force to overwrite it")
    if path.is_dir():
        raise OutputError("output is a directory", path=path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output directory: {e.strerror}", path=parent) from None
    if not os.access(parent, os.W_OK):
        raise OutputError("output directory is not writable", path=parent)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_output(path: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temp path; on success it becomes ``path`` atomically, on any failure it is removed."""
    check_output(path, force=force)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise OutputError("no space left on the device; nothing was written", path=path) from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputError(f"cannot write: {e.strerror}", path=path) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, *, force: bool = True) -> None:
    with atomic_output(path, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_sha256sums(target: Path, files: list[Path]) -> None:
    """GNU ``sha256sum`` lines (``<hex>  <name>``), names relative to ``target``'s directory when possible."""
    lines = []
    for f in files:
        try:
            name = str(f.resolve().relative_to(target.resolve().parent))
        except ValueError:
            name = str(f)
        lines.append(f"{sha256_file(f)}  {name}\n")
    write_text_atomic(target, "".join(lines))
