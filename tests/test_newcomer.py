"""Issue 18 (a newcomer's path): one vocabulary across commands and no silent surprises."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tolcli import demo_checkpoint_path, precompute
from tolcli.errors import ExitCode

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return precompute(demo_checkpoint_path(), tmp_path_factory.mktemp("nc") / "dense.safetensors", dtype="fp32").path


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


def example_outputs() -> set[str]:
    """The paths the README's and quickstart's examples write in a checkout (what `git status` would show)."""
    from tests.test_doc_examples import EXAMPLES

    names: set[str] = set()
    for ex in EXAMPLES:
        if ex.page in ("README.md", "docs/quickstart.md"):
            names |= {m for m in re.findall(r"(?:-o|--save-reference)\s+(\S+)", ex.code) if "$" not in m}
            names |= set(re.findall(r'"([\w.-]+\.(?:safetensors|h5))"', ex.code))
    return names


def test_gitignore_covers_what_the_examples_write() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = example_outputs()
    assert {"dense.safetensors", "int4.safetensors", "tol/", "tol-int4.safetensors", "tol.h5"} <= names, names
    for name in sorted(names):
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", name], cwd=ROOT, capture_output=True)
        assert r.returncode == 0, f"{name} (written by a documented example) is not in .gitignore"
    r = subprocess.run(["git", "check-ignore", "-q", "--no-index", "README.md"], cwd=ROOT, capture_output=True)
    assert r.returncode == 1  # the rules stay at the top level: nothing of the project itself is ignored


def test_calibration_text_is_every_20th_training_document(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("demo_corpus", ROOT / "scripts" / "demo_corpus.py")
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    train = [f"doc {i}" for i in range(45)]
    assert corpus.calibration_text(train) == "doc 0\n\ndoc 20\n\ndoc 40\n"  # never a held-out document
