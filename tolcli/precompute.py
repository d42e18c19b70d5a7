"""Compute every context-free layer's ToL from a checkpoint and stream it into a bundle.

``ToL_i[t] = ffn_alpha * MLP_i(MemNorm_i(E[t]))`` for every token id ``t``: exactly the term the model
adds to its residual stream (the same function, :func:`tolcli.model.context_free_term`). Computation
is fp32, batched over the vocabulary; one layer's FFN weights and one batch of rows are held at a time,
and each finished layer is staged to disk, so peak memory does not grow with the number of layers.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tolcli import __version__
from tolcli.bundle.manifest import created_timestamp
from tolcli.bundle.reader import open_bundle
from tolcli.bundle.spec import FORMAT_NAME, FORMAT_VERSION, TOKENIZER_TENSOR, layer_tensor
from tolcli.bundle.writer import Staging, WriteOptions
from tolcli.checkpoint import Checkpoint, TensorMap, open_checkpoint
from tolcli.choices import DEFAULT_BATCH_ROWS
from tolcli.codecs import Codec, DenseCodec
from tolcli.distributed import Dist, all_gather, finish_distributed, from_env
from tolcli.dtypes import tensor_to_numpy
from tolcli.errors import InputError, UsageError
from tolcli.fsutil import sha256_file
from tolcli.layout import EMBED, memory_ffn_names, parse_layer_spec
from tolcli.model import MemoryFFN, context_free_term, load_memory_ffn
from tolcli.pairing import source_fingerprint
from tolcli.progress import NullProgress, Progress

FP16_MAX = 65504.0


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"`device` {device}: no CUDA device is available", hint="use the cpu device")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev


def source_description(ckpt: Checkpoint) -> dict[str, Any]:
    """The manifest's ``source``: checkpoint name, its files with sha256, its config, and the fingerprint of what
    determines the ToLs (:func:`tolcli.pairing.source_fingerprint`)."""
    files = []
    for f in sorted({*ckpt.files, *([ckpt.index_path] if ckpt.index_path else [])}):
        files.append({"name": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)})
    source = {"checkpoint": ckpt.path.name, "files": files, "config": ckpt.config.to_dict()}
    fingerprint = source_fingerprint(ckpt)
    if fingerprint is not None:
        source["fingerprint"] = fingerprint
    return source


def vocabulary_description(vocab_size: int, tokenizer: bytes | None) -> dict[str, Any]:
    special: list[str] = []
    if tokenizer is not None:
        try:
            added = json.loads(tokenizer).get("added_tokens", [])
            special = sorted(t["content"] for t in added if isinstance(t, dict) and t.get("special"))
        except (ValueError, AttributeError, KeyError, TypeError):
            special = []
    return {
        "size": vocab_size,
        "embedded": tokenizer is not None,
        "tokenizer_sha256": None if tokenizer is None else hashlib.sha256(tokenizer).hexdigest(),
        "special_tokens": special,
    }


class LayerStats:
    """Streaming statistics of one layer, exact (fp32) vs stored values, accumulated on the compute
    device so that no batch waits for a host synchronisation."""

    def __init__(self, device: torch.device):
        self._acc = torch.zeros(5, dtype=torch.float64, device=device)  # sumsq, errsq, max_abs, overflow, nonfinite

    def update(self, exact: torch.Tensor, stored: torch.Tensor) -> None:
        if not exact.numel():
            return
        self._acc[4] += (~torch.isfinite(exact)).sum()
        # fp32 norms per batch (fast), accumulated in fp64 across batches
        self._acc[0] += torch.linalg.vector_norm(exact).double() ** 2
        if stored.dtype != exact.dtype or stored.data_ptr() != exact.data_ptr():
            self._acc[1] += torch.linalg.vector_norm(stored.float() - exact).double() ** 2
        peak = exact.abs().amax().double()
        self._acc[2] = torch.maximum(self._acc[2], peak)
        if bool(peak > FP16_MAX):
            self._acc[3] += (exact.abs() > FP16_MAX).sum()

    def result(self) -> dict[str, Any]:
        sumsq, errsq, max_abs, overflow, _ = self._acc.tolist()
        rel = math.sqrt(errsq / sumsq) if sumsq > 0 else 0.0
        return {"rel_error": rel if math.isfinite(rel) else None, "max_abs": max_abs, "fp16_overflow": int(overflow)}

    @property
    def nonfinite(self) -> int:
        return int(self._acc[4].item())


def pipelined(batches: Iterator[torch.Tensor], device: torch.device) -> Iterator[np.ndarray]:
    """Host copies of device tensors. On CUDA, each batch is copied into one of four pinned host buffers
    on a side stream while the next batch computes; a yielded array stays valid while the next two are
    produced, as the background staging writer needs (one block queued, one being written)."""
    if device.type != "cuda":
        for t in batches:
            yield tensor_to_numpy(t.cpu())
        return
    stream = torch.cuda.Stream(device)
    pinned: list[torch.Tensor | None] = [None] * 4  # copying, yielded, queued, being written
    pending: tuple[int, torch.cuda.Event] | None = None
    for k, t in enumerate(batches):
        slot = k % 4
        buf = pinned[slot]
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = pinned[slot] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            buf.copy_(t, non_blocking=True)
            t.record_stream(stream)
            event = torch.cuda.Event()
            event.record(stream)
        if pending is not None:
            pending[1].synchronize()
            yield tensor_to_numpy(pinned[pending[0]])  # type: ignore[arg-type]
        pending = (slot, event)
    if pending is not None:
        pending[1].synchronize()
        yield tensor_to_numpy(pinned[pending[0]])  # type: ignore[arg-type]


MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def nonfinite_weights(ckpt: Checkpoint, layer: int) -> str:
    """``"; NaN/Inf in model.layers.3.mlp.up_proj.weight (12)"``, or "" when the weights are finite."""
    bad = []
    for name in [*memory_ffn_names(ckpt.config, layer).values(), EMBED]:
        if ckpt.has(name):
            n = int((~torch.isfinite(ckpt.load(name, dtype=None))).sum())
            if n:
                bad.append(f"{name} ({n:,})")
    return f"; NaN/Inf in {', '.join(bad)}" if bad else ""


@dataclass
class PrecomputeResult:
    path: Path
    manifest: dict[str, Any]
    seconds: float
    layers_computed: int


@dataclass(frozen=True)
class PrecomputeJob:
    """A validated precompute: what to compute, where, and how to write it (:func:`plan_precompute`)."""

    ckpt: Checkpoint
    out: Path
    layers: list[int]  # every selected layer
    mine: list[int]  # the layers this process computes (all of them unless under torchrun)
    device: torch.device
    dist: Dist | None
    codec: DenseCodec
    matmul_dtype: str
    batch_rows: int
    options: WriteOptions

    def record(self) -> dict[str, Any]:
        """What identifies the job for ``--resume`` (same record, same bytes)."""
        return {
            "command": "precompute",
            "source": source_description(self.ckpt),
            "codec": self.codec.params(),
            "layers": self.layers,
            "batch_rows": self.batch_rows,
            "matmul_dtype": self.matmul_dtype,
            "device": self.device.type,
            **self.options.job(),
            "rank": None if self.dist is None else [self.dist.rank, self.dist.world],
        }


def plan_precompute(
    checkpoint: str | Path | Checkpoint,
    out: str | Path,
    *,
    container: str | None,
    dtype: str,
    device: str,
    layers: str | list[int] | None,
    batch_rows: int,
    matmul_dtype: str,
    force: bool,
    compression: str | None,
    max_shard_size: int | str | None,
    tensor_map: str | Path | TensorMap | None,
) -> PrecomputeJob:
    """Check every option against the checkpoint before any work; split the layers under torchrun."""
    if batch_rows < 1:
        raise UsageError(f"`batch_rows` must be >= 1, got {batch_rows}")
    if matmul_dtype not in MATMUL_DTYPES:
        raise UsageError(f"`matmul_dtype` must be one of {', '.join(MATMUL_DTYPES)}, got {matmul_dtype!r}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint, tensor_map=tensor_map)
    cfg = ckpt.config
    if not cfg.has_memory:
        raise UsageError(
            f"{ckpt.path}: model_type {cfg.model_type!r} has no context-free FFN, so there is nothing to precompute",
            hint="precompute needs a memoryllm or flex_memoryllm checkpoint",
        )
    L = cfg.num_hidden_layers
    selected = parse_layer_spec(layers, L) if isinstance(layers, str) else sorted(set(layers or range(L)))
    if any(not 0 <= i < L for i in selected):
        raise UsageError(f"`layers` must be within 0..{L - 1}")
    dev = resolve_device(device)
    dist = from_env(dev.type)
    mine = selected
    if dist is not None:  # torchrun: this rank computes every world-th layer and writes its own shards
        mine = [i for i in selected if i % dist.world == dist.rank]
        if dev.type == "cuda":
            dev = torch.device("cuda", dist.local_rank)
        max_shard_size = max_shard_size or (1 << 62)  # the output is always a sharded directory
    options = WriteOptions.make(
        Path(out), container=container, compression=compression, max_shard_size=max_shard_size, force=force
    )
    return PrecomputeJob(
        ckpt, Path(out), selected, mine, dev, dist, DenseCodec(dtype), matmul_dtype, batch_rows, options
    )


def layer_batches(
    job: PrecomputeJob, embed: torch.Tensor, ffn: MemoryFFN, stats: LayerStats, progress: Progress
) -> Iterator[torch.Tensor]:
    """One layer's stored rows, ``batch_rows`` at a time, on the job's device; ``stats`` sees every batch."""
    mm = MATMUL_DTYPES[job.matmul_dtype]
    if mm != torch.float32:
        ffn.mlp.to(mm)

    def run_mlp(x: torch.Tensor) -> torch.Tensor:
        return ffn.mlp(x.to(mm)).float()

    with torch.no_grad():
        for b0 in range(0, embed.shape[0], job.batch_rows):
            x0 = embed[b0 : b0 + job.batch_rows].to(device=job.device, dtype=torch.float32, non_blocking=True)
            exact = context_free_term(ffn.memory_layernorm, run_mlp, ffn.alpha, x0)  # (rows, h) fp32
            stored = job.codec.encode(exact)["table"]
            stats.update(exact, stored)
            progress.advance(exact.shape[0])
            yield stored


def compute_layer(job: PrecomputeJob, staging: Staging, embed: torch.Tensor, i: int, progress: Progress) -> None:
    """Compute layer ``i``'s ToL into the staging area and commit its manifest entry."""
    V, h = job.ckpt.config.vocab_size, job.ckpt.config.hidden_size
    ffn = load_memory_ffn(job.ckpt, i, device=job.device)
    stats = LayerStats(job.device)
    name = layer_tensor(i, "table")
    blocks = pipelined(layer_batches(job, embed, ffn, stats, progress), job.device)
    staging.stage(name, job.codec.dtype, (V, h), blocks, background=True)
    if stats.nonfinite:
        raise InputError(
            f"layer {i}: {stats.nonfinite:,} non-finite values (NaN/Inf) in the computed ToL"
            + nonfinite_weights(job.ckpt, i),
            path=job.ckpt.path,
            hint="fix the checkpoint; nothing was written",
        )
    staging.commit_layer(i, layer_entry(i, job.codec, {"table": name}, V, h, stats.result()))


