"""Crash safety: kill -9 mid-run leaves nothing at the output path, and --resume completes to the bytes of
an uninterrupted run. Disk full and unwritable outputs leave nothing behind either."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tolcli import precompute
from tolcli.errors import ExitCode, OutputError
from tolcli.testing import tiny_config, write_random_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = tiny_config(
        "memoryllm",
        vocab_size=32000,
        hidden_size=384,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return write_random_checkpoint(tmp_path_factory.mktemp("crash") / "ckpt", cfg)


def layers_done(partial: Path) -> int:
    try:
        return len(json.loads((partial / "state.json").read_text())["layers"])
    except (OSError, ValueError):
        return 0


def kill_after_first_layer(args: list[str], partial: Path, cwd: Path) -> int:
    """Start ``tolcli ARGS``, SIGKILL it once a layer is committed; returns how many layers were done."""
    p = subprocess.Popen(
        [sys.executable, "-m", "tolcli", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while p.poll() is None and layers_done(partial) < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    running = p.poll() is None
    p.kill()
    p.wait()
    assert running, f"the run ended (exit {p.returncode}) before it could be killed: the test proves nothing"
    done = layers_done(partial)
    assert 1 <= done < 8, f"the kill did not land mid-run ({done} of 8 layers done)"
    return done


def leftovers_of(out: Path) -> list[str]:
    """Temp files, lock files and staging directories of ``out``."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize("suffix", [".safetensors", ".h5"])
def test_kill_9_then_resume(ckpt: Path, tmp_path: Path, suffix: str) -> None:
    ref = precompute(ckpt, tmp_path / f"ref{suffix}", batch_rows=2048).path
    out = tmp_path / f"out{suffix}"
    args = ["precompute", str(ckpt), "-o", out.name, "--batch-tokens", "2048"]
    done = kill_after_first_layer(args, tmp_path / f".{out.name}.partial", tmp_path)
    assert not out.exists()  # never a partial file at the output path
    assert (tmp_path / f".{out.name}.partial.lock").exists()  # the killed run's lock file: no process holds it
    r = subprocess.run(
        [sys.executable, "-m", "tolcli", *args, "--resume"], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert f"resuming: {done} layer(s)" in r.stderr
    assert out.read_bytes() == ref.read_bytes()
    assert not leftovers_of(out)  # the resumed run took the stale lock over and removed it, and left nothing


def test_kill_9_during_compress_then_resume(ckpt: Path, tmp_path: Path) -> None:
    dense = precompute(ckpt, tmp_path / "dense.safetensors").path
    args = ["compress", "dense.safetensors", "-o", "svd.safetensors", "--scheme", "svd", "--rank", "64"]
    ref = subprocess.run(
        [sys.executable, "-m", "tolcli", *args[:3], "ref.safetensors", *args[4:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert ref.returncode == 0, ref.stderr
    done = kill_after_first_layer(args, tmp_path / ".svd.safetensors.partial", tmp_path)
    out = tmp_path / "svd.safetensors"
    assert not out.exists()
    r = subprocess.run(
        [sys.executable, "-m", "tolcli", *args, "--resume", "--force"], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert f"resuming: {done} layer(s)" in r.stderr
    assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert dense.exists()
    assert not leftovers_of(out)


def test_disk_full_leaves_nothing(ckpt: Path, tmp_path: Path, monkeypatch, cli) -> None:
    import tolcli.bundle.st_format as st

    def full(f, entries, manifest_json):  # the disk fills up after the header is written
        f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "write", full)
    out = tmp_path / "t.safetensors"
    with pytest.raises(OutputError, match="no space left"):
        precompute(ckpt, out, layers="0")
    assert not out.exists() and not list(tmp_path.glob(".t.safetensors.tmp-*"))
    r = cli("precompute", ckpt, "-o", out, "--layers", "0", "--force")
    assert r.code == ExitCode.OUTPUT == 6 and "no space left" in r.err and not out.exists()


def test_unwritable_output(ckpt: Path, cli) -> None:
    r = cli("precompute", ckpt, "-o", "/proc/tolcli-cannot-write/t.safetensors", "--layers", "0")
    assert r.code == ExitCode.OUTPUT and "cannot create the output directory" in r.err


def test_ctrl_c_during_precompute_exits_130_and_leaves_no_output(ckpt: Path, tmp_path: Path) -> None:
    code = (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from tolcli.cli import main\n"
        f"raise SystemExit(main(['precompute', {str(ckpt)!r}, '-o', 'c.safetensors', '--batch-tokens', '1024']))\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    partial = tmp_path / ".c.safetensors.partial"
    deadline = time.monotonic() + 120
    while p.poll() is None and layers_done(partial) < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert p.poll() is None, "the run ended before the signal could be sent: the test proves nothing"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip().endswith("tolcli: error: interrupted"), (p.returncode, err)
    assert 1 <= layers_done(partial) < 8  # it was interrupted mid-run
    assert not (tmp_path / "c.safetensors").exists() and not list(tmp_path.glob(".c.safetensors.tmp-*"))
    assert os.path.isdir(tmp_path / ".c.safetensors.partial")  # kept for --resume
    assert leftovers_of(tmp_path / "c.safetensors") == [".c.safetensors.partial"]  # no temp file, no lock


@pytest.mark.parametrize("converted", [ValueError, OutputError])
def test_ctrl_c_that_an_extension_turns_into_another_error_still_exits_130(
    ckpt: Path, tmp_path: Path, cli, monkeypatch, converted: type[Exception]
) -> None:
    """torch catches a KeyboardInterrupt raised inside ``torch.tensor`` and raises a ValueError in its place (a CI
    run reported "internal error: ValueError: could not determine the shape of object type ..." for a Ctrl-C);
    whatever error the interrupt became, the outcome is still "interrupted", exit 130."""

    def interrupted_inside_an_extension(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
        except KeyboardInterrupt:
            raise converted("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None
        raise AssertionError("the signal never arrived")

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        monkeypatch.setattr("tolcli.precompute", interrupted_inside_an_extension)
        r = cli("precompute", ckpt, "-o", tmp_path / "c.safetensors")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    finally:
        signal.signal(signal.SIGINT, before)
    assert r.code == ExitCode.INTERRUPTED and r.err.strip() == "tolcli: error: interrupted", r

    def fails_alone(*args, **kwargs):
        raise converted("a failure of its own")

    monkeypatch.setattr("tolcli.precompute", fails_alone)  # the same error with no signal: reported as itself
    r = cli("precompute", ckpt, "-o", tmp_path / "c.safetensors")
    assert r.code not in (0, ExitCode.INTERRUPTED) and "a failure of its own" in r.err, r
