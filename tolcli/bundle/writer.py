"""Write bundles: assemble a container atomically, and stage layers for resumable streaming writers.

A command that produces layers one at a time (``precompute``, ``compress``) stages each finished tensor
in a hidden directory beside the output (``.OUT.partial/``), recording it in ``state.json`` once the
layer is complete. Nothing appears at the output path until :meth:`Staging.finish` assembles the
container into a temp file and renames it. ``--resume`` reuses the completed layers of an interrupted
run of the *same job* (same inputs and options), so the final bytes equal those of an uninterrupted run.

Two runs never share a staging area: each holds an exclusive lock (``.OUT.partial.lock``) for its whole run,
and the output's own lock (``.OUT.lock``, :class:`~tolcli.fsutil.OutputLock`) while it writes the output. The
staging directory is created (``mkdir``, mode 0700, never through a symlink) when the first tensor is staged;
a run that ends without completing a layer removes it, one that completed layers keeps it for ``--resume``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import shutil
import stat
import tempfile
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tolcli import jsonsafe
from tolcli.bundle import container as registry
from tolcli.bundle.entries import TensorEntry, rows_per_block
from tolcli.bundle.manifest import canonical_json, validate_schema
from tolcli.bundle.sharded import write_sharded
from tolcli.dtypes import DTYPES
from tolcli.errors import InputError, OutputError, UsageError, VerifyError
from tolcli.fsutil import (
    OutputLock,
    atomic_output,
    check_output,
    fsync_dir,
    is_plain_file,
    lock_path,
    lstat_or_none,
    nofollow_opener,
    parse_bytes,
    reclaim_leftovers,
    sha256_file,
)


def container_for(path: Path, container: str | None = None, *, sharded: bool = False) -> str:
    """The container of an output path: from ``--format`` or the suffix (a sharded bundle is a directory:
    :data:`~tolcli.bundle.container.DEFAULT` shards unless ``--format`` or a suffix such as ``.h5`` names one)."""
    st = lstat_or_none(path)  # a symlink at the output is replaced, never followed (fsutil.check_output)
    if st is not None and stat.S_ISDIR(st.st_mode) and not sharded:
        raise UsageError(f"{path} is a directory: a directory output needs --max-shard-size")
    found = registry.by_suffix(path.suffix)
    if container is not None:
        if container not in registry.names():
            raise UsageError(f"--format must be {' or '.join(registry.names())}, got {container!r}")
        if found is not None and found.name != container:  # readers refuse such a file: never write one
            raise UsageError(
                f"--format {container} contradicts the suffix of {path.name!r} ({found.name})",
                hint=f"name it {registry.get(container).suffixes[0]}, or drop --format",
            )
        return container
    if found is not None:
        return found.name
    if sharded:
        return registry.DEFAULT
    suffixes = " or ".join(c.suffixes[0] for c in registry.containers())
    raise UsageError(
        f"cannot tell the format of {path.name!r} from its suffix", hint=f"name it {suffixes}, or pass --format"
    )


@dataclass(frozen=True)
class WriteOptions:
    """How a bundle is written: parsed and checked once, at the API boundary (:meth:`make`), then passed whole.

    ``container`` is a resolved container name (``safetensors``, ``hdf5``, ...); ``max_shard_size`` in bytes makes
    the output a sharded directory; ``compression`` is the container's (HDF5: ``gzip``/``lzf``); ``force`` replaces
    an existing output."""

    container: str
    compression: str | None = None
    max_shard_size: int | None = None
    force: bool = False

    @classmethod
    def make(
        cls,
        out: Path,
        *,
        container: str | None = None,
        compression: str | None = None,
        max_shard_size: int | str | None = None,
        force: bool = False,
    ) -> WriteOptions:
        """Validate the user's choices for output ``out`` (``max_shard_size`` may be text such as ``"2GB"``)."""
        shard = None if max_shard_size is None else parse_bytes(max_shard_size)
        kind = container_for(out, container, sharded=shard is not None)
        if compression is not None and not registry.get(kind).compressions:
            takers = [c for c in registry.containers() if c.compressions]
            raise UsageError(
                f"compression applies to {' or '.join(c.label for c in takers)} bundles only",
                hint=f"write a {takers[0].suffixes[0]} bundle, or drop it",
            )
        return cls(kind, compression, shard, force)

    @property
    def sharded(self) -> bool:
        return self.max_shard_size is not None

    def job(self) -> dict[str, Any]:
        """What a resumable job records of the options (``force`` does not change the bytes)."""
        return {"container": self.container, "compression": self.compression, "max_shard_size": self.max_shard_size}


