"""``tolcli precompute``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import tolcli
from tolcli.choices import DEFAULT_BATCH_ROWS
from tolcli.cli._common import (
    CheckpointArg,
    CompressionOpt,
    DeviceOpt,
    ForceOpt,
    FormatOpt,
    JsonOpt,
    MaxShardOpt,
    Output,
    OutputOpt,
    QuietOpt,
    RevisionOpt,
    RichProgress,
    Sha256sumsOpt,
    TensorMapOpt,
    ThreadsOpt,
    apply_threads,
    layers_present,
    note_to_stderr,
    print_written,
)
from tolcli.demo import resolve_checkpoint_arg
from tolcli.fsutil import check_sums_path, path_bytes, write_sha256sums


def precompute_cmd(
    checkpoint: CheckpointArg,
    output: OutputOpt,
    fmt: FormatOpt = None,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="Stored element type: bf16 (the default: half of fp32's bytes, fp32's range; compressing from it "
            "costs nothing measurable), fp16, or fp32 (the exact values, to compare codecs against).",
        ),
    ] = "bf16",
    device: DeviceOpt = "auto",
    layers: Annotated[
        str | None, typer.Option("--layers", metavar="SPEC", help="Only these layers, e.g. '0-3,7' (others: dropped).")
    ] = None,
    batch_tokens: Annotated[
        int, typer.Option("--batch-tokens", metavar="N", help="Vocabulary rows computed per batch.")
    ] = DEFAULT_BATCH_ROWS,
    matmul_dtype: Annotated[
        str, typer.Option("--matmul-dtype", help="fp32, or bf16/fp16 matmuls with fp32 accumulation (GPU speed).")
    ] = "fp32",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of the same job.")] = False,
    force: ForceOpt = False,
    compression: CompressionOpt = None,
    max_shard_size: MaxShardOpt = None,
    tensor_map: TensorMapOpt = None,
    revision: RevisionOpt = None,
    sha256sums: Sha256sumsOpt = None,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compute every context-free layer's ToL into a dense bundle (streamed, resumable).

    Example:

        tolcli precompute demo -o demo.safetensors

        tolcli precompute ./my-memoryllm -o tol.h5 --dtype bf16 --device cuda

        tolcli precompute ./my-memoryllm -o tol.safetensors --resume   # after an interruption

        tolcli precompute org/my-memoryllm -o tol.safetensors   # from the local Hugging Face cache
    """
    apply_threads(threads)
    out = Output(json=json_out, quiet=quiet, command="precompute", inputs=[checkpoint], output=output)
    source = resolve_checkpoint_arg(checkpoint, revision=revision)
    if sha256sums:
        check_sums_path(sha256sums, output, source)
    res = tolcli.precompute(
        source,
        output,
        container=fmt,
        dtype=dtype,
        device=device,
        layers=layers,
        batch_rows=batch_tokens,
        matmul_dtype=matmul_dtype,
        resume=resume,
        force=force,
        compression=compression,
        max_shard_size=max_shard_size,
        tensor_map=tensor_map,
        progress=RichProgress(out),
        note=note_to_stderr(out),
    )
    if sha256sums:
        write_sha256sums(Path(sha256sums), [res.path])
    present = [e for e in res.manifest["layers"] if e["status"] == "present"]
    if json_out:
        out.emit_doc(
            {
                "bytes": path_bytes(res.path),
                "layers_present": layers_present(res.manifest),
                "layers_computed": res.layers_computed,
                "manifest": res.manifest,
            },
            output=res.path,
        )
        return
    dtype_name = present[0]["params"]["dtype"] if present else "-"
    print_written(out, res.path, f"{len(present)} layers, dense {dtype_name}", res.seconds)
