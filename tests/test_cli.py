"""CLI conventions shared by every command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tolcli import __version__


def test_version(cli) -> None:
    r = cli("--version")
    assert r.code == 0 and r.out.strip() == f"tolcli {__version__}"


def test_help_lists_exit_codes_and_examples(cli) -> None:
    r = cli("--help")
    assert r.code == 0 and "info" in r.out and "Exit codes" in r.out
    r = cli("info", "--help")
    assert r.code == 0 and "tolcli info demo" in r.out


def test_usage_error_exit_2(cli) -> None:
    r = cli("info", "--no-such-option")
    assert r.code == 2 and "No such option" in r.err
    assert cli("no-such-command").code == 2
    # under --json the same error is also one JSON document on stdout (docs/json-output.md)
    r = cli("info", "--no-such-option", "--json")
    doc = json.loads(r.out)
    assert r.code == 2 and doc["ok"] is False and doc["command"] == "info"
    assert doc["error"] == {
        "code": "usage",
        "exit_code": 2,
        "message": r.err.removeprefix("tolcli: error: ").rstrip("\n"),
        "hint": None,
        "path": None,
    }
    r = cli("no-such-command", "--json")
    assert r.code == 2 and json.loads(r.out)["command"] is None


def test_json_is_the_only_stdout(cli) -> None:
    r = cli("info", "demo", "--json")
    assert r.code == 0
    doc = json.loads(r.out)  # exactly one document
    assert (doc["command"], doc["ok"], doc["input"], doc["output"], doc["tolcli_version"]) == (
        "info",
        True,
        "demo",
        None,
        __version__,
    )


def test_console_script_and_module_entry_points() -> None:
    r = subprocess.run([sys.executable, "-m", "tolcli", "info", "/nonexistent"], capture_output=True, text=True)
    assert r.returncode == 4
    assert r.stderr == "tolcli: error: /nonexistent: checkpoint not found\n"
    assert r.stdout == "" and r.stderr.count("\n") == 1


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_exit_130_with_one_line(sig: str) -> None:
    import signal

    # A process started in the background (as CI may start this suite) inherits SIGINT as ignored, and Python
    # then installs no KeyboardInterrupt handler; restore it, as an interactive shell would have.
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from tolcli.cli import main\n"
        "def slow(*a, **k):\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(120)\n"
        "import tolcli\n"
        "tolcli.describe_checkpoint = slow\n"
        "raise SystemExit(main(['info', 'demo']))\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline() == "ready\n"  # inside the command: now a Ctrl-C must be handled by tolcli
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "tolcli: error: interrupted\n" and out == ""


def test_broken_pipe_is_quiet() -> None:
    r = subprocess.run(
        f"{sys.executable} -m tolcli compress --help | head -1", shell=True, capture_output=True, text=True
    )
    assert "Traceback" not in r.stderr


def test_a_bug_is_one_line_exit_1_and_debug_shows_the_traceback(cli, monkeypatch) -> None:
    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("tolcli.describe_checkpoint", broken)
    r = cli("info", "demo")
    assert r.code == 1 and r.err.count("\n") == 1
    assert "internal error: ZeroDivisionError: a bug" in r.err and "--debug" in r.err
    r = cli("--debug", "info", "demo")
    assert r.code == 1 and "Traceback" in r.err


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["schema"],
        ["schema", "eval-ppl"],
        ["schema", "--list", "--json"],
        ["--help"],
        ["compress", "--help"],
    ],
)
def test_fast_commands_do_not_import_torch(args: list[str]) -> None:
    """--version, --help and schema answer without loading torch or h5py (about 2 s saved per call)."""
    code = (
        "import sys\n"
        "from tolcli.cli import main\n"
        f"rc = main({args!r})\n"
        "loaded = sorted(m for m in ('torch._C', 'h5py', 'tolcli.model') if m in sys.modules)\n"
        "sys.stderr.write(f'LOADED={loaded} RC={rc}')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stderr.endswith("LOADED=[] RC=0"), r.stderr[-500:]


def test_sha256sums_naming_the_output_is_refused_before_any_work(tmp_path: Path, cli) -> None:
    out = tmp_path / "d.safetensors"
    r = cli("precompute", "demo", "-o", out, "--layers", "0", "--sha256sums", out)
    assert r.code == 2 and "--sha256sums" not in r.out and not out.exists(), r.err


def test_sha256sums_of_a_sharded_output_list_every_file(tmp_path: Path, cli) -> None:
    """Checked with the standard tool: ``sha256sum -c`` accepts every line."""
    out, sums = tmp_path / "tol", tmp_path / "SHA256SUMS"
    r = cli("precompute", "demo", "-o", out, "--layers", "0-1", "--max-shard-size", "1MB", "--sha256sums", sums)
    assert r.code == 0, r.err
    lines = sums.read_text().splitlines()
    assert sorted(line.split("  ")[1] for line in lines) == sorted(f"tol/{p.name}" for p in out.iterdir())
    check = subprocess.run(["sha256sum", "-c", sums.name], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_suffixes_are_case_insensitive(tmp_path: Path, cli) -> None:
    r = cli("precompute", "demo", "-o", tmp_path / "T.H5", "--layers", "0")
    assert r.code == 0, r.err
    assert (tmp_path / "T.H5").read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    assert cli("inspect", tmp_path / "T.H5").code == 0
    r = cli("convert", tmp_path / "T.H5", tmp_path / "b.H5", "--format", "safetensors")
    assert r.code == 2 and "contradicts the suffix" in r.err
