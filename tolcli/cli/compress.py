"""``tolcli compress``."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

import tolcli
from tolcli.bundle.summary import bundle_summary
from tolcli.choices import FITS, SCHEMES
from tolcli.cli._common import (
    AllowSourceMismatchOpt,
    BundleArg,
    CompressionOpt,
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
    VerifyOpt,
    apply_threads,
    checkpoint_from_cli,
    fmt_bytes,
    layers_present,
    note_to_stderr,
)
from tolcli.errors import UsageError
from tolcli.fsutil import check_sums_path, path_bytes, write_sha256sums

if TYPE_CHECKING:
    from tolcli.autoplan import AutoPlan
    from tolcli.checkpoint import Checkpoint
    from tolcli.compress import CompressResult

_SVD = "SVD"
_Q = "Quantisation"
_W = "Token weighting"


def compress_cmd(
    bundle: BundleArg,
    output: OutputOpt,
    scheme: Annotated[
        str | None,
        typer.Option(
            "--scheme",
            "-s",
            help=f"One of: {', '.join(SCHEMES)}, or auto (a codec per layer under --budget; or give --codec).",
        ),
    ] = None,
    codec: Annotated[
        str | None,
        typer.Option(
            "--codec",
            metavar="SPEC",
            help="A codec spec instead of --scheme and its options, e.g. 'int4(group=32,symmetric=true)' or "
            "'svd(budget=0.1,a=nf4(group=32))' (docs/compression.md).",
        ),
    ] = None,
    rank: Annotated[
        int | None, typer.Option("--rank", help="svd: the rank of every layer.", rich_help_panel=_SVD)
    ] = None,
    ratio: Annotated[
        float | None,
        typer.Option("--ratio", help="svd: target stored bytes as a fraction of dense fp16.", rich_help_panel=_SVD),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget",
            metavar="BYTES|FRACTION",
            help="adaptive-svd and auto: total bytes (12MB, 1.5GiB) or a fraction of dense fp16 (0.25).",
            rich_help_panel=_SVD,
        ),
    ] = None,
    candidates: Annotated[
        str | None,
        typer.Option(
            "--candidates",
            metavar="SPECS",
            help="auto: the codec specs to choose among, comma-separated (default: fp16, int8, int4, nf4, int3, "
            "int2, mixed at 1-6 bits, svd+int4 at ranks h/4 and h/2; 'rank=H/4' scales with the width).",
            rich_help_panel=_SVD,
        ),
    ] = None,
    validate: Annotated[
        Path | None,
        typer.Option(
            "--validate",
            metavar="DATA",
            help="auto: write the top plans, evaluate each on this text with the --sensitivity model, keep the one "
            "of least KL. Calibration text: never the text you evaluate on.",
            rich_help_panel=_SVD,
        ),
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option("--energy", help="adaptive-svd: keep this fraction of each layer's energy.", rich_help_panel=_SVD),
    ] = None,
    rank_multiple: Annotated[
        int, typer.Option("--rank-multiple", help="Ranks are multiples of this.", rich_help_panel=_SVD)
    ] = 8,
    min_rank: Annotated[
        int | None, typer.Option("--min-rank", help="Smallest rank per layer.", rich_help_panel=_SVD)
    ] = None,
    max_rank: Annotated[
        int | None, typer.Option("--max-rank", help="Largest rank per layer.", rich_help_panel=_SVD)
    ] = None,
    svd_method: Annotated[
        str, typer.Option("--svd-method", help="exact (Gram eigendecomposition) or randomized.", rich_help_panel=_SVD)
    ] = "exact",
    svd_gram: Annotated[
        str | None,
        typer.Option(
            "--svd-gram", help="exact: the Gram's products in fp32 (fast, default) or fp64.", rich_help_panel=_SVD
        ),
    ] = None,
    oversample: Annotated[
        int, typer.Option("--oversample", help="randomized: extra columns.", rich_help_panel=_SVD)
    ] = 10,
    power_iters: Annotated[
        int, typer.Option("--power-iters", help="randomized: power iterations.", rich_help_panel=_SVD)
    ] = 2,
    seed: Annotated[int, typer.Option("--seed", help="randomized: random seed.", rich_help_panel=_SVD)] = 0,
    factor_dtype: Annotated[
        str,
        typer.Option(
            "--factor-dtype", help="svd: dtype of an unquantised A factor (fp16, bf16, fp32).", rich_help_panel=_SVD
        ),
    ] = "fp16",
    group_size: Annotated[
        int | None,
        typer.Option(
            "--group-size",
            help="Values per scale: int4/nf4/int3/int2 32, 64 (default) or 128; int8 default: a "
            "whole row; the A factor of svd+int4/nf4: 32.",
            rich_help_panel=_Q,
        ),
    ] = None,
    symmetric: Annotated[
        bool, typer.Option("--symmetric", help="int4: symmetric codes, no offsets.", rich_help_panel=_Q)
    ] = False,
    fit: Annotated[
        str | None,
        typer.Option(
            "--fit",
            help=f"How each group's scale is fitted: {' or '.join(FITS)} (default {FITS[0]}: a clipping search plus "
            "least squares; minmax: the group's range, as before).",
            rich_help_panel=_Q,
        ),
    ] = None,
    center: Annotated[
        bool,
        typer.Option(
            "--center",
            help="int4/nf4/int8/int3/int2: code each row minus the layer's mean row (stored once, added back "
            "when decoding).",
            rich_help_panel=_Q,
        ),
    ] = False,
    token_weights: Annotated[
        str | None,
        typer.Option(
            "--token-weights", metavar="FILE.npy", help="Counts per token id: weight the SVD error.", rich_help_panel=_W
        ),
    ] = None,
    calibration: Annotated[
        str | None,
        typer.Option(
            "--calibration",
            metavar="TEXT",
            help="Text counted with the bundle's tokenizer for weights.",
            rich_help_panel=_W,
        ),
    ] = None,
    sensitivity: Annotated[
        str | None,
        typer.Option(
            "--sensitivity",
            metavar="CHECKPOINT",
            help="With --calibration: weight each layer's errors by the loss's sensitivity (needs the model the "
            "bundle was computed from).",
            rich_help_panel=_W,
        ),
    ] = None,
    tensor_map: TensorMapOpt = None,
    revision: RevisionOpt = None,
    allow_source_mismatch: AllowSourceMismatchOpt = False,
    weight_floor: Annotated[
        float,
        typer.Option("--weight-floor", help="Added to every count, so unseen tokens still count.", rich_help_panel=_W),
    ] = 1.0,
    error_feedback: Annotated[
        bool,
        typer.Option(
            "--error-feedback",
            help="Code each layer with the coding error the layers before it left, so that the residual stream "
            "carries one layer's error instead of the sum of all (about 3x lower KL at the same bytes; each "
            "layer's own table is then off by two errors: for running the model, not for reading one layer).",
        ),
    ] = False,
    fmt: FormatOpt = None,
    compression: CompressionOpt = None,
    max_shard_size: MaxShardOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of the same job.")] = False,
    force: ForceOpt = False,
    verify: VerifyOpt = False,
    sha256sums: Sha256sumsOpt = None,
    batch_tokens: Annotated[
        int | None,
        typer.Option(
            "--batch-tokens",
            help="Vocabulary rows read and encoded at a time (default: about 8 MiB of fp32 rows); lower it to use "
            "less memory.",
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            "--device",
            help="Where the --sensitivity passes run: cpu (the default: bytes independent of the "
            "machine), auto, cuda or cuda:N.",
            rich_help_panel=_W,
        ),
    ] = "cpu",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compress a bundle: casts, int4/nf4/int8, uniform or adaptive-rank SVD, and combinations.

    Example:

        tolcli compress dense.safetensors -o int4.safetensors --scheme int4 --group-size 64

        tolcli compress dense.safetensors -o svd.h5 --scheme svd --ratio 0.25

        tolcli compress dense.safetensors -o ad.h5 -s adaptive-svd+int4 --budget 0.1 --calibration text.txt

        tolcli compress dense.safetensors -o ad.h5 --codec 'svd(budget=0.1,a=int4(group=32))'

        tolcli compress dense.safetensors -o auto.h5 --scheme auto --budget 0.1875 --calibration text.txt

        tolcli compress dense.h5 -o a.h5 -s auto --budget 0.2 --sensitivity demo --calibration c.txt --validate c.txt

        tolcli compress dense.h5 -o x.h5 --codec 'svd(budget=0.15625,cross_layer=true,residual=mixed(bits=1.5))'

        tolcli compress dense.h5 -o m.h5 --codec 'mixed(bits=2.5)' --error-feedback --calibration c.txt
    """
    apply_threads(threads)
    out = Output(
        json=json_out,
        quiet=quiet,
        command="compress",
        inputs=[bundle, sensitivity, token_weights, calibration, validate],
        output=output,
    )
    if sha256sums:
        check_sums_path(sha256sums, output, bundle)
    with _open_sensitivity(sensitivity, tensor_map, revision) as sens:
        opts = tolcli.CompressOptions(
            scheme=scheme,
            rank=rank,
            ratio=ratio,
            budget=budget,
            energy=energy,
            rank_multiple=rank_multiple,
            min_rank=min_rank,
            max_rank=max_rank,
            svd_method=svd_method,
            svd_gram=svd_gram,
            oversample=oversample,
            power_iters=power_iters,
            seed=seed,
            group_size=group_size,
            symmetric=symmetric,
            fit=fit,
            center=center,
            factor_dtype=factor_dtype,
            token_weights=token_weights,
            calibration=calibration,
            sensitivity=sens,
            weight_floor=weight_floor,
            codec=codec,
            allow_source_mismatch=allow_source_mismatch,
            candidates=candidates,
            validate=None if validate is None else str(validate),
            error_feedback=error_feedback,
        )
        res = tolcli.compress(
            bundle,
            output,
            opts,
            container=fmt,
            force=force,
            resume=resume,
            compression=compression,
            max_shard_size=max_shard_size,
            verify_input=verify,
            batch_rows=batch_tokens,
            device=device,
            progress=RichProgress(out),
            note=note_to_stderr(out),
        )
    if sha256sums:
        write_sha256sums(Path(sha256sums), [res.path])
    _report(out, res, scheme or codec or "")


