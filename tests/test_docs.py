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


def test_api_reference_is_current() -> None:
    from tolcli.cli._apidocs import render_api_markdown

    assert (DOCS / "api.md").read_text(encoding="utf-8") == render_api_markdown(), (
        "docs/api.md is stale: run `python scripts/gen_docs.py`"
    )


def test_every_public_function_has_a_runnable_example() -> None:
    import inspect

    import tolcli

    for name in tolcli.__all__:
        obj = getattr(tolcli, name)
        if inspect.isfunction(obj):
            assert ">>> " in (inspect.getdoc(obj) or ""), f"tolcli.{name} has no example (doctests run them)"
        if inspect.isclass(obj):
            assert inspect.getdoc(obj), f"tolcli.{name} has no docstring"


def test_every_command_help_has_an_example() -> None:
    root = typer.main.get_command(app)
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        assert "Example" in (cmd.help or ""), f"tolcli {name} --help has no example"


def test_docs_link_to_existing_files() -> None:
    import re

    for page in [*DOCS.glob("*.md"), DOCS.parent / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_every_command_has_a_page_with_real_output() -> None:
    root = typer.main.get_command(app)
    for name in root.commands:  # type: ignore[attr-defined]
        page = DOCS / "commands" / f"{name}.md"
        assert page.is_file(), f"no docs/commands/{name}.md: run `python scripts/gen_command_pages.py`"
        assert f"$ tolcli {name} " in page.read_text(encoding="utf-8") or name == "schema"