def layer_entry(
    index: int, codec: Codec, tensors: dict[str, str], rows: int, width: int, stats: dict[str, Any]
) -> dict[str, Any]:
    """A present layer's manifest entry: codec, its tensors, stored size, and the measured ``stats``."""
    stored = codec.stored_bytes(rows, width)
    return {
        "index": index,
        "status": "present",
        "codec": codec.name,
        "params": codec.params(),
        "tensors": tensors,
        "stored_bytes": stored,
        "bits_per_value": 8 * stored / (rows * width),
        **stats,
    }


def overflow_warnings(entries: list[dict[str, Any]], codec: DenseCodec) -> list[str]:
    return [
        f"layer {e['index']}: {e['fp16_overflow']} values exceed the fp16 range (|x| > {FP16_MAX:.0f}) and are stored"
        " as inf; use --dtype bf16 or fp32"
        for e in entries
        if e["status"] == "present" and e["fp16_overflow"] and codec.dtype == "F16"
    ]


def bundle_manifest(job: PrecomputeJob, entries: list[dict[str, Any]], tok: bytes | None) -> dict[str, Any]:
    """The manifest of a freshly precomputed bundle (``tensors`` is filled in by the writer)."""
    cfg = job.ckpt.config
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tolcli_version": __version__,
        "source": source_description(job.ckpt),
        "model": {
            "type": cfg.model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_hidden_layers,
            "ffn_alpha": cfg.ffn_alpha,
            "memory_norm_type": cfg.memory_norm_type,
        },
        "vocabulary": vocabulary_description(cfg.vocab_size, tok),
        "layers": entries,
        "tensors": {},
        "warnings": overflow_warnings(entries, job.codec),
        "history": [
            {"command": "precompute", "dtype": job.codec.dtype, "layers": job.layers, "matmul_dtype": job.matmul_dtype}
        ],
    }
    created = created_timestamp()
    if created:
        manifest["created"] = created
    return manifest