def _open_sensitivity(
    arg: str | None, tensor_map: str | None, revision: str | None
) -> AbstractContextManager[Checkpoint | None]:
    """The ``--sensitivity`` checkpoint, opened with ``--tensor-map`` and ``--revision`` (which need it)."""
    if arg is None:
        if tensor_map is not None or revision is not None:
            raise UsageError("`tensor_map` and `revision` apply to the `sensitivity` checkpoint, which is not given")
        return nullcontext()
    return checkpoint_from_cli(arg, tensor_map=tensor_map, revision=revision)


def _report(out: Output, res: CompressResult, what: str) -> None:
    """Print what compress wrote: one JSON document, or the ranks and one summary line."""
    present = [e for e in res.manifest["layers"] if e["status"] == "present"]
    summary = bundle_summary(res.manifest)
    if out.json:
        out.emit_doc(
            {
                "bytes": path_bytes(res.path),
                "layers_present": layers_present(res.manifest),
                "stored_bytes": summary["stored_bytes"],
                "fraction_of_dense_fp16": summary["fraction_of_dense_fp16"],
                "ranks": {str(k): v for k, v in res.ranks.items()},
                "rel_error": {str(e["index"]): e["rel_error"] for e in present},
                "plan": None if res.plan is None else res.plan.as_json(),
                "manifest": res.manifest,
            },
            output=res.path,
        )
        return
    if res.plan is not None:
        out.print(_plan_table(res.plan))
        if res.plan.validation is not None:
            out.print(_validation_table(res.plan))
    elif res.ranks:
        out.print("ranks: " + ", ".join(f"{k}:{v}" for k, v in sorted(res.ranks.items())))
    worst = max((e["rel_error"] for e in present), default=0.0)
    out.print(
        f"wrote {res.path} ({fmt_bytes(path_bytes(res.path))}; {what}: {fmt_bytes(res.stored_bytes)} = "
        f"{100 * summary['fraction_of_dense_fp16']:.1f}% of dense fp16, worst layer error {worst:.2e}) "
        f"in {res.seconds:.1f}s"
    )


def _plan_table(plan: AutoPlan) -> Table:
    """Scheme auto's choice per layer."""
    t = Table(
        "layer",
        "codec",
        "stored",
        "weighted sq. error",
        "candidates",
        title=f"auto: {fmt_bytes(plan.stored_bytes)} of a {fmt_bytes(plan.budget_bytes)} budget",
        title_justify="left",
    )
    for i, c in sorted(plan.chosen.items()):
        t.add_row(str(i), c.spec, fmt_bytes(c.stored_bytes), f"{c.error:.4g}", str(len(plan.measured[i])))
    return t


def _validation_table(plan: AutoPlan) -> Table:
    """The plans --validate evaluated, and which was kept."""
    t = Table(
        "plan",
        "stored",
        "weighted sq. error",
        "mean KL",
        "ppl change",
        "",
        title="--validate: plans evaluated on the validation text",
        title_justify="left",
    )
    for v in plan.validation or ():
        kept = "kept" if v.chosen == plan.chosen else ""
        t.add_row(
            v.label, fmt_bytes(v.stored_bytes), f"{v.error:.4g}", f"{v.mean_kl:.3g}", f"{v.ppl_change_pct:+.2f}%", kept
        )
    return t