def checked_entry(entry: TensorEntry) -> TensorEntry:
    """The same entry, whose blocks are hashed as they stream into the container; a mismatch aborts the write
    (and the temp file with it). Every entry passes here, staged files included: what is hashed is exactly what
    is written, so a staged file changed after it was staged, or a source changed during a copy, never lands."""

    def blocks() -> Iterator[np.ndarray]:
        h = hashlib.sha256()
        for b in entry.blocks():
            h.update(memoryview(np.ascontiguousarray(b, dtype=DTYPES[entry.dtype].numpy)).cast("B"))
            yield b
        if h.hexdigest() != entry.sha256:
            raise VerifyError(f"tensor {entry.name!r} changed while it was copied (sha256 mismatch)")

    return TensorEntry(entry.name, entry.dtype, entry.shape, entry.sha256, blocks)


def write_bundle(
    path: Path, entries: list[TensorEntry], manifest: dict[str, Any], options: WriteOptions | None = None
) -> Path:
    """Write a complete bundle atomically. ``manifest['tensors']`` is filled from ``entries``; ``options``
    default to :meth:`WriteOptions.make` for ``path`` (its suffix names the container).

    With ``options.max_shard_size`` the bundle is a directory of shards (:mod:`tolcli.bundle.sharded`)."""
    options = options or WriteOptions.make(path)
    manifest = dict(manifest)
    manifest["tensors"] = {
        e.name: {"dtype": e.dtype, "shape": list(e.shape), "bytes": e.nbytes, "sha256": e.sha256} for e in entries
    }
    validate_schema(manifest, where=str(path))
    text = canonical_json(manifest)
    checked = [checked_entry(e) for e in entries]
    if options.max_shard_size is not None:
        return write_sharded(
            path,
            checked,
            manifest,
            container=options.container,
            max_shard_size=options.max_shard_size,
            compression=options.compression,
            force=options.force,
        )
    with atomic_output(path, force=options.force) as tmp:
        registry.get(options.container).write(tmp, checked, text, options.compression)
    return path


def _drain(blocks: Iterable[np.ndarray], dtype: str, sink, background: bool) -> int:
    """Feed every block's bytes to ``sink``, on a worker thread when ``background``; returns the byte count."""
    n = 0
    if not background:
        for b in blocks:
            buf = memoryview(np.ascontiguousarray(b, dtype=DTYPES[dtype].numpy)).cast("B")
            sink(buf)
            n += buf.nbytes
        return n
    q: queue.Queue[memoryview | None] = queue.Queue(maxsize=1)
    errors: list[BaseException] = []

    def worker() -> None:
        while (item := q.get()) is not None:
            if errors:
                continue  # keep draining so the producer never blocks on a dead consumer
            try:
                sink(item)
            except BaseException as e:
                errors.append(e)

    t = threading.Thread(target=worker, name="tolcli-writer", daemon=True)
    t.start()
    try:
        for b in blocks:
            if errors:
                break
            buf = memoryview(np.ascontiguousarray(b, dtype=DTYPES[dtype].numpy)).cast("B")
            q.put(buf)
            n += buf.nbytes
    finally:
        q.put(None)
        t.join()
    if errors:
        raise errors[0]
    return n


_RESUME_HINT = "completed layers are kept: fix the cause (free space, permissions), then rerun with --resume"