def all_entries(job: PrecomputeJob, staging: Staging) -> list[dict[str, Any]]:
    """Every layer's manifest entry (dropped when not selected); under torchrun, gathered from every rank."""
    done = {i: staging.layer_done(i) for i in job.mine}
    if job.dist is not None:
        done = {k: v for part in all_gather(done) for k, v in part.items()}
    return [done.get(i) or {"index": i, "status": "dropped"} for i in range(job.ckpt.config.num_hidden_layers)]


def precompute(
    checkpoint: str | Path | Checkpoint,
    out: str | Path,
    *,
    container: str | None = None,
    dtype: str = "bf16",
    device: str = "auto",
    layers: str | list[int] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    matmul_dtype: str = "fp32",
    resume: bool = False,
    force: bool = False,
    compression: str | None = None,
    max_shard_size: int | str | None = None,
    tensor_map: str | Path | TensorMap | None = None,
    progress: Progress | None = None,
    note: Callable[[str], None] = lambda s: None,
) -> PrecomputeResult:
    """Compute a model's ToLs into a dense bundle.

    Args:
        checkpoint: checkpoint directory / weights file, or an opened :class:`Checkpoint`.
        out: the bundle to write (``.safetensors`` or ``.h5``; or set ``container``).
        dtype: stored element type (computation is always fp32): ``bf16`` (the default: half of fp32's bytes with
            fp32's range; compressing from it costs nothing measurable, docs/compression.md), ``fp16``, or ``fp32``
            (the exact values).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        layers: layer indices or a spec such as ``"0-3,7"``; the others are recorded as dropped.
        batch_rows: vocabulary rows per batch.
        matmul_dtype: ``fp32`` (default), or ``bf16``/``fp16`` matmuls (fp32 accumulation; the norm and the
            output stay fp32): faster on GPUs, at about bf16/fp16 rounding error.
        resume: continue an interrupted run of the same job (bytes equal an uninterrupted run).
        force: overwrite ``out``.
        compression: HDF5 only, ``gzip`` or ``lzf``.
        max_shard_size: write a sharded bundle directory with shards of at most this many bytes
            (an int, or a size such as ``"2GB"``).

    Returns:
        A :class:`PrecomputeResult` with the path and the manifest written.

    Example:
        >>> import tempfile, pathlib
        >>> from tolcli import precompute, demo_checkpoint_path
        >>> r = precompute(demo_checkpoint_path(), pathlib.Path(tempfile.mkdtemp()) / "tol.h5", dtype="bf16")
        >>> [e["codec"] for e in r.manifest["layers"]][:2], r.manifest["layers"][0]["params"]
        (['dense', 'dense'], {'dtype': 'BF16'})
    """
    t0 = time.monotonic()
    progress = progress or NullProgress()
    job = plan_precompute(
        checkpoint,
        out,
        container=container,
        dtype=dtype,
        device=device,
        layers=layers,
        batch_rows=batch_rows,
        matmul_dtype=matmul_dtype,
        force=force,
        compression=compression,
        max_shard_size=max_shard_size,
        tensor_map=tensor_map,
    )
    rank = job.dist
    tag = "" if rank is None else f".rank{rank.rank}"  # one staging area per distributed rank
    staging = Staging(job.out, job.record(), resume=resume, options=job.options, note=note, tag=tag)
    embed = job.ckpt.load(EMBED, dtype=None)  # kept in its stored dtype; batches are cast to fp32
    todo = [i for i in job.mine if staging.layer_done(i) is None]
    progress.start(f"precompute {len(todo)} layer(s)", len(todo) * job.ckpt.config.vocab_size)
    for i in todo:
        compute_layer(job, staging, embed, i, progress)
    progress.finish()

    tok = job.ckpt.tokenizer_path.read_bytes() if job.ckpt.tokenizer_path else None
    if tok is not None and TOKENIZER_TENSOR not in staging.state["tensors"] and (rank is None or rank.rank == 0):
        staging.stage_extra(TOKENIZER_TENSOR, tok)
    manifest = bundle_manifest(job, all_entries(job, staging), tok)
    for w in manifest["warnings"]:
        note(f"warning: {w}")
    path = staging.finish(manifest) if rank is None else finish_distributed(rank, staging, job.out, manifest)
    with open_bundle(path) as b:  # re-read what was written: the manifest as stored
        written = b.manifest
    return PrecomputeResult(path, written, time.monotonic() - t0, len(todo))
