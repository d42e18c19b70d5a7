"""``tolcli precompute``, ``inspect``, ``verify``, ``convert`` and ``schema``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from tolcli.bundle.convert import convert_bundle
from tolcli.bundle.manifest import MANIFEST_SCHEMA
from tolcli.bundle.reader import open_bundle
from tolcli.bundle.summary import bundle_summary
from tolcli.cli._common import (
    CompressionOpt,
    DeviceOpt,
    ForceOpt,
    FormatOpt,
    JsonOpt,
    MaxShardOpt,
    Output,
    QuietOpt,
    RichProgress,
    Sha256sumsOpt,
    TensorMapOpt,
    VerifyOpt,
    fmt_bytes,
    note_to_stderr,
)
from tolcli.demo import resolve_checkpoint_arg
from tolcli.errors import VerifyError
from tolcli.fsutil import path_bytes, write_sha256sums
from tolcli.precompute import DEFAULT_BATCH_ROWS, precompute

OutputOpt = Annotated[
    Path, typer.Option("--output", "-o", metavar="OUT", help="The bundle to write (.safetensors or .h5).")
]
BundleArg = Annotated[Path, typer.Argument(help="A ToL bundle (.safetensors or .h5).")]


def _summary(out: Output, path: Path, what: str, seconds: float) -> None:
    out.print(f"wrote {path} ({fmt_bytes(path_bytes(path))}, {what}) in {seconds:.1f}s")


def precompute_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint directory or weights file, or 'demo'.")],
    output: OutputOpt,
    fmt: FormatOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Stored element type: fp32, fp16 or bf16.")] = "fp32",
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
    sha256sums: Sha256sumsOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compute every context-free layer's ToL into a dense bundle (streamed, resumable).

    Example:

        tolcli precompute demo -o demo.safetensors

        tolcli precompute ./my-memoryllm -o tol.h5 --dtype bf16 --device cuda

        tolcli precompute ./my-memoryllm -o tol.safetensors --resume   # after an interruption
    """
    out = Output(json=json_out, quiet=quiet)
    res = precompute(
        resolve_checkpoint_arg(checkpoint),
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
        out.emit_json(
            {
                "output": str(res.path),
                "bytes": path_bytes(res.path),
                "seconds": round(res.seconds, 3),
                "layers_computed": res.layers_computed,
                "manifest": res.manifest,
            }
        )
        return
    dtype_name = present[0]["params"]["dtype"] if present else "-"
    _summary(out, res.path, f"{len(present)} layers, dense {dtype_name}", res.seconds)


def _layer_params(e: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(e.get("params", {}).items()))


def inspect_cmd(
    bundle: BundleArg,
    plot: Annotated[
        Path | None, typer.Option("--plot", metavar="FILE.png", help="Also draw bytes, rank/bits and error per layer.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show a bundle's manifest: model, vocabulary, and per layer the codec, bytes and error.

    Example:

        tolcli inspect demo.safetensors --plot layers.png

        tolcli inspect tol.h5 --json | jq '.manifest.layers[] | {index, codec, stored_bytes}'
    """
    out = Output(json=json_out)
    with open_bundle(bundle) as b:
        m = b.manifest
        container = b.container
    if plot is not None:
        from tolcli.plots import layer_figure

        codecs = ", ".join(sorted({e["codec"] for e in m["layers"] if e["status"] == "present"}))
        layer_figure(m, plot, f"{bundle.name}: {codecs}, {m['model']['num_layers']} layers")
    summary = {"container": container, "file_bytes": path_bytes(bundle), **bundle_summary(m)}
    if json_out:
        out.emit_json({"path": str(bundle), "summary": summary, "manifest": m})
        return
    head = Table(
        title=f"{bundle} ({container}, {m['format']} v{m['format_version']})", show_header=False, title_justify="left"
    )
    mod, voc = m["model"], m["vocabulary"]
    head.add_row(
        "model",
        f"{mod['type']} from {m['source']['checkpoint']}: {mod['num_layers']} layers, "
        f"hidden {mod['hidden_size']}, alpha {mod['ffn_alpha']}, {mod['memory_norm_type']}",
    )
    tok = f"embedded (sha256 {voc['tokenizer_sha256'][:12]}...)" if voc["embedded"] else "not embedded"
    head.add_row("vocabulary", f"{voc['size']:,} tokens, tokenizer {tok}")
    head.add_row("layers", f"{summary['layers_present']} present, {summary['layers_dropped']} dropped")
    head.add_row(
        "stored",
        f"{fmt_bytes(summary['stored_bytes'])} = {100 * summary['fraction_of_dense_fp16']:.1f}% of dense fp16 "
        f"({fmt_bytes(summary['dense_fp16_bytes'])}); file {fmt_bytes(summary['file_bytes'])}",
    )
    head.add_row("written by", f"tolcli {m['tolcli_version']}" + (f" at {m['created']}" if "created" in m else ""))
    out.print(head)
    t = Table(
        "layer", "status", "codec", "params", "stored", "bits/value", "rel. error", title="Layers", title_justify="left"
    )
    for e in m["layers"]:
        if e["status"] != "present":
            t.add_row(str(e["index"]), e["status"], "", "", "", "", "")
            continue
        err = "-" if e.get("rel_error") is None else f"{e['rel_error']:.2e}"
        t.add_row(
            str(e["index"]),
            "present",
            e["codec"],
            _layer_params(e),
            fmt_bytes(e["stored_bytes"]),
            f"{e['bits_per_value']:.2f}",
            err,
        )
    out.print(t)
    for w in m.get("warnings", []):
        out.print(f"warning: {w}")


def verify_cmd(bundle: BundleArg, json_out: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Recompute every tensor's sha256 and check shapes and dtypes against the manifest.

    Exits 0 when the bundle is intact, 5 naming the first bad tensor, 4 when it is not a bundle.

    Example:

        tolcli verify demo.safetensors && echo intact
    """
    out = Output(json=json_out, quiet=quiet)
    t0 = time.monotonic()
    try:
        with open_bundle(bundle) as b:
            prog = RichProgress(out)
            prog.start("verify", sum(v["bytes"] for v in b.manifest["tensors"].values()))
            try:
                nbytes = b.verify(progress=prog.advance)
            finally:
                prog.finish()
            n = len(b.tensor_names)
    except VerifyError as e:
        if json_out:
            out.emit_json({"path": str(bundle), "ok": False, "error": e.one_line()})
        raise
    if json_out:
        out.emit_json({"path": str(bundle), "ok": True, "tensors": n, "bytes": nbytes})
        return
    out.print(f"OK: {bundle}: {n} tensors, {fmt_bytes(nbytes)} verified in {time.monotonic() - t0:.1f}s")


def convert_cmd(
    src: Annotated[Path, typer.Argument(help="The bundle to read.")],
    dst: Annotated[Path, typer.Argument(help="The bundle to write; its suffix picks the container.")],
    fmt: FormatOpt = None,
    compression: CompressionOpt = None,
    max_shard_size: MaxShardOpt = None,
    force: ForceOpt = False,
    verify: VerifyOpt = False,
    sha256sums: Sha256sumsOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert a bundle between safetensors and HDF5, losslessly (same manifest, same tensor hashes).

    Example:

        tolcli convert tol.safetensors tol.h5

        tolcli convert tol.h5 tol.safetensors --sha256sums SHA256SUMS
    """
    out = Output(json=json_out, quiet=quiet)
    t0 = time.monotonic()
    path = convert_bundle(
        src,
        dst,
        container=fmt,
        compression=compression,
        force=force,
        max_shard_size=max_shard_size,
        verify_input=verify,
        progress=RichProgress(out),
    )
    if sha256sums:
        write_sha256sums(Path(sha256sums), [path])
    if json_out:
        out.emit_json({"input": str(src), "output": str(path), "bytes": path_bytes(path)})
        return
    _summary(out, path, "converted", time.monotonic() - t0)


def schema_cmd() -> None:
    """Print the JSON Schema of the bundle manifest (format version 1).

    Example:

        tolcli schema > manifest.schema.json
    """
    Output(json=True).emit_json(MANIFEST_SCHEMA)