class _Run:
    """What a staging run must undo when it ends without finishing (shared with its finalizer, not the Staging)."""

    def __init__(self, lock: OutputLock, directory: Path, state: dict[str, Any]):
        self.lock, self.dir, self.state = lock, directory, state
        self.created = False  # this run made (or adopted, to resume) the staging directory
        self.finished = False

    def end(self) -> None:
        """Release the lock; a staging directory without a completed layer has nothing to resume: remove it."""
        if self.lock.superseded:  # a later run on this thread took over: the directory is its business now
            self.lock.release()
            return
        try:
            if self.created and not self.finished and not self.state["layers"]:
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            self.lock.release()


def _private_dir(path: Path, st: os.stat_result) -> None:
    """A staging directory is only used when it is a real directory (not a link) of this user; it is made private
    (mode 0700) so that nobody else can add to it. Files in it are still never trusted: each is opened without
    following links, and hashed before it is reused (:meth:`Staging._load_state`) and while it is assembled."""
    why = None
    if stat.S_ISLNK(st.st_mode):
        why = "it is a symbolic link (tolcli never follows one here)"
    elif not stat.S_ISDIR(st.st_mode):
        why = "it is not a directory"
    elif st.st_uid != os.geteuid():
        why = f"it belongs to another user (uid {st.st_uid})"
    if why is not None:
        raise OutputError(
            f"not a staging directory of this user's tolcli: {why}",
            path=path,
            hint="remove it (tolcli never creates it that way)",
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        try:
            os.chmod(path, 0o700)
        except OSError as e:
            raise OutputError(f"cannot make the staging directory private: {e.strerror}", path=path) from None


class Staging:
    """Finished tensors of a streaming job, on disk beside the output, resumable.

    The run holds an exclusive lock (``.OUT.partial.lock``) from construction until :meth:`finish` or
    :meth:`close` (or, for a run that raised, until the object is collected or the process exits): a second
    run on the same output is refused with an :class:`OutputError`. The directory is created (``mkdir``, mode
    0700, never through a link) only when the first tensor is staged, so a run that fails before leaves nothing;
    a run that ends without completing a layer removes it; one with completed layers keeps it for ``--resume``.
    """

    def __init__(
        self,
        out: Path,
        job: dict[str, Any],
        *,
        resume: bool,
        options: WriteOptions,
        note=print,
        tag: str = "",
    ):
        check_output(out, force=options.force, directory=options.sharded)
        self.options = options
        self.out = out
        self.dir = out.with_name(f".{out.name}.partial{tag}")  # tag: one staging area per distributed rank
        self.job = json.loads(canonical_json(job))
        self.state: dict[str, Any] = {"job": self.job, "tensors": {}, "layers": {}, "extra": {}}
        self._stale = False  # an earlier run's directory, removed when this run stages its first tensor
        lock = OutputLock(lock_path(self.dir), out).acquire()
        try:
            if reclaimed := reclaim_leftovers(out):
                note(f"removed {len(reclaimed)} temp file(s) that an interrupted run left beside {out}")
            st = lstat_or_none(self.dir)
            if st is not None:
                _private_dir(self.dir, st)
            self._stale = self._adopt(st, resume=resume, force=options.force, note=note)
        except BaseException:
            lock.release()
            raise
        self._run = _Run(lock, self.dir, self.state)
        self._finalizer = weakref.finalize(self, self._run.end)  # before anything else can fail: the lock is freed
        if st is not None and not self._stale:  # resuming: the directory is this run's now
            self._run.created = True
            try:
                self._tidy()
            except BaseException:
                self._finalizer()
                raise

    def _adopt(self, st: os.stat_result | None, *, resume: bool, force: bool, note) -> bool:
        """Decide what to do with an earlier run's staging directory; True when it is to be replaced.

        The same job (inputs and options) is continued, with or without ``resume`` (unless ``force`` without
        ``resume`` asks to start over); staged layers of a *different* job are never deleted silently: without
        ``resume`` and ``force`` that is refused. Staging that cannot be reused (unreadable or changed state,
        a staged file altered) holds nothing to lose and is replaced."""
        if st is None:
            if resume:
                note("nothing to resume; starting from the first layer")
            return False
        old = self._load_state()
        done = len(old["layers"]) if old is not None else 0
        if old is None:
            note(f"removing the partial output of an earlier run ({self.dir}): changed or unreadable, not reusable")
            return True
        if old.get("job") == self.job and (resume or not force):
            self.state = old
            how = "" if resume else " (the same inputs and options; --force without --resume starts over)"
            note(f"resuming: {done} layer(s) already done in {self.dir}{how}")
            return False
        if resume:
            raise UsageError(
                f"{self.dir} holds an interrupted run with different inputs or options",
                hint="rerun with the same options, or add --force without --resume to discard it and start over",
            )
        if force or done == 0:
            note(f"removing the partial output of an earlier run ({self.dir}, {done} layer(s) done)")
            return True
        raise UsageError(
            f"{self.dir} holds an interrupted run with {done} layer(s) done, with different inputs or options",
            hint="rerun that job with --resume to finish it, or add --force to discard its layers and start over",
        )

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the run without finishing it: release the lock; keep the directory only if a layer is complete."""
        self._finalizer()

    def _ensure_dir(self) -> None:
        """Create the staging directory (first write of this run), replacing an earlier run's."""
        if self._run.created:
            return
        try:
            if self._stale:
                _private_dir(self.dir, os.lstat(self.dir))
                shutil.rmtree(self.dir)
                self._stale = False
            os.mkdir(self.dir, 0o700)  # fails on anything already there, a symlink included
            _private_dir(self.dir, os.lstat(self.dir))
        except OSError as e:
            raise OutputError(f"cannot create the staging directory: {e.strerror}", path=self.dir) from None
        self._run.created = True

    def _tidy(self) -> None:
        """Resuming: remove what the interrupted run left that the state does not name (a half-staged tensor,
        ``state.json.tmp-*``), so that every file this run writes is created afresh."""
        keep = {"state.json"} | {rec["file"] for rec in self.state["tensors"].values()}
        try:
            for name in os.listdir(self.dir):
                if name not in keep:
                    p = self.dir / name
                    if os.path.isdir(p) and not os.path.islink(p):
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(p)
        except OSError as e:
            raise OutputError(f"cannot tidy the staging directory: {e.strerror}", path=self.dir) from None

    def _load_state(self) -> dict[str, Any] | None:
        try:
            with open(self.dir / "state.json", "rb", opener=nofollow_opener) as fh:
                st = jsonsafe.loads(fh.read(), path=self.dir / "state.json")
        except (OSError, InputError):
            return None  # unreadable or hostile state: the staged layers are not reused
        if not isinstance(st, dict) or not {"job", "tensors", "layers", "extra"} <= set(st):
            return None
        try:
            for info in st["tensors"].values():  # a staged file must be whole and unchanged to be reused
                if not isinstance(info, dict) or Path(str(info.get("file"))).name != info.get("file"):
                    return None
                f = self.dir / info["file"]
                if not is_plain_file(f) or f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
                    return None
        except (OSError, KeyError, TypeError, AttributeError):
            return None
        return st

    def _save_state(self) -> None:
        self._ensure_dir()
        name = None
        try:
            fd, name = tempfile.mkstemp(prefix="state.json.tmp-", dir=self.dir)
            with open(fd, "w", encoding="utf-8") as f:
                f.write(canonical_json(self.state))
                f.flush()
                os.fsync(f.fileno())
            os.replace(name, self.dir / "state.json")
        except BaseException as e:
            if name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(name)
            if isinstance(e, OSError):
                raise OutputError(
                    f"cannot write the staging state: {e.strerror}", path=self.dir, hint=_RESUME_HINT
                ) from None
            raise
        fsync_dir(self.dir)

    # ---- producing ---------------------------------------------------------------------------------
    def layer_done(self, index: int) -> dict[str, Any] | None:
        """The manifest entry of a completed layer, or None."""
        return self.state["layers"].get(str(index))

    def stage(
        self, name: str, dtype: str, shape: tuple[int, ...], blocks: Iterable[np.ndarray], *, background: bool = False
    ) -> dict[str, Any]:
        """Write one tensor's bytes (row blocks in order) to the staging area; returns its record.

        ``background=True`` hashes and writes each block on a worker thread while the producer computes
        the next one (hashlib, file writes and torch all release the GIL); blocks must then stay valid
        until two more have been produced."""
        self._ensure_dir()
        used = {rec["file"] for rec in self.state["tensors"].values()}
        k = len(self.state["tensors"])
        while f"{k:05d}.bin" in used:  # a name staged again (a resumed cross-layer fit) gets a file of its own
            k += 1
        fname = f"{k:05d}.bin"
        h = hashlib.sha256()
        n = 0
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / fname)  # a tensor this run staged for a layer it did not complete
            fd = os.open(self.dir / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as f:

                def sink(buf: memoryview) -> None:
                    h.update(buf)
                    f.write(buf)

                n = _drain(blocks, dtype, sink, background)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OutputError(
                f"cannot write staged data: {e.strerror}", path=self.dir / fname, hint=_RESUME_HINT
            ) from None
        rec = {"dtype": dtype, "shape": list(shape), "bytes": n, "sha256": h.hexdigest(), "file": fname}
        expected = DTYPES[dtype].itemsize * math.prod(shape)
        if n != expected:  # pragma: no cover - a bug in a block producer
            raise AssertionError(f"{name}: staged {n} bytes, expected {expected}")
        self.state["tensors"][name] = rec
        return rec

    def commit_layer(self, index: int, entry: dict[str, Any]) -> None:
        """Mark a layer complete (its tensors must be staged); durable once this returns."""
        self.state["layers"][str(index)] = entry
        self._save_state()

    def stage_extra(self, name: str, data: bytes) -> dict[str, Any]:
        rec = self.stage(name, "U8", (len(data),), [np.frombuffer(data, dtype=np.uint8)])
        self.state["extra"][name] = True
        self._save_state()
        return rec

    # ---- finishing ---------------------------------------------------------------------------------
    def entries(self) -> list[TensorEntry]:
        out = []
        for name, rec in self.state["tensors"].items():
            path = self.dir / rec["file"]
            dt = DTYPES[rec["dtype"]]
            shape = tuple(rec["shape"])

            def blocks(path: Path = path, dt=dt, shape: tuple[int, ...] = shape) -> Iterator[np.ndarray]:
                row_bytes = math.prod(shape[1:]) * dt.itemsize
                spans = [(shape[0], row_bytes)] if shape else [(1, dt.itemsize)]  # (rows, bytes per row)
                if shape and shape[0]:
                    step = rows_per_block(row_bytes)
                    spans = [(min(step, shape[0] - s), row_bytes) for s in range(0, shape[0], step)]
                try:
                    f = open(path, "rb", opener=nofollow_opener)  # noqa: SIM115 - closed below
                except OSError as e:
                    raise OutputError(f"cannot read staged data: {e.strerror}", path=path) from None
                with f:
                    for k, nb in spans:
                        raw = f.read(k * nb)
                        if len(raw) != k * nb:
                            raise VerifyError(f"staged file {path} is shorter than recorded (changed after staging?)")
                        yield np.frombuffer(raw, dtype=dt.numpy).reshape((k, *shape[1:]) if shape else ())

            out.append(TensorEntry(name, rec["dtype"], shape, rec["sha256"], blocks))
        return out

    def finish(self, manifest: dict[str, Any]) -> Path:
        """Assemble the bundle at the output, remove the staging directory, release the lock."""
        try:
            path = write_bundle(self.out, self.entries(), manifest, self.options)
            self.discard()
        finally:
            self.close()
        return path

    def discard(self) -> None:
        """The run is complete (its output is in place): remove the staging directory."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self._run.finished = True
