"""``tolcli eval-ppl`` and ``sweep``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

import tolcli
from tolcli.choices import DOC_SEPARATORS, PROTOCOLS, SWEEP_BITS, SWEEP_FAMILIES
from tolcli.cli._common import (
    AllowSourceMismatchOpt,
    CheckpointArg,
    DeviceOpt,
    DropLastOpt,
    ForceOpt,
    JsonOpt,
    KeepLayersOpt,
    Output,
    QuietOpt,
    RevisionOpt,
    RichProgress,
    TensorMapOpt,
    ThreadsOpt,
    VerifyOpt,
    apply_threads,
    checkpoint_from_cli,
    fmt_bytes,
    note_to_stderr,
    parse_floats,
    parse_ints,
)
from tolcli.errors import QualityGateError

if TYPE_CHECKING:
    from tolcli.evaluation import EvalReport
    from tolcli.sweep import SweepResult


def _pm(value: float | None, err: float | None, fmt: str) -> str:
    """``value ± err`` (the error left out when it is not a number)."""
    if value is None:
        return ""
    text = format(value, fmt)
    return text if err is None or err != err else f"{text} ± {format(err, fmt)}"


def _print_report(out: Output, report: EvalReport) -> None:
    p = report.protocol
    c = f"{100 * p['confidence']:g}%"
    t = Table(
        "variant",
        "ppl",
        f"change ({c} interval)",
        "bits/byte",
        "KL vs ref (mean)",
        "KL p99 / max",
        "top-1 agree",
        "bytes",
        title=f"{p['model']}: {p['tokens_scored']:,} tokens, protocol {p['protocol']}, ctx {p['ctx']}, "
        f"stride {p['stride']} (reference: {p['reference']})",
        title_justify="left",
    )
    for v in report.variants:
        first = v is report.variants[0]
        change = ""
        if not first:
            lo, hi = v["ppl_change_pct_ci"]
            change = f"{v['ppl_change_pct']:+.2f}% ({lo:+.2f}, {hi:+.2f})"
        t.add_row(
            v["name"],
            _pm(v["ppl"], v["ppl_stderr"], ".3f"),
            change,
            "" if v["bits_per_byte"] is None else f"{v['bits_per_byte']:.4f}",
            "" if first else _pm(v["kl"]["mean"], v["kl"]["stderr"], ".2e"),
            "" if first else f"{v['kl']['p99']:.2e} / {v['kl']['max']:.2e}",
            "" if first else _pm(100 * v["top1_agreement"], 100 * v["top1_agreement_stderr"], ".2f") + "%",
            fmt_bytes(v["bytes"]) if v.get("bytes") else "",
        )
    out.print(t)


ProtocolOpt = Annotated[
    str,
    typer.Option(
        "--protocol",
        help=f"Which tokens are scored, with which context: {', '.join(PROTOCOLS)} (docs/evaluation.md).",
    ),
]
TextFieldOpt = Annotated[
    str, typer.Option("--text-field", metavar="NAME", help="The text field of .jsonl/.json/.parquet/datasets records.")
]
DocSepOpt = Annotated[
    str,
    typer.Option(
        "--doc-sep", help=f"Between two documents of a file: {', '.join(DOC_SEPARATORS)} (lm-eval-rolling: separate)."
    ),
]
MaxIncreaseOpt = Annotated[
    float | None,
    typer.Option(
        "--max-increase",
        metavar="PCT",
        help="Quality gate: exit 3 if a variant's perplexity rises more (or is NaN).",
    ),
]
GateSignificantOpt = Annotated[
    bool,
    typer.Option(
        "--gate-significant", help="Fail the gate only when the whole --confidence interval exceeds the limit."
    ),
]
DATA_HELP = "Text (.txt .raw .md, .json/.jsonl records, .parquet, .gz/.zst of text) or token ids (.npy); repeatable."


def eval_ppl_cmd(
    checkpoint: CheckpointArg,
    data: Annotated[list[Path], typer.Option("--data", help=DATA_HELP)],
    tol: Annotated[list[Path] | None, typer.Option("--tol", help="A ToL bundle to evaluate; repeatable.")] = None,
    protocol: ProtocolOpt = "tolcli",
    ctx: Annotated[
        int | None, typer.Option("--ctx", help="Tokens per window (default: min(512, max_position_embeddings)).")
    ] = None,
    stride: Annotated[int | None, typer.Option("--stride", help="Window step (default: --ctx).")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Use the first N tokens of each file.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 4,
    device: DeviceOpt = "auto",
    drop_last: DropLastOpt = None,
    keep_layers: KeepLayersOpt = None,
    tokenizer: Annotated[
        Path | None, typer.Option("--tokenizer", metavar="tokenizer.json", help="Tokenise text with this tokenizer.")
    ] = None,
    text_field: TextFieldOpt = "text",
    doc_sep: DocSepOpt = "eos",
    allow_tokenizer_mismatch: Annotated[
        bool, typer.Option("--allow-tokenizer-mismatch", help="Evaluate although a bundle's tokenizer hash differs.")
    ] = False,
    allow_source_mismatch: AllowSourceMismatchOpt = False,
    verify: VerifyOpt = False,
    max_increase: MaxIncreaseOpt = None,
    gate_significant: GateSignificantOpt = False,
    confidence: Annotated[
        float, typer.Option("--confidence", metavar="C", help="Level of the reported intervals (two-sided).")
    ] = 0.95,
    save_reference: Annotated[
        Path | None,
        typer.Option("--save-reference", metavar="FILE", help="Store the reference's log-probabilities for reuse."),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference", metavar="FILE", help="Compare against a stored reference instead of the model's FFNs."
        ),
    ] = None,
    reference_top_k: Annotated[
        int, typer.Option("--reference-top-k", metavar="K", help="Top tokens per position --save-reference keeps.")
    ] = 64,
    tensor_map: TensorMapOpt = None,
    revision: RevisionOpt = None,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity with the model's own FFNs and with any bundles, on the same tokens, side by side.

    Reports per variant: perplexity ± standard error, the change vs the reference with a paired interval,
    bits per byte (and word/byte perplexity in --json), KL(reference || variant) per token (mean ± error, 99th
    percentile, max) and top-1 agreement. Exit code 3 when --max-increase is exceeded.

    Example:

        tolcli eval-ppl demo --data tolcli/demo/heldout.txt --tol int4.safetensors --tol svd.h5

        tolcli eval-ppl demo --data wiki.test.raw --protocol lm-eval-rolling --ctx 512

        tolcli eval-ppl demo --data heldout.txt --save-reference ref.safetensors --ctx 128

        tolcli eval-ppl ./stripped --data wiki.txt --tol tol.safetensors --max-increase 1 --gate-significant --json
    """
    apply_threads(threads)
    inputs = [checkpoint, *data, *(tol or []), reference, tokenizer]
    out = Output(json=json_out, quiet=quiet, command="eval-ppl", inputs=inputs, output=save_reference)
    gate = Gate(max_increase, gate_significant)
    try:
        report = tolcli.eval_ppl(
            checkpoint_from_cli(checkpoint, tensor_map=tensor_map, revision=revision),
            data,
            tols=tol or [],
            protocol=protocol,
            ctx=ctx,
            stride=stride,
            max_tokens=max_tokens,
            batch_size=batch_size,
            device=device,
            drop_last=drop_last,
            keep_layers=keep_layers,
            tokenizer=tokenizer,
            text_field=text_field,
            doc_sep=doc_sep,
            allow_tokenizer_mismatch=allow_tokenizer_mismatch,
            allow_source_mismatch=allow_source_mismatch,
            verify_input=verify,
            max_increase=max_increase,
            gate_significant=gate_significant,
            confidence=confidence,
            save_reference=save_reference,
            reference=reference,
            reference_top_k=reference_top_k,
            progress=RichProgress(out),
            note=note_to_stderr(out),
        )
    except QualityGateError as e:
        _emit(out, e.report, gate, e)  # type: ignore[attr-defined]
        raise
    _emit(out, report, gate)


