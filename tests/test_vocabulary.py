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
