"""Crash-safe, race-safe output: temp files and directories beside the target, locks, and what ``--force`` replaces.

Every output is written to a temp file (or directory) created beside it with an unpredictable name
(``.NAME.tmp-XXXXXXXX``, made with ``O_EXCL|O_NOFOLLOW`` by :func:`tempfile.mkstemp`/:func:`tempfile.mkdtemp`),
fsynced, then renamed onto the target. While it is written, the writer holds an exclusive ``flock`` on
``.NAME.lock`` beside the output, so a second tolcli run writing the same output is refused
(:class:`OutputLock`); that lock also makes it safe to reclaim the temp files a killed run left
(:func:`reclaim_leftovers`). ``--force`` replaces a file, a symlink (the link itself: its target is never
followed), an empty directory, or a directory tolcli recognises as its own (:func:`why_not_replaceable`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from tolcli import jsonsafe
from tolcli.errors import InputError, OutputError, UsageError

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


# ---- what an OSError means ---------------------------------------------------------------------------------------
_CANNOT_WRITE = {
    errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG, errno.EIO, errno.ENAMETOOLONG, errno.ELOOP,
    errno.ENOTDIR, errno.EISDIR, errno.EBUSY, errno.ENOTEMPTY, errno.EXDEV, errno.EMLINK, errno.ETXTBSY,
}  # fmt: skip


def _output_error(e: OSError, path: Path) -> OutputError | None:
    """What an OSError while writing ``path`` means to a user (None: a bug or something unexpected, re-raise)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return OutputError(f"{what}; nothing was written", path=path)
    if e.errno in _CANNOT_WRITE:
        return OutputError(f"cannot write: {e.strerror}", path=path)
    return None


def lstat_or_none(path: Path) -> os.stat_result | None:
    """``os.lstat`` (never follows a link); None when nothing is there; other errors are the user's to fix."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise OutputError(f"cannot access the output: {e.strerror}", path=path) from None


def _umask() -> int:
    """The process umask, without changing it where the kernel tells (Linux >= 4.7)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---- what an existing output is, and whether --force may replace it ---------------------------------------------
_INDEX_NAME = "tol.index.json"  # tolcli.bundle.sharded.INDEX_NAME (that module imports this one)
_SHARDED_FORMAT = "tolcli.tol.sharded"
_STRIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json")  # tolcli.checkpoint's names
_MAX_DOC_BYTES = 64 << 20


def _read_json_doc(path: Path) -> object:
    st = lstat_or_none(path)
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_DOC_BYTES:
        return None
    try:
        with open(path, "rb", opener=nofollow_opener) as f:
            return jsonsafe.loads(f.read(_MAX_DOC_BYTES + 1), path=path, max_bytes=_MAX_DOC_BYTES)
    except (OSError, InputError):
        return None


def why_not_replaceable(path: Path) -> str | None:
    """None when ``--force`` may replace directory ``path``: it is empty, a sharded bundle (``tol.index.json``
    naming every other file), or a stripped checkpoint (``config.json`` with ``tolcli_stripped: true`` and only
    the files ``strip`` writes); otherwise why not. Plain files only: a subdirectory or a link is never tolcli's."""
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        return f"cannot list it ({e.strerror})"
    if not names:
        return None
    allowed: set[str] = set()
    if _INDEX_NAME in names:
        index = _read_json_doc(path / _INDEX_NAME)
        if not (isinstance(index, dict) and index.get("format") == _SHARDED_FORMAT):
            return f"{_INDEX_NAME} is not a tolcli shard index"
        shards = index.get("shards") if isinstance(index.get("shards"), list) else []
        allowed = {_INDEX_NAME} | {r["name"] for r in shards if isinstance(r, dict) and isinstance(r.get("name"), str)}
        kind = "sharded bundle"
    elif "config.json" in names:
        config = _read_json_doc(path / "config.json")
        if not (isinstance(config, dict) and config.get("tolcli_stripped") is True):
            return "it is not a stripped checkpoint (config.json lacks tolcli_stripped: true)"
        allowed = set(_STRIPPED_FILES)
        kind = "stripped checkpoint"
    else:
        return f"it holds neither {_INDEX_NAME} nor a stripped config.json"
    for name in names:
        if name not in allowed:
            return f"{name!r} is not part of the {kind} tolcli wrote there"
        st = lstat_or_none(path / name)
        if st is None or not stat.S_ISREG(st.st_mode):
            return f"{name!r} is not a plain file"
    return None


