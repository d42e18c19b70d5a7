"""Regenerate docs/cli.md from the typer app (a test fails when it is stale)."""

from pathlib import Path

from tolcli.cli import app
from tolcli.cli._docs import render_cli_markdown

if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
    target.write_text(render_cli_markdown(app), encoding="utf-8")
    print(f"wrote {target}")
