"""``tolcli inspect``, ``verify``, ``convert``, ``drop`` and ``schema``: bundles in, bundles or reports out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

import tolcli
from tolcli._lazy import lazy_import
from tolcli.bundle import codestats
from tolcli.bundle.summary import bundle_summary
from tolcli.cli import jsondoc
from tolcli.cli._common import (
    BundleArg,
    CompressionOpt,
    DropLastOpt,
    ForceOpt,
    FormatOpt,
    JsonOpt,
    KeepLayersOpt,
    MaxShardOpt,
    Output,
    OutputOpt,
    QuietOpt,
    RichProgress,
    Sha256sumsOpt,
    VerifyOpt,
    fmt_bytes,
    layers_present,
    print_written,
)
from tolcli.errors import UsageError
from tolcli.fsutil import check_sums_path, path_bytes, write_sha256sums

plots = lazy_import("tolcli.plots")


def _layer_params(e: dict[str, Any]) -> str:
    """A layer's params for the table: ``key=value``, a nested codec (an svd's ``a``, ``b``, ``residual``) as
    ``codec(key=value, ...)`` and a mixed codec's class list by its length (``--json`` has them all)."""
    return _params_text(e.get("params", {}))


def _params_text(params: dict[str, Any]) -> str:
    parts = []
    for k, v in sorted(params.items()):
        if isinstance(v, dict) and set(v) == {"codec", "params"} and isinstance(v["params"], dict):
            v = f"{v['codec']}({_params_text(v['params'])})"
        elif k == "classes" and isinstance(v, list):
            v = f"[{len(v)} classes]"
        parts.append(f"{k}={v}")
    return ", ".join(parts)


