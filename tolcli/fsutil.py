"""Crash-safe output: write a temp file (or directory) beside the target, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from tolcli.errors import OutputError, UsageError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}  # fmt: skip


def parse_size(text: str | int) -> tuple[float, str]:
    """``"12MB"`` -> (12e6, "m"); ``"0.25"`` -> (0.25, ""). Decimal (kB, MB, GB) and binary (KiB, MiB, GiB) units."""
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"{text!r} is not a size: expected e.g. 123456, 12MB, 1.5GiB")
    unit = (m.group(2) or "").lower().rstrip("b")
    return float(m.group(1)) * _UNITS[unit], unit


def parse_bytes(text: str | int) -> int:
    value, _ = parse_size(text)
    if value < 1:
        raise UsageError(f"{text!r}: a size must be at least 1 byte")
    return int(value)


def check_output(path: Path, *, force: bool, directory: bool = False) -> None:
    """Refuse an existing output without ``force``; ``directory``: the output is a directory (sharded)."""
    if path.exists() and not force:
        raise OutputError("output exists", path=path, hint="pass --force to overwrite it")
    if path.is_dir() and not directory:
        raise OutputError("output is a directory", path=path, hint="a directory output needs --max-shard-size")
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


def _output_error(e: OSError, path: Path) -> OutputError | None:
    """What an OSError while writing ``path`` means to a user (None: a bug or something unexpected, re-raise)."""
    if e.errno == errno.ENOSPC:
        return OutputError("no space left on the device; nothing was written", path=path)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write: {e.strerror}", path=path)
    return None


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
        if (err := _output_error(e, path)) is not None:
            raise err from None
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


@contextlib.contextmanager
def atomic_dir(path: Path, *, force: bool, temp: Path | None = None) -> Iterator[Path]:
    """Yield a new, empty temp directory beside ``path`` (``temp``: a fixed one that other processes can find);
    on success its files are fsynced and it replaces ``path``, on any failure it is removed."""
    if path.exists() and not force:
        raise OutputError("output exists", path=path, hint="pass --force to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output directory: {e.strerror}", path=path.parent) from None
    tmp = temp if temp is not None else temp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (err := _output_error(e, path)) is not None:
            raise err from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def path_bytes(path: Path) -> int:
    """Size of a file, or of every file in a directory (a sharded bundle)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size
