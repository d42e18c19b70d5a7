"""Docs that are generated from the code must be current, and must mention everything."""

from __future__ import annotations

from pathlib import Path

import typer

from tolcli.cli import app
from tolcli.cli._docs import render_cli_markdown
from tolcli.errors import ExitCode

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_cli_reference_is_current() -> None:
    assert (DOCS / "cli.md").read_text(encoding="utf-8") == render_cli_markdown(app), (
        "docs/cli.md is stale: run `python scripts/gen_docs.py`"
    )


def test_every_command_option_and_exit_code_is_documented() -> None:
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    root = typer.main.get_command(app)
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        assert f"## `tolcli {name}`" in text
        for p in cmd.params:
            for opt in getattr(p, "opts", []):
                if opt.startswith("-"):
                    assert f"`{opt}`" in text, f"{name} {opt}"
    for code in ExitCode:
        assert f"| {int(code)} |" in text
