"""``tolcli eval-ppl`` and ``sweep``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

import tolcli
from tolcli.choices import SWEEP_FAMILIES
from tolcli.cli._common import (
    CheckpointArg,
    DeviceOpt,
    DropLastOpt,
    ForceOpt,
    JsonOpt,
    KeepLayersOpt,
    Output,
    QuietOpt,
    RichProgress,
    VerifyOpt,
    fmt_bytes,
    note_to_stderr,
    parse_ints,
)
from tolcli.demo import resolve_checkpoint_arg
from tolcli.errors import QualityGateError

if TYPE_CHECKING:
    from tolcli.evaluation import EvalReport


def _print_report(out: Output, report: EvalReport) -> None:
    p = report.protocol
    t = Table(
        "variant",
        "ppl",
        "change",
        "mean NLL",
        "KL vs ref",
        "top-1 agree",
        "bytes",
        title=f"{p['model']}: {p['tokens_scored']:,} tokens, ctx {p['ctx']}, stride {p['stride']} "
        f"(reference: {p['reference']})",
        title_justify="left",
    )
    for v in report.variants:
        change = "" if v is report.variants[0] else f"{v['ppl_change']:+.3f} ({v['ppl_change_pct']:+.2f}%)"
        kl = "" if v is report.variants[0] else f"{v['mean_kl']:.2e}"
        agree = "" if v is report.variants[0] else f"{100 * v['top1_agreement']:.2f}%"
        t.add_row(
            v["name"],
            f"{v['ppl']:.3f}",
            change,
            f"{v['mean_nll']:.4f}",
            kl,
            agree,
            fmt_bytes(v["bytes"]) if v.get("bytes") else "",
        )
    out.print(t)


def eval_ppl_cmd(
    checkpoint: CheckpointArg,
    data: Annotated[
        list[Path], typer.Option("--data", help="Text (.txt, .jsonl with 'text') or token ids (.npy); repeatable.")
    ],
    tol: Annotated[list[Path] | None, typer.Option("--tol", help="A ToL bundle to evaluate; repeatable.")] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Tokens per window.")] = 512,
    stride: Annotated[int | None, typer.Option("--stride", help="Window step (default: --ctx).")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Use the first N tokens of each file.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 4,
    device: DeviceOpt = "auto",
    drop_last: DropLastOpt = None,
    keep_layers: KeepLayersOpt = None,
    tokenizer: Annotated[
        Path | None, typer.Option("--tokenizer", metavar="tokenizer.json", help="Tokenise text with this tokenizer.")
    ] = None,
    allow_tokenizer_mismatch: Annotated[
        bool, typer.Option("--allow-tokenizer-mismatch", help="Evaluate although a bundle's tokenizer hash differs.")
    ] = False,
    verify: VerifyOpt = False,
    max_increase: Annotated[
        float | None,
        typer.Option(
            "--max-increase",
            metavar="PCT",
            help="Quality gate: exit 3 if a variant's perplexity rises more (or is NaN).",
        ),
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity with the model's own FFNs and with any bundles, on the same tokens, side by side.

    Reports per variant: perplexity, mean NLL, change vs the reference, mean KL(reference || variant) per
    token, and top-1 agreement. Exit code 3 when --max-increase is exceeded.

    Example:

        tolcli eval-ppl demo --data tolcli/demo/heldout.txt --tol int4.safetensors --tol svd.h5

        tolcli eval-ppl ./stripped --data wiki.txt --tol tol.safetensors --max-increase 1 --json
    """
    out = Output(json=json_out, quiet=quiet)
    try:
        report = tolcli.eval_ppl(
            resolve_checkpoint_arg(checkpoint),
            data,
            tols=tol or [],
            ctx=ctx,
            stride=stride,
            max_tokens=max_tokens,
            batch_size=batch_size,
            device=device,
            drop_last=drop_last,
            keep_layers=keep_layers,
            tokenizer=tokenizer,
            allow_tokenizer_mismatch=allow_tokenizer_mismatch,
            verify_input=verify,
            max_increase=max_increase,
            progress=RichProgress(out),
            note=note_to_stderr(out),
        )
    except QualityGateError as e:
        _emit(out, e.report, json_out)  # type: ignore[attr-defined]
        raise
    _emit(out, report, json_out)


def _emit(out: Output, report: EvalReport, json_out: bool) -> None:
    if json_out:
        out.emit_json(report.to_json())
    else:
        _print_report(out, report)


def sweep_cmd(
    checkpoint: CheckpointArg,
    data: Annotated[list[Path], typer.Option("--data", help="Evaluation text or token ids; repeatable.")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="DIR", help="Where bundles and results go.")],
    schemes: Annotated[
        str, typer.Option("--schemes", help=f"Comma-separated families: {','.join(SWEEP_FAMILIES)}.")
    ] = ",".join(SWEEP_FAMILIES),
    ranks: Annotated[
        str | None, typer.Option("--ranks", metavar="R,R,...", help="Uniform SVD ranks (default h/16,h/8,h/4,h/2).")
    ] = None,
    calibration: Annotated[
        str | None, typer.Option("--calibration", metavar="TEXT", help="Add loss-weighted SVD variants.")
    ] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Tokens per window.")] = 512,
    stride: Annotated[int | None, typer.Option("--stride", help="Window step (default: --ctx).")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Use the first N tokens of each file.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 4,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Build and evaluate a grid of compressions and layer drops; write results.json/.csv and plots.

    Example:

        tolcli sweep demo --data tolcli/demo/heldout.txt -o sweep/ --ctx 128 --stride 64

        tolcli sweep ./my-memoryllm --data wiki.txt -o sweep/ --schemes svd,adaptive-svd --ranks 256,512
    """
    out = Output(json=json_out, quiet=quiet)
    opts = tolcli.SweepOptions(
        families=[f.strip() for f in schemes.split(",") if f.strip()],
        ranks=parse_ints(ranks, "--ranks") if ranks else None,
        calibration=calibration,
        ctx=ctx,
        stride=stride,
        max_tokens=max_tokens,
        batch_size=batch_size,
        device=device,
    )
    res = tolcli.sweep(
        resolve_checkpoint_arg(checkpoint),
        data,
        output,
        opts,
        force=force,
        progress=RichProgress(out),
        note=note_to_stderr(out),
    )
    if json_out:
        out.emit_json(
            {
                "directory": str(res.directory),
                "rows": res.rows,
                "protocol": res.protocol,
                "plots": [str(p) for p in res.plots],
            }
        )
        return
    t = Table(
        "variant",
        "family",
        "bytes / fp16",
        "rel. error",
        "ppl",
        "change",
        "KL",
        "top-1",
        title=f"sweep: {res.protocol['model']}, {res.protocol['tokens_scored']:,} tokens",
        title_justify="left",
    )
    for r in res.rows:
        frac = "" if r["fraction_of_dense_fp16"] is None else f"{r['fraction_of_dense_fp16']:.3f}"
        err = "" if r["mean_rel_error"] is None else f"{r['mean_rel_error']:.3f}"
        t.add_row(
            r["name"],
            r["family"],
            frac,
            err,
            f"{r['ppl']:.3f}",
            f"{r['ppl_change_pct']:+.2f}%",
            f"{r['mean_kl']:.2e}",
            f"{100 * r['top1_agreement']:.1f}%",
        )
    out.print(t)
    out.print(
        f"wrote {res.directory}/results.json, results.csv"
        + "".join(f", {p.name}" for p in res.plots)
        + f" in {res.seconds:.1f}s"
    )
