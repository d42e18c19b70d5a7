"""One vocabulary across commands (issue 18): the same option names mean the same thing everywhere."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import typer.main

from tolcli.cli import COMMANDS, app

CLICK = typer.main.get_command(app)
# Commands that write a bundle or archive (GNU sha256sum lines for CI), and those with nothing to silence.
WRITERS = {"precompute", "compress", "convert", "drop", "pack", "unpack"}
NO_QUIET = {"info", "inspect", "schema", "bench-lookup"}  # their output is the result itself


def _options(command: str) -> dict[str, set[str]]:
    cmd = CLICK.commands[command]  # type: ignore[attr-defined]
    return {p.name: set(p.opts) | set(p.secondary_opts) for p in cmd.params}


def test_every_command_takes_json_and_writers_take_sha256sums_and_quiet() -> None:
    for command in COMMANDS:
        flags = set().union(*_options(command).values())
        assert "--json" in flags, command
        assert ("--quiet" in flags) == (command not in NO_QUIET), command
        assert ("--sha256sums" in flags) == (command in WRITERS), command


def test_one_name_for_a_layer_spec_and_for_token_batches() -> None:
    for command in COMMANDS:
        for name, flags in _options(command).items():
            if "--keep-layers" in flags or name in ("layers", "keep_layers"):
                assert "--layers" in flags, (command, name, flags)
            if name in ("batch_rows", "batch"):  # vocabulary rows or token ids per batch
                assert "--batch-tokens" in flags, (command, name, flags)
            if name == "batch_size":  # sequences (windows) per forward pass: the name HF and lm-eval use
                assert flags == {"--batch-size"}, (command, flags)


def test_drop_layers_alias_and_sha256sums(cli, tmp_path: Path, demo_bundle: Path) -> None:
    a, b, sums = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "SUMS"
    assert cli("drop", demo_bundle, "-o", a, "--layers", "0-2", "--sha256sums", sums).code == 0
    assert cli("drop", demo_bundle, "-o", b, "--keep-layers", "0-2").code == 0
    assert a.read_bytes() == b.read_bytes()
    assert sums.read_text() == f"{hashlib.sha256(a.read_bytes()).hexdigest()}  {a.name}\n"
    r = cli("drop", demo_bundle, "-o", tmp_path / "c.safetensors", "--layers", "0", "--drop-last", "1")
    assert r.code == 2 and "give exactly one of --drop-last and --layers" in r.err


def test_unpack_sha256sums(cli, tmp_path: Path, demo_bundle: Path) -> None:
    z, out, sums = tmp_path / "t.zst", tmp_path / "t.safetensors", tmp_path / "SUMS"
    assert cli("pack", demo_bundle, "-o", z).code == 0
    assert cli("unpack", z, "-o", out, "--sha256sums", sums).code == 0
    assert out.read_bytes() == demo_bundle.read_bytes()
    assert sums.read_text() == f"{hashlib.sha256(out.read_bytes()).hexdigest()}  {out.name}\n"


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory) -> Path:
    from tolcli import demo_checkpoint_path, precompute

    return precompute(demo_checkpoint_path(), tmp_path_factory.mktemp("voc") / "d.safetensors", dtype="fp16").path


@pytest.mark.parametrize(
    ("typer_label", "expected"),
    [
        ("<int>", "INTEGER"),
        ("<int range>", "INTEGER"),
        ("<str>", "TEXT"),
        ("<float>", "FLOAT"),
        ("<path>", "PATH"),
        ("<a|b>", "[a|b]"),
        ("<list[str]>", "TEXT..."),
        ("<str>...", "TEXT..."),
        ("N", "N"),
        (None, None),
    ],
)
def test_conventional_labels(typer_label: str | None, expected: str | None) -> None:
    from tolcli.cli._help import conventional

    assert conventional(typer_label) == expected


def test_help_uses_conventional_metavars(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags carry no value label, values are INTEGER/TEXT/..., arguments BUNDLE and [OUT] (click's, GNU's form)."""
    import re

    monkeypatch.setenv("COLUMNS", "200")
    for command in COMMANDS:
        r = cli(command, "--help")
        assert r.code == 0, (command, r.err)
        usage = next(line for line in r.out.splitlines() if "Usage:" in line)
        assert "{" not in usage and re.search(r"\[OPTIONS\]", usage), (command, usage)
        assert not re.search(r"<(bool|int|str|float|path|file|directory)[^>]*>", r.out), (command, r.out)
        quiet = [line for line in r.out.splitlines() if re.search(r"--quiet\b", line)]
        for line in quiet:  # a flag: the help text follows the option names directly
            assert re.search(r"-q\s+No progress", line), (command, line)
    r = cli("compress", "--help")
    assert re.search(r"--rank\s+INTEGER\s", r.out) and re.search(r"Usage: tolcli compress \[OPTIONS\] BUNDLE\b", r.out)
    r = cli("convert", "--help")
    assert "Usage: tolcli convert [OPTIONS] SRC [OUT]" in r.out
    r = cli("compress")
    assert "Missing argument 'BUNDLE'" in r.err
