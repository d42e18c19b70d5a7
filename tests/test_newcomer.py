"""Issue 18 (a newcomer's path): one vocabulary across commands and no silent surprises."""

from __future__ import annotations

from pathlib import Path

import pytest

from tolcli import demo_checkpoint_path, precompute
from tolcli.errors import ExitCode


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return precompute(demo_checkpoint_path(), tmp_path_factory.mktemp("nc") / "dense.safetensors").path


def test_drop_of_every_layer_is_refused(dense: Path, tmp_path: Path, cli) -> None:
    r = cli("drop", dense, "-o", tmp_path / "none.safetensors", "--drop-last", "6")
    assert r.code == ExitCode.USAGE and "keeps none of the bundle's 6 present layers" in r.err
    assert not (tmp_path / "none.safetensors").exists()
    assert cli("drop", dense, "-o", tmp_path / "half.safetensors", "--keep-layers", "0-2").code == 0
    r = cli("drop", tmp_path / "half.safetensors", "-o", tmp_path / "x.safetensors", "--keep-layers", "3-5")
    assert r.code == ExitCode.USAGE and "keeps none" in r.err  # only dropped layers kept


def test_convert_takes_o_like_every_writer(dense: Path, tmp_path: Path, cli) -> None:
    assert cli("convert", dense, "-o", tmp_path / "a.h5").code == 0
    assert cli("convert", dense, tmp_path / "b.h5").code == 0  # the older positional spelling still works
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    r = cli("convert", dense, tmp_path / "c.h5", "-o", tmp_path / "d.h5")
    assert r.code == ExitCode.USAGE and "give the output once" in r.err
    assert cli("convert", dense).code == ExitCode.USAGE


def test_debug_is_accepted_after_the_command(cli) -> None:
    r = cli("info", "/nonexistent", "--debug")
    assert r.code == ExitCode.BAD_INPUT and "Traceback" in r.err  # --debug shows the traceback
    r = cli("info", "/nonexistent")
    assert r.err == "tolcli: error: /nonexistent: checkpoint not found\n"


def test_click_usage_errors_are_one_line(cli) -> None:
    r = cli("info", "--no-such-option")
    assert r.code == ExitCode.USAGE
    assert r.err == "tolcli: error: No such option: --no-such-option (see: tolcli info --help)\n"
    r = cli("eval-ppl", "demo")
    assert r.code == ExitCode.USAGE and r.err.count("\n") == 1 and "Missing option '--data'" in r.err