def check_output(path: Path, *, force: bool, directory: bool = False, make_parent: bool = True) -> None:
    """Refuse an existing output without ``force``; ``directory``: the output is a directory (sharded, strip);
    ``make_parent``: create the output's directory (False: an early check that must leave nothing behind).

    Nothing at ``path`` is ever followed: a symlink there counts as an existing output, and ``force`` replaces the
    link itself. ``force`` replaces a file, or a directory only when :func:`why_not_replaceable` allows it."""
    st = lstat_or_none(path)
    if st is not None and not force:
        raise OutputError("output exists", path=path, hint="pass --force to overwrite it")
    if st is not None and stat.S_ISDIR(st.st_mode):
        if not directory:
            raise OutputError("output is a directory", path=path, hint="a directory output needs --max-shard-size")
        why = why_not_replaceable(path)
        if why is not None:
            raise OutputError(
                f"--force replaces only a directory tolcli wrote (a sharded bundle or a stripped checkpoint): {why}",
                path=path,
                hint="write to another path, or remove the directory yourself",
            )
    parent = path.parent
    if not make_parent:
        return
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


def nofollow_opener(path: str, flags: int) -> int:
    """``open(..., opener=nofollow_opener)``: fails (ELOOP) instead of following a symlink."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def is_plain_file(path: Path) -> bool:
    """A regular file, not a link to one."""
    with contextlib.suppress(OSError):
        return stat.S_ISREG(os.lstat(path).st_mode)
    return False


# ---- locks -------------------------------------------------------------------------------------------------------
def lock_path(path: Path) -> Path:
    """The lock file of an output (or of a staging directory): ``.NAME.lock`` beside it."""
    name = path.name if path.name.startswith(".") else f".{path.name}"
    return path.with_name(f"{name}.lock")


class LockBusy(OutputError):
    """Another tolcli run holds the lock."""


class _Held:
    """The one flock'd descriptor this process holds on a lock file, shared by the runs of one thread."""

    def __init__(self, fd: int, ident: tuple[int, int], thread: threading.Thread):
        self.fd, self.ident, self.thread = fd, ident, thread
        self.owners = 0
        self.generation = 0


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


class OutputLock:
    """An exclusive, non-blocking ``flock`` on a lock file, held while a run writes ``what``.

    A second holder is refused with :class:`LockBusy` (an :class:`OutputError`, exit 6) naming the holder's pid.
    The kernel drops a flock when its process ends, however it ends, so a lock file left by a killed run is
    harmless: the next run takes it over. The holder removes the file when it releases the lock.

    Within one process the lock is per thread: a run on the thread that already holds it (a nested writer, or a
    new run after one that failed and whose objects are not yet garbage) shares it; another live thread is refused.
    The lock file is opened with ``O_NOFOLLOW`` and must be a plain file: a planted symlink is refused, never
    followed, and the pid is only written into a file this user owns with a single link.
    """

    def __init__(self, path: Path, what: Path):
        self.path = Path(path)
        self.what = Path(what)
        self._key = os.path.abspath(self.path)
        self._held: _Held | None = None
        self._generation = 0

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def superseded(self) -> bool:
        """A later run on this thread took the lock over (this one ended without releasing it)."""
        return self._held is None or self._held.generation != self._generation

    def acquire(self) -> OutputLock:
        if self._held is not None:
            return self
        me = threading.current_thread()
        with _HELD_GUARD:
            held = _HELD.get(self._key)
            if held is not None:
                if held.thread is not me and held.thread.is_alive():
                    raise self._busy(os.getpid())
                held.thread = me
            else:
                held = self._lock_file(me)
                _HELD[self._key] = held
            held.owners += 1
            held.generation += 1
            self._held, self._generation = held, held.generation
        return self

    def release(self) -> None:
        with _HELD_GUARD:
            held, self._held = self._held, None
            if held is None:
                return
            held.owners -= 1
            if held.owners > 0:
                return
            _HELD.pop(self._key, None)
            with contextlib.suppress(OSError):  # remove the file while still holding the lock, if it is still ours
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == held.ident:
                    os.unlink(self.path)
            os.close(held.fd)

    def _busy(self, pid: int | None) -> LockBusy:
        return LockBusy(
            f"another tolcli run is writing {self.what} (pid {pid if pid else 'unknown'})",
            path=self.what,
            hint=f"wait for it to finish; {self.path.name} is only a lock while that process lives, "
            "so a lock file left by a killed run needs nothing (the next run takes it over)",
        )

    def _open(self) -> int:
        flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            try:
                fd = os.open(self.path, os.O_RDWR | flags, 0o644)
            except PermissionError:  # another user's lock file: lock it all the same, without writing to it
                fd = os.open(self.path, os.O_RDONLY | flags & ~os.O_CREAT)
        except OSError as e:
            if e.errno != errno.ELOOP and (err := _output_error(e, self.path)) is not None:
                raise err from None  # a read-only or full disk, a directory that cannot be written
            why = "it is a symbolic link (tolcli never follows one here)" if e.errno == errno.ELOOP else e.strerror
            raise OutputError(
                f"cannot open the lock file: {why}", path=self.path, hint="remove it if no tolcli run is writing"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError("the lock file is not a plain file", path=self.path, hint="remove it")
        return fd

    def _lock_file(self, me: threading.Thread) -> _Held:
        for _ in range(100):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = None
                with contextlib.suppress(OSError, ValueError):
                    pid = int(os.pread(fd, 32, 0).decode("ascii").strip() or 0)
                os.close(fd)
                raise self._busy(pid) from None
            except OSError as e:  # a filesystem without flock (rare): write unlocked rather than not at all
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)
                    raise OutputError(f"cannot lock: {e.strerror}", path=self.path) from None
            st = os.fstat(fd)
            try:
                now = os.lstat(self.path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)  # the previous holder removed (or replaced) the file between our open and flock
                continue
            if st.st_uid == os.geteuid() and st.st_nlink == 1:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            return _Held(fd, (st.st_dev, st.st_ino), me)
        raise OutputError("cannot take the lock: its file keeps changing", path=self.path)  # pragma: no cover


