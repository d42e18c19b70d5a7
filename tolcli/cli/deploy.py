"""``tolcli strip`` and ``bench-lookup``: what a deployment runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

import tolcli
from tolcli._lazy import lazy_import
from tolcli.cli._common import (
    AllowSourceMismatchOpt,
    BundleArg,
    CheckpointArg,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    Output,
    QuietOpt,
    RevisionOpt,
    TensorMapOpt,
    ThreadsOpt,
    apply_threads,
    checkpoint_from_cli,
    fmt_bytes,
    note_to_stderr,
)

runtime = lazy_import("tolcli.runtime")


def strip_cmd(
    checkpoint: CheckpointArg,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="DIR", help="The stripped checkpoint directory.")],
    tol: Annotated[
        list[Path] | None,
        typer.Option(
            "--tol",
            metavar="BUNDLE",
            help="A bundle to deploy with it (repeatable): refuse to strip when it came from another checkpoint.",
        ),
    ] = None,
    allow_source_mismatch: AllowSourceMismatchOpt = False,
    tensor_map: TensorMapOpt = None,
    revision: RevisionOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write the deployable checkpoint without the context-free FFN weights (run it with a bundle).

    Example:

        tolcli strip ./my-memoryllm -o ./my-memoryllm-active && tolcli info ./my-memoryllm-active

        tolcli strip ./my-memoryllm -o ./active --tol tol-int4.safetensors   # refuses a bundle of another model
    """
    out = Output(json=json_out, quiet=quiet, command="strip", inputs=[checkpoint, *(tol or [])], output=output)
    t0 = time.monotonic()
    with checkpoint_from_cli(checkpoint, tensor_map=tensor_map, revision=revision) as ckpt:
        res = tolcli.strip_checkpoint(
            ckpt,
            output,
            force=force,
            tols=tol or [],
            allow_source_mismatch=allow_source_mismatch,
            note=note_to_stderr(out),
        )
    if json_out:
        out.emit_doc(
            {
                "tensors_kept": res.kept,
                "tensors_removed": res.removed,
                "bytes_removed": res.bytes_removed,
                "source_fingerprint": res.source_fingerprint,
            },
            output=res.path,
        )
        return
    out.print(
        f"wrote {res.path} ({res.kept} tensors; removed {res.removed} context-free FFN tensors, "
        f"{fmt_bytes(res.bytes_removed)}) in {time.monotonic() - t0:.1f}s"
    )


def bench_lookup_cmd(
    bundle: BundleArg,
    data: Annotated[Path, typer.Option("--data", help="Text (or .npy ids) whose token stream is looked up.")],
    cache_tokens: Annotated[int, typer.Option("--cache-tokens", metavar="K", help="Resident rows per layer.")] = 1024,
    token_weights: Annotated[
        Path | None, typer.Option("--token-weights", metavar="FILE.npy", help="Pick hot tokens from these counts.")
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option("--calibration", metavar="TEXT", help="Pick hot tokens from this text's counts.")
    ] = None,
    batch: Annotated[
        int, typer.Option("--batch-tokens", "--batch", metavar="N", help="Token ids per lookup call (also --batch).")
    ] = 4096,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Lookup throughput and hit rate of a hot-token cache over a token stream (misses read the bundle).

    Hot tokens come from --token-weights or --calibration, else from the data itself (an optimistic bound).

    Example:

        tolcli bench-lookup int4.safetensors --data tolcli/demo/heldout.txt --cache-tokens 256
    """
    apply_threads(threads)
    out = Output(json=json_out, command="bench-lookup", inputs=[bundle, data, token_weights, calibration])
    doc = runtime.bench_lookup(
        bundle,
        data,
        cache_tokens=cache_tokens,
        token_weights=token_weights,
        calibration=calibration,
        batch=batch,
        device=device,
    )
    if json_out:
        out.emit_doc(doc)
        return
    t = Table(
        show_header=False, title=f"{bundle}: {doc['tokens']:,} tokens x {doc['layers']} layers", title_justify="left"
    )
    t.add_row(
        "hot tokens",
        f"{doc['cache_tokens']:,} (from {doc['hot_tokens_from']}), {fmt_bytes(doc['resident_bytes'])} resident"
        f" on {doc['device']}",
    )
    t.add_row("hit rate", f"{100 * doc['hit_rate']:.1f}%")
    t.add_row("bundle reads", f"{doc['rows_per_s_direct']:,.0f} rows/s")
    t.add_row("with the cache", f"{doc['rows_per_s_cached']:,.0f} rows/s ({doc['speedup']:.2f}x)")
    out.print(t)
