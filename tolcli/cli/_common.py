"""What every command shares: options, output (rich for people, JSON for machines) and formatting."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summaries; errors only.")]
TensorMapOpt = Annotated[
    str | None,
    typer.Option("--tensor-map", metavar="FILE.json", help="Rename foreign tensor names (docs/checkpoint-format.md)."),
]


@dataclass
class Output:
    """Where a command writes. JSON mode prints exactly one document; quiet mode prints nothing else."""

    json: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        self.console = Console(no_color=bool(os.environ.get("NO_COLOR")), highlight=False, soft_wrap=True)

    @property
    def interactive(self) -> bool:
        """Progress bars only for a person at a terminal."""
        return not (self.json or self.quiet) and self.console.is_terminal

    def emit_json(self, doc: Any) -> None:
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        sys.stdout.flush()

    def print(self, *objects: Any) -> None:
        if not (self.json or self.quiet):
            self.console.print(*objects)


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