def inspect_cmd(
    bundle: BundleArg,
    plot: Annotated[
        Path | None, typer.Option("--plot", metavar="FILE.png", help="Also draw bytes, rank/bits and error per layer.")
    ] = None,
    entropy: Annotated[
        bool,
        typer.Option(
            "--entropy",
            help="Also read every layer's codes: their entropy per code against the bits stored, and the layer's "
            "zstd size.",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Show a bundle's manifest: model, vocabulary, and per layer the codec, bytes and error.

    Example:

        tolcli inspect demo.safetensors --plot layers.png

        tolcli inspect int4.safetensors --entropy

        tolcli inspect tol.h5 --json | jq '.manifest.layers[] | {index, codec, stored_bytes}'
    """
    out = Output(json=json_out, command="inspect", inputs=[bundle])
    stats = None
    with tolcli.open_bundle(bundle) as b:
        m = b.manifest
        container = b.container
        if entropy:
            total = codestats.bytes_to_read(b)
            prog = RichProgress(out)
            prog.start("entropy", total)
            try:
                stats = codestats.code_statistics(b, progress=prog.advance)
            finally:
                prog.finish()
    if plot is not None:
        codecs = ", ".join(sorted({e["codec"] for e in m["layers"] if e["status"] == "present"}))
        plots.layer_figure(m, plot, f"{bundle.name}: {codecs}, {m['model']['num_layers']} layers")
    present = layers_present(m)
    summary = {"container": container, "file_bytes": path_bytes(bundle), **bundle_summary(m), "layers_present": present}
    if json_out:
        doc = {"path": str(bundle), "layers_present": present, "summary": summary, "manifest": m}
        out.emit_doc({**doc, "code_statistics": None if stats is None else [st.as_json() for st in stats]})
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
    head.add_row("layers", f"{len(present)} present, {summary['layers_dropped']} dropped")
    head.add_row(
        "stored",
        f"{fmt_bytes(summary['stored_bytes'])} = {100 * summary['fraction_of_dense_fp16']:.1f}% of dense fp16 "
        f"({fmt_bytes(summary['dense_fp16_bytes'])}); file {fmt_bytes(summary['file_bytes'])}",
    )
    if summary["error_feedback"]:
        head.add_row(
            "coded",
            "with error feedback (each partial sum off by one layer's error; rel. error: each table's own)",
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
    if stats is not None:
        out.print(_code_table(stats))
    for w in m.get("warnings", []):
        out.print(f"warning: {w}")


def _code_table(stats: list[codestats.LayerCodeStats]) -> Table:
    t = Table(
        "layer",
        "codec",
        "codes",
        "stored bits/code",
        "entropy bits/code",
        "entropy-coded",
        "zstd",
        title="Codes (order-0 entropy; zstd level 3 of every stored byte)",
        title_justify="left",
    )
    for st in stats:
        ratio = st.stored_bytes / st.zstd_bytes if st.zstd_bytes else 0.0
        has = st.codes > 0
        t.add_row(
            str(st.index),
            st.codec,
            f"{st.codes:,}",
            f"{st.stored_bits_per_code:.2f}" if has else "-",
            f"{st.entropy_bits_per_code:.3f}" if has else "-",
            f"{fmt_bytes(st.entropy_coded_bytes)} (x{st.stored_bytes / max(1, st.entropy_coded_bytes):.2f})",
            f"{fmt_bytes(st.zstd_bytes)} (x{ratio:.2f})",
        )
    return t


def verify_cmd(bundle: BundleArg, json_out: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Recompute every tensor's sha256 and check shapes and dtypes against the manifest.

    Exits 0 when the bundle is intact, 5 naming the first bad tensor, 4 when it is not a bundle.

    Example:

        tolcli verify demo.safetensors && echo intact
    """
    out = Output(json=json_out, quiet=quiet, command="verify", inputs=[bundle])
    t0 = time.monotonic()
    with tolcli.open_bundle(bundle) as b:
        prog = RichProgress(out)
        prog.start("verify", sum(v["bytes"] for v in b.manifest["tensors"].values()))
        try:
            nbytes = b.verify(progress=prog.advance)
        finally:
            prog.finish()
        n = len(b.tensor_names)
        present = layers_present(b.manifest)
    if json_out:  # a failure is an error document (ok: false) from tolcli.cli.main
        out.emit_doc({"path": str(bundle), "layers_present": present, "tensors": n, "bytes": nbytes})
        return
    out.print(f"OK: {bundle}: {n} tensors, {fmt_bytes(nbytes)} verified in {time.monotonic() - t0:.1f}s")


def convert_cmd(
    src: Annotated[Path, typer.Argument(help="The bundle to read.")],
    dst_arg: Annotated[
        Path | None, typer.Argument(metavar="[OUT]", help="Same as -o (the older spelling).", show_default=False)
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="OUT", help="The bundle to write; its suffix picks the container."),
    ] = None,
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

        tolcli convert tol.safetensors -o tol.h5

        tolcli convert tol.h5 -o tol.safetensors --sha256sums SHA256SUMS
    """
    if (dst_arg is None) == (output is None):
        raise UsageError("give the output once: -o OUT (or the older positional OUT)")
    dst: Path = output if output is not None else dst_arg  # type: ignore[assignment]
    out = Output(json=json_out, quiet=quiet, command="convert", inputs=[src], output=dst)
    if sha256sums:
        check_sums_path(sha256sums, dst, src)
    t0 = time.monotonic()
    path = tolcli.convert_bundle(
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
        out.emit_doc({"bytes": path_bytes(path)}, output=path)
        return
    print_written(out, path, "converted", time.monotonic() - t0)


def drop_cmd(
    bundle: BundleArg,
    output: OutputOpt,
    drop_last: DropLastOpt = None,
    keep_layers: KeepLayersOpt = None,
    fmt: FormatOpt = None,
    max_shard_size: MaxShardOpt = None,
    force: ForceOpt = False,
    verify: VerifyOpt = False,
    sha256sums: Sha256sumsOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a bundle without some layers; the manifest keeps every original index, marked dropped.

    Example:

        tolcli drop tol.safetensors -o tol-18.safetensors --drop-last 6

        tolcli drop tol.h5 -o some.h5 --layers 0-3,8
    """
    out = Output(json=json_out, quiet=quiet, command="drop", inputs=[bundle], output=output)
    t0 = time.monotonic()
    if sha256sums:
        check_sums_path(sha256sums, output, bundle)
    path, manifest = tolcli.drop_layers(
        bundle,
        output,
        drop_last=drop_last,
        keep_layers=keep_layers,
        container=fmt,
        force=force,
        max_shard_size=max_shard_size,
        verify_input=verify,
    )
    kept = layers_present(manifest)
    if sha256sums:
        write_sha256sums(Path(sha256sums), [path])
    if json_out:
        out.emit_doc({"bytes": path_bytes(path), "layers_present": kept}, output=path)
        return
    out.print(
        f"wrote {path} ({fmt_bytes(path_bytes(path))}; {len(kept)} of {len(manifest['layers'])} layers) "
        f"in {time.monotonic() - t0:.1f}s"
    )


def schema_cmd(
    name: Annotated[
        str,
        typer.Argument(
            metavar="[NAME]",
            help="manifest (the default), error, or a command whose --json document to describe (see --list).",
            show_default=False,
        ),
    ] = "manifest",
    list_names: Annotated[bool, typer.Option("--list", help="List the schemas NAME can be.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Print a JSON Schema (draft 2020-12): a bundle's manifest (format version 1) by default, or the --json
    document of a command or of an error (docs/json-output.md).

    Example:

        tolcli schema > manifest.schema.json

        tolcli schema eval-ppl > eval-ppl.schema.json

        tolcli schema --list
    """
    out = Output(json=json_out, command="schema")
    if list_names:
        if json_out:
            out.emit_doc({"schemas": list(jsondoc.SCHEMA_NAMES)})
        else:
            typer.echo("\n".join(jsondoc.SCHEMA_NAMES))
        return
    if name not in jsondoc.SCHEMA_NAMES:
        raise UsageError(f"no schema named {name!r}; one of: {', '.join(jsondoc.SCHEMA_NAMES)}")
    out.emit_json(jsondoc.document_schema(name))
