"""Write bundles: assemble a container atomically, and stage layers for resumable streaming writers.

A command that produces layers one at a time (``precompute``, ``compress``) stages each finished tensor
in a hidden directory beside the output (``.OUT.partial/``), recording it in ``state.json`` once the
layer is complete. Nothing appears at the output path until :meth:`Staging.finish` assembles the
container into a temp file and renames it. ``--resume`` reuses the completed layers of an interrupted
run of the *same job* (same inputs and options), so the final bytes equal those of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import shutil
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tolcli.bundle import container as registry
from tolcli.bundle.entries import TensorEntry, rows_per_block
from tolcli.bundle.manifest import canonical_json, validate_schema
from tolcli.bundle.sharded import write_sharded
from tolcli.dtypes import DTYPES
from tolcli.errors import OutputError, UsageError, VerifyError
from tolcli.fsutil import atomic_output, check_output, fsync_dir, parse_bytes, sha256_file


def container_for(path: Path, container: str | None = None, *, sharded: bool = False) -> str:
    """The container of an output path: from ``--format`` or the suffix (a sharded bundle is a directory:
    :data:`~tolcli.bundle.container.DEFAULT` shards unless ``--format`` or a suffix such as ``.h5`` names one)."""
    if path.is_dir() and not sharded:
        raise UsageError(f"{path} is a directory: a directory output needs --max-shard-size")
    if container is not None:
        if container not in registry.names():
            raise UsageError(f"--format must be {' or '.join(registry.names())}, got {container!r}")
        return container
    found = registry.by_suffix(path.suffix)
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


class Staging:
    """Finished tensors of a streaming job, on disk beside the output, resumable."""

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
        if self.dir.exists():
            old = self._load_state()
            if resume and old is not None and old.get("job") == self.job:
                self.state = old
                note(f"resuming: {len(old['layers'])} layer(s) already done in {self.dir}")
            elif resume and old is not None:
                raise UsageError(
                    f"{self.dir} holds an interrupted run with different inputs or options",
                    hint="rerun with the same options, or drop --resume to start over",
                )
            else:
                note(f"removing the partial output of an earlier run ({self.dir}); --resume would continue it")
                shutil.rmtree(self.dir)
        elif resume:
            note("nothing to resume; starting from the first layer")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the staging directory: {e.strerror}", path=self.dir) from None

    def _load_state(self) -> dict[str, Any] | None:
        try:
            st = json.loads((self.dir / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(st, dict) or not {"job", "tensors", "layers", "extra"} <= set(st):
            return None
        for info in st["tensors"].values():  # a staged file must be whole and unchanged to be reused
            f = self.dir / info["file"]
            if not f.is_file() or f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
                return None
        return st

    def _save_state(self) -> None:
        tmp = self.dir / "state.json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(canonical_json(self.state))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "state.json")
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
        fname = f"{len(self.state['tensors']):05d}.bin"
        h = hashlib.sha256()
        n = 0
        try:
            with open(self.dir / fname, "wb") as f:

                def sink(buf: memoryview) -> None:
                    h.update(buf)
                    f.write(buf)

                n = _drain(blocks, dtype, sink, background)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OutputError(f"cannot write staged data: {e.strerror}", path=self.dir / fname) from None
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
                with open(path, "rb") as f:
                    for k, nb in spans:
                        raw = f.read(k * nb)
                        if len(raw) != k * nb:
                            raise VerifyError(f"staged file {path} is shorter than recorded (changed after staging?)")
                        yield np.frombuffer(raw, dtype=dt.numpy).reshape((k, *shape[1:]) if shape else ())

            out.append(TensorEntry(name, rec["dtype"], shape, rec["sha256"], blocks))
        return out

    def finish(self, manifest: dict[str, Any]) -> Path:
        path = write_bundle(self.out, self.entries(), manifest, self.options)
        shutil.rmtree(self.dir, ignore_errors=True)
        return path