# ---- leftovers ---------------------------------------------------------------------------------------------------
# mkstemp/mkdtemp's 8 random characters; older releases used the pid, and ".tmp-dist" for distributed runs.
_TMP_SUFFIX = re.compile(r"\.tmp-(?:[a-z0-9_]{8}|[0-9]+|dist)")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def leftovers(path: Path) -> list[Path]:
    """Temp files and directories of writers of ``path`` (``.NAME.tmp-*``) that this user owns."""
    prefix = f".{path.name}"
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    found = []
    for name in sorted(names):
        if name.startswith(prefix) and _TMP_SUFFIX.fullmatch(name[len(prefix) :]):
            st = lstat_or_none(path.parent / name)
            if st is not None and st.st_uid == os.geteuid():
                found.append(path.parent / name)
    return found


def _remove(p: Path) -> None:
    """Remove a file, a link (never its target) or a directory tree (rmtree does not follow links)."""
    with contextlib.suppress(OSError):
        st = os.lstat(p)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.unlink(p)


def _reclaim_locked(path: Path) -> list[Path]:
    found = leftovers(path)
    for p in found:
        _remove(p)
    return found


def reclaim_leftovers(path: Path) -> list[Path]:
    """Remove what killed writers of ``path`` left beside it (``.NAME.tmp-*`` owned by this user); returns them.

    Only while holding ``path``'s lock, so nothing a live run is writing is touched; when another run holds the
    lock, nothing is removed (that run reclaims them when it writes)."""
    try:
        with OutputLock(lock_path(path), path):
            return _reclaim_locked(path)
    except LockBusy:
        return []


# ---- atomic files and directories ------------------------------------------------------------------------------
def _seal(tmp: Path, mode: int) -> None:
    """Before the rename: ``tmp`` must still be the plain file (or directory) this user created there; fsync it
    (and a directory's files) and give it the mode a plain ``open`` would have."""
    st = os.lstat(tmp)
    if st.st_uid != os.geteuid() or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise OutputError("the temp output was replaced while it was written", path=tmp)
    if stat.S_ISDIR(st.st_mode):
        for f in sorted(os.listdir(tmp)):
            if stat.S_ISREG(os.lstat(tmp / f).st_mode):
                _fsync_file(tmp / f)
        fsync_dir(tmp)
        os.chmod(tmp, mode & ~_umask())  # a directory (checked above), not a link
        return
    fd = _fsync_file(tmp, keep=True)
    try:
        os.fchmod(fd, mode & ~_umask())
    finally:
        os.close(fd)


def _fsync_file(path: Path, *, keep: bool = False) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    if not keep:
        os.close(fd)
    return fd


@contextlib.contextmanager
def atomic_output(path: Path, *, force: bool) -> Iterator[Path]:
    """Yield a new, empty temp file beside ``path`` (unpredictable name, created exclusively); on success it
    becomes ``path`` atomically, on any failure it is removed. Holds ``path``'s lock throughout."""
    check_output(path, force=force)
    with OutputLock(lock_path(path), path):
        check_output(path, force=force)  # again: the output may have appeared before we held the lock
        _reclaim_locked(path)
        tmp: Path | None = None
        try:
            fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
            os.close(fd)
            tmp = Path(name)
            yield tmp
            _seal(tmp, 0o666)
            os.replace(tmp, path)  # a symlink at path is replaced itself, never followed
            fsync_dir(path.parent)
        except OSError as e:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            if (err := _output_error(e, path)) is not None:
                raise err from None
            raise
        except BaseException:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            raise