@dataclass(frozen=True)
class Gate:
    """The quality gate a command was given (``--max-increase``, ``--gate-significant``)."""

    max_increase: float | None
    significant: bool

    def failed(self, report: EvalReport) -> list[str]:
        """Names of the variants that fail it (none when no gate is set)."""
        if self.max_increase is None:
            return []
        return [v["name"] for v in report.gate(self.max_increase, significant=self.significant)]

    def verdict_line(self, report: EvalReport) -> str | None:
        """``gate: pass (every variant within +1%)`` or ``gate: FAIL (...)``; None without a gate."""
        if self.max_increase is None:
            return None
        how = "the whole interval above" if self.significant else "above"
        failed = self.failed(report)
        if not failed:
            return f"gate: pass (no variant's perplexity change {how} +{self.max_increase:g}%)"
        return f"gate: FAIL ({len(failed)} variant(s) {how} +{self.max_increase:g}% or not finite: {', '.join(failed)})"

    def to_json(self, report: EvalReport) -> dict[str, Any]:
        """The ``gate`` member of eval-ppl's and sweep's documents: threshold, verdict and failing variants."""
        failed = self.failed(report)
        verdict = None if self.max_increase is None else ("fail" if failed else "pass")
        return {
            "max_increase_pct": self.max_increase,
            "significant": self.significant,
            "verdict": verdict,
            "failed": failed,
        }


def _emit(out: Output, report: EvalReport, gate: Gate, error: QualityGateError | None = None) -> None:
    if out.json:
        doc = report.to_json()
        del doc["seconds"]  # the envelope's
        out.emit_doc({**doc, "gate": gate.to_json(report)}, error=error)
    else:
        _print_report(out, report)
        if (line := gate.verdict_line(report)) is not None:
            out.print(line)


