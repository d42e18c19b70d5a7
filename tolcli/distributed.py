"""torch.distributed helpers for ``torchrun ... -m tolcli precompute``: ranks split the layers.

Each rank computes its layers into its own resumable staging area and writes its own shards into a
shared temp directory beside the output; rank 0 writes ``tol.index.json`` (with the manifest) and
renames the directory into place. The output directory must be on a filesystem every rank sees (one
machine, or a shared filesystem for ``--nnodes`` > 1). gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tolcli.bundle.manifest import canonical_json, validate_schema
from tolcli.bundle.sharded import INDEX_NAME, index_document, partition, shard_name, write_shards
from tolcli.bundle.writer import Staging, checked_entry
from tolcli.fsutil import atomic_dir


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int


def from_env(device_type: str) -> Dist | None:
    """Join the process group torchrun describes in the environment; None when not under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def finish_distributed(
    d: Dist,
    staging: Staging,
    out: Path,
    manifest: dict[str, Any],
) -> Path:
    """Every rank writes its staged tensors as shards; rank 0 writes the index with ``manifest`` (which
    already holds every rank's layer entries) and the tensors of all ranks."""
    opts = staging.options
    assert opts.max_shard_size is not None, "a distributed run always writes a sharded directory"
    # One temp directory for all ranks: rank 0 creates it (mkdtemp: an unpredictable name, private, created
    # exclusively, under the output's lock) and tells the others its name; it renames it into place at the end.
    owner = atomic_dir(out, force=opts.force) if d.rank == 0 else contextlib.nullcontext(None)
    try:
        with owner as mine:
            tmp = Path(all_gather(None if mine is None else str(mine))[0])
            entries = [checked_entry(e) for e in staging.entries()]
            groups = partition(entries, opts.max_shard_size) if entries else []
            counts = all_gather(len(groups))
            start, total = sum(counts[: d.rank]), sum(counts)
            names = [shard_name(start + k, total, opts.container) for k in range(len(groups))]
            records = write_shards(tmp, groups, names, opts.container, opts.compression)
            weight_map = {e.name: n for g, n in zip(groups, names, strict=True) for e in g}
            tensors = {
                e.name: {"dtype": e.dtype, "shape": list(e.shape), "bytes": e.nbytes, "sha256": e.sha256}
                for e in entries
            }
            gathered = all_gather((records, weight_map, tensors))
            if d.rank == 0:
                all_records = sorted((r for g in gathered for r in g[0]), key=lambda r: r["name"])
                merged_map = {k: v for g in gathered for k, v in g[1].items()}
                merged = dict(manifest)
                merged["tensors"] = {k: v for g in gathered for k, v in g[2].items()}
                validate_schema(merged, where=str(out))
                index = index_document(merged, all_records, merged_map)
                (tmp / INDEX_NAME).write_text(canonical_json(index), encoding="utf-8")
        barrier()
        staging.discard()
    finally:
        staging.close()  # releases the staging lock (a failed run keeps completed layers for --resume)
    return out