def write_text_atomic(path: Path, text: str, *, force: bool = True) -> None:
    with atomic_output(path, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _replace_dir(tmp: Path, path: Path) -> None:
    """Put directory ``tmp`` at ``path``; what is there was checked by :func:`check_output` under the lock."""
    st = lstat_or_none(path)
    if st is None:
        os.rename(tmp, path)
    elif not stat.S_ISDIR(st.st_mode):  # a file, or a symlink: replace it, never follow it
        os.unlink(path)
        os.rename(tmp, path)
    else:  # a directory tolcli wrote: move it aside (a name the leftovers rule reclaims), then drop it
        aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
        os.rename(path, aside)
        try:
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rename(aside, path)  # put the old one back rather than leave nothing at the output
            raise
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: Path, *, force: bool) -> Iterator[Path]:
    """Yield a new, empty, private temp directory beside ``path``; on success its files are fsynced and it
    replaces ``path`` (see :func:`check_output` for what ``force`` may replace), on any failure it is removed.
    Holds ``path``'s lock throughout."""
    check_output(path, force=force, directory=True)
    with OutputLock(lock_path(path), path):
        check_output(path, force=force, directory=True)
        _reclaim_locked(path)
        tmp: Path | None = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
            yield tmp
            _seal(tmp, 0o777)
            _replace_dir(tmp, path)
            fsync_dir(path.parent)
        except OSError as e:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if (err := _output_error(e, path)) is not None:
                raise err from None
            raise
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise


# ---- checksums ---------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sums_path(sums: str | Path, *protected: str | Path) -> Path:
    """Refuse a ``--sha256sums`` FILE that is one of ``protected`` (a command's outputs and inputs) or lies inside
    one of them (a sharded bundle directory): the sums would replace the bundle. Call it before any work."""
    target = Path(sums)
    where = Path(os.path.realpath(target))
    for p in map(Path, protected):
        real = Path(os.path.realpath(p))
        same = where == real
        with contextlib.suppress(OSError):
            same = same or os.path.samefile(target, p)
        if same or real in where.parents:
            what = "the output or an input" if same else f"inside {p}"
            raise UsageError(
                f"`sha256sums` {target} is {what}: writing the sums there would destroy it",
                hint="name another file, e.g. SHA256SUMS",
            )
    return target


def write_sha256sums(target: Path, files: list[Path]) -> None:
    """GNU ``sha256sum`` lines (``<hex>  <name>``), names relative to ``target``'s directory when possible; a
    directory (a sharded bundle) contributes one line per file in it, in name order."""
    check_sums_path(target, *files)
    lines = []
    for f in files:
        for g in sorted(p for p in f.iterdir() if p.is_file()) if f.is_dir() else [f]:
            try:
                name = str(g.resolve().relative_to(target.resolve().parent))
            except ValueError:
                name = str(g)
            lines.append(f"{sha256_file(g)}  {name}\n")
    write_text_atomic(target, "".join(lines))


def path_bytes(path: Path) -> int:
    """Size of a file, or of every file in a directory (a sharded bundle)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size


# ---- signals -----------------------------------------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: it unwinds like Ctrl-C (temp files removed, staging kept, exit 130)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` (a KeyboardInterrupt) in the main thread, so
    that every ``finally`` runs: temp files are removed and locks released instead of left behind. A signal that
    is ignored (``nohup``) stays ignored; later SIGTERM/SIGHUP are ignored while the first one unwinds. Elsewhere
    than in the main thread it does nothing.

    It yields the list of signals that arrived (SIGINT included, when Python's default Ctrl-C handler is the one
    installed): an extension that catches the KeyboardInterrupt and raises something else in its place (torch
    turns one raised inside ``torch.tensor`` into a ValueError) would otherwise be reported as a bug, not as the
    interruption it is."""
    fired: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield fired
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if any(s != signal.SIGINT for s in fired):  # a SIGTERM/SIGHUP is already unwinding
            return
        fired.append(signum)
        raise Terminated(signal.Signals(signum).name)

    def ctrl_c(signum: int, frame: FrameType | None) -> None:
        fired.append(signum)  # a second Ctrl-C interrupts the unwinding too, as Python's own handler would
        raise KeyboardInterrupt

    previous = {}
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        old = signal.getsignal(s)
        if s == signal.SIGINT and old is not signal.default_int_handler:
            continue  # ignored, or the embedding program's own handler: left alone
        if old is not signal.SIG_IGN:
            previous[s] = old
            signal.signal(s, ctrl_c if s == signal.SIGINT else handler)
    try:
        yield fired
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
