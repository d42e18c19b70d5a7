"""Regenerate docs/cli.md and docs/api.md from the code (tests fail when they are stale)."""

from pathlib import Path

from tolcli.cli import app
from tolcli.cli._apidocs import render_api_markdown
from tolcli.cli._docs import render_cli_markdown

if __name__ == "__main__":
    docs = Path(__file__).resolve().parent.parent / "docs"
    (docs / "cli.md").write_text(render_cli_markdown(app), encoding="utf-8")
    (docs / "api.md").write_text(render_api_markdown(), encoding="utf-8")
    print(f"wrote {docs / 'cli.md'} and {docs / 'api.md'}")
