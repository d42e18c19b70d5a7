"""What every command shares: options, output (rich for people, JSON for machines) and formatting."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tolcli.cli import jsondoc
from tolcli.errors import TolcliError, UsageError
from tolcli.fsutil import path_bytes
from tolcli.progress import display as progress_display

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summaries; errors only.")]
TensorMapOpt = Annotated[
    str | None,
    typer.Option("--tensor-map", metavar="FILE.json", help="Rename foreign tensor names (docs/checkpoint-format.md)."),
]
AllowSourceMismatchOpt = Annotated[
    bool,
    typer.Option(
        "--allow-source-mismatch",
        help="Warn instead of refusing when a bundle was computed from another checkpoint (source fingerprints).",
    ),
]


RevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--revision",
        metavar="REV",
        help="For a Hub id: the branch, tag or commit to take from the local Hugging Face cache (never downloads).",
    ),
]


def checkpoint_from_cli(arg: str, *, tensor_map: str | None = None, revision: str | None = None):
    """The :class:`~tolcli.checkpoint.Checkpoint` a command's CHECKPOINT argument names: ``demo``/``demo:NAME``,
    a path, or a Hub id from the local cache; opened with ``--tensor-map``."""
    import tolcli
    from tolcli.demo import resolve_checkpoint_arg

    return tolcli.open_checkpoint(resolve_checkpoint_arg(arg, revision=revision), tensor_map=tensor_map)


# Library parameters whose flag is not simply ``--`` + the name with dashes (errors name parameters).
FLAGS: dict[str, str] = {
    "batch_rows": "--batch-tokens",
    "tols": "--tol",
    "verify_input": "--verify",
    "max_increase_pct": "--max-increase",
    "k": "--cache-tokens",
    "keep_layers": "--layers",
    "batch": "--batch-tokens",
}


def flag_for(param: str) -> str:
    """The CLI flag of a library parameter named in an error message."""
    return FLAGS.get(param, "--" + param.replace("_", "-"))


@dataclass
class Output:
    """Where a command writes. JSON mode prints exactly one document; quiet mode prints nothing else.

    ``command``, ``inputs`` and ``output`` (what the command reads and writes) go into the envelope of its
    ``--json`` document and of an error document (tolcli/cli/jsondoc.py)."""

    json: bool = False
    quiet: bool = False
    command: str | None = None
    inputs: Sequence[str | Path | None] = ()
    output: str | Path | None = None

    def __post_init__(self) -> None:
        if self.command is not None:
            jsondoc.declare(self.command, self.inputs, self.output)
        if os.environ.get("RANK", "0") not in ("", "0"):  # torchrun: only rank 0 talks
            self.quiet = True
        self.console = Console(no_color=bool(os.environ.get("NO_COLOR")), highlight=False)
        if not self.console.is_terminal and "COLUMNS" not in os.environ:
            self.console.width = 160  # logs and pipes: room for wide tables

    @property
    def interactive(self) -> bool:
        """Progress bars only for a person at a terminal."""
        return not (self.json or self.quiet) and self.console.is_terminal

    def emit_json(self, doc: Any) -> None:
        """One strict JSON document: NaN and infinities (a diverged perplexity) become ``null``."""
        sys.stdout.write(json.dumps(finite_json(doc), indent=2, sort_keys=True, allow_nan=False) + "\n")
        sys.stdout.flush()

    def emit_doc(
        self, body: dict[str, Any], *, output: str | Path | None = None, error: TolcliError | None = None
    ) -> None:
        """The command's ``--json`` document: the envelope (``output``: the path actually written, when it differs
        from the declared one), then ``body``; with ``error`` (a failure that still has a result, such as a
        failed quality gate) ``ok`` is false and the error is described."""
        doc = {**jsondoc.envelope(ok=error is None, output=output), **body}
        if error is not None:
            doc["error"] = error_json(error)
        self.emit_json(doc)
        jsondoc.mark_emitted()

    def print(self, *objects: Any) -> None:
        if not (self.json or self.quiet):
            self.console.print(*objects)


def error_json(e: TolcliError) -> dict[str, Any]:
    """The ``error`` member of a ``--json`` document for a library error (parameters named as flags)."""
    message, hint = e.parts(flag_for)
    return jsondoc.error_object(e.exit_code, message, hint=hint, path=e.path)


def finite_json(doc: Any) -> Any:
    """``doc`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: finite_json(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [finite_json(v) for v in doc]
    return doc


def parse_ints(text: str, flag: str) -> list[int]:
    """``"8,16,32"`` -> [8, 16, 32]; anything else is a usage error naming ``flag``."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers such as 8,16,32") from None


def parse_floats(text: str, flag: str) -> list[float]:
    """``"2,2.5,3"`` -> [2.0, 2.5, 3.0]; anything else (nan and inf too) is a usage error naming ``flag``."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = [math.nan]
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers such as 2,2.5,3")
    return values


def fmt_bytes(n: float) -> str:
    """Decimal units, as model sizes are quoted (12.6 GB)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover


def fmt_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        metavar="N",
        min=1,
        help="CPU threads torch computes with (default: what torch picks, one per core); fewer is often faster "
        "on a shared machine (docs/ci.md).",
    ),
]


def apply_threads(threads: int | None) -> None:
    """Apply ``--threads`` (before any torch work); ``None`` leaves torch's own choice."""
    if threads is not None:
        from tolcli.threads import set_threads

        set_threads(threads)


DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")]
FormatOpt = Annotated[
    str | None,
    typer.Option("--format", metavar="FORMAT", help="safetensors or hdf5 (default: from the output suffix)."),
]
CompressionOpt = Annotated[
    str | None,
    typer.Option(
        "--compression", metavar="NAME", help="HDF5 only: gzip or lzf (off by default; see docs/bundle-format.md)."
    ),
]
MaxShardOpt = Annotated[
    str | None,
    typer.Option(
        "--max-shard-size",
        metavar="SIZE",
        help="Write a sharded bundle directory (tol.index.json + shards of at most SIZE, e.g. 2GB).",
    ),
]
VerifyOpt = Annotated[
    bool, typer.Option("--verify", help="Check every input bundle's sha256 and values before using it.")
]
Sha256sumsOpt = Annotated[
    str | None,
    typer.Option("--sha256sums", metavar="FILE", help="Also write GNU sha256sum lines for the outputs (for CI)."),
]


class RichProgress:
    """tolcli.progress.Progress for a command: a bar at a terminal, a heartbeat line at a bounded rate in logs,
    nothing under --quiet/--json (tolcli/progress.py)."""

    def __init__(self, out: Output):
        err = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)
        enabled = not (out.json or out.quiet)
        self._display = progress_display(enabled=enabled, interactive=err.is_terminal, console=err)

    def start(self, description: str, total: int) -> None:
        self._display.start(description, total)

    def advance(self, n: int) -> None:
        self._display.advance(n)

    def finish(self) -> None:
        self._display.finish()


def note_to_stderr(out: Output):
    """Notes (resuming, warnings) go to stderr so stdout stays clean; silent under --quiet/--json."""

    def note(text: str) -> None:
        if not out.quiet and (not out.json or text.startswith("warning:")):
            sys.stderr.write(f"tolcli: {text}\n")

    return note


OutputOpt = Annotated[
    Path, typer.Option("--output", "-o", metavar="OUT", help="The bundle to write (.safetensors or .h5).")
]
BundleArg = Annotated[Path, typer.Argument(help="A ToL bundle (.safetensors or .h5).")]
CheckpointArg = Annotated[
    str,
    typer.Argument(
        help="Checkpoint directory or weights file, a Hub id in the local Hugging Face cache (org/name), "
        "or 'demo' / 'demo:llama'."
    ),
]
DropLastOpt = Annotated[int | None, typer.Option("--drop-last", metavar="K", help="Drop the last K layers.")]
KeepLayersOpt = Annotated[
    str | None,
    typer.Option(
        "--layers",
        "--keep-layers",  # the older spelling, kept: --layers is the one name for a layer spec on every command
        metavar="SPEC",
        help="Keep only these layers, e.g. '0-9,12' (also --keep-layers).",
    ),
]


def layers_present(manifest: dict[str, Any]) -> list[int]:
    """The indices of a manifest's present layers, ascending: the one form ``layers_present`` takes in --json."""
    return sorted(e["index"] for e in manifest["layers"] if e["status"] == "present")


def print_written(out: Output, path: Path, what: str, seconds: float) -> None:
    """One line on what a command wrote."""
    out.print(f"wrote {path} ({fmt_bytes(path_bytes(path))}, {what}) in {seconds:.1f}s")