def sweep_cmd(
    checkpoint: CheckpointArg,
    data: Annotated[list[Path], typer.Option("--data", help=DATA_HELP)],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="DIR", help="Where bundles and results go.")],
    schemes: Annotated[
        str,
        typer.Option(
            "--schemes",
            metavar="ITEM,ITEM,...",
            help="What to build and evaluate, comma-separated: families or any compress scheme (svd, int4, drop, "
            "fp16, svd+nf4, adaptive-svd+int8, ...), codec specs ('int4(group=32)'), existing bundles (paths).",
        ),
    ] = ",".join(SWEEP_FAMILIES),
    ranks: Annotated[
        str | None, typer.Option("--ranks", metavar="R,R,...", help="Uniform SVD ranks (default h/16,h/8,h/4,h/2).")
    ] = None,
    bits: Annotated[
        str | None,
        typer.Option(
            "--bits",
            metavar="B,B,...",
            help="Bits per value of the mixed, auto and cross-svd families' bundles (default 1.6,2,2.5,3,4).",
        ),
    ] = None,
    calibration: Annotated[
        str | None,
        typer.Option(
            "--calibration",
            metavar="TEXT",
            help="Add loss-weighted SVD variants; weight mixed, auto and cross-svd by loss sensitivity on this text.",
        ),
    ] = None,
    error_feedback: Annotated[
        bool,
        typer.Option(
            "--error-feedback",
            help="Also build each mixed, auto and cross-svd bundle with compress --error-feedback (named ...-fb).",
        ),
    ] = False,
    protocol: ProtocolOpt = "tolcli",
    ctx: Annotated[
        int | None, typer.Option("--ctx", help="Tokens per window (default: min(512, max_position_embeddings)).")
    ] = None,
    stride: Annotated[int | None, typer.Option("--stride", help="Window step (default: --ctx).")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Use the first N tokens of each file.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 4,
    text_field: TextFieldOpt = "text",
    doc_sep: DocSepOpt = "eos",
    device: DeviceOpt = "auto",
    tensor_map: TensorMapOpt = None,
    revision: RevisionOpt = None,
    force: ForceOpt = False,
    max_increase: MaxIncreaseOpt = None,
    gate_significant: GateSignificantOpt = False,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Build and evaluate a grid of compressions and layer drops; write results.json/.csv/.md and plots.

    With --max-increase, exit 3 (after writing everything) when a variant fails the quality gate, as eval-ppl does.

    Example:

        tolcli sweep demo --data tolcli/demo/heldout.txt -o sweep/ --ctx 128 --stride 64

        tolcli sweep ./my-memoryllm --data wiki.txt -o sweep/ --schemes svd,adaptive-svd --ranks 256,512

        tolcli sweep demo --data tolcli/demo/heldout.txt -o sweep/ --schemes 'int4,svd+nf4,mixed(bits=3),mine.h5'

        tolcli sweep demo --data heldout.txt -o sweep/ --schemes mixed,cross-svd --calibration c.txt --error-feedback
    """
    apply_threads(threads)
    inputs = [checkpoint, *data, calibration]
    out = Output(json=json_out, quiet=quiet, command="sweep", inputs=inputs, output=output)
    gate = Gate(max_increase, gate_significant)
    if max_increase is not None:  # a bad limit is refused before the sweep runs, not after
        tolcli.EvalReport({}, [], 0.0).gate(max_increase)
    from tolcli.sweep import parse_sweep_items

    items = parse_sweep_items(schemes)
    opts = tolcli.SweepOptions(
        families=items.families,
        codecs=items.codecs,
        bundles=items.bundles,
        ranks=parse_ints(ranks, "--ranks") if ranks else None,
        bits=parse_floats(bits, "--bits") if bits else SWEEP_BITS,
        calibration=calibration,
        error_feedback=error_feedback,
        protocol=protocol,
        ctx=ctx,
        stride=stride,
        text_field=text_field,
        doc_sep=doc_sep,
        max_tokens=max_tokens,
        batch_size=batch_size,
        device=device,
    )
    res = tolcli.sweep(
        checkpoint_from_cli(checkpoint, tensor_map=tensor_map, revision=revision),
        data,
        output,
        opts,
        force=force,
        progress=RichProgress(out),
        note=note_to_stderr(out),
    )
    as_report = tolcli.EvalReport(res.protocol, res.rows, res.seconds)  # rows carry what the gate reads
    failure = None
    if max_increase is not None:
        try:
            as_report.enforce(max_increase, significant=gate_significant)
        except QualityGateError as e:
            failure = e
    _sweep_result(out, res, gate.to_json(as_report), failure)
    if not out.json and (line := gate.verdict_line(as_report)) is not None:
        out.print(line)
    if failure is not None:
        raise failure


def _sweep_result(out: Output, res: SweepResult, gate: dict[str, Any], error: QualityGateError | None = None) -> None:
    """Print what sweep measured: one JSON document, or the table and the files written."""
    if out.json:
        body = {
            "directory": str(res.directory),
            "rows": res.rows,
            "protocol": res.protocol,
            "plots": [str(p) for p in res.plots],
            "gate": gate,
        }
        out.emit_doc(body, output=res.directory, error=error)
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
        f"wrote {res.directory}/results.json, results.csv, results.md"
        + "".join(f", {p.name}" for p in res.plots)
        + f" in {res.seconds:.1f}s"
    )
