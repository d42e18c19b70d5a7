"""Hostile outputs: two writers on one output, symlinks planted at every predictable path, --force onto
directories tolcli did not write, leftovers of killed runs, --sha256sums onto the bundle, unwritable disks.

Every test keeps to tiny models; the processes that must hold a lock while another run tries are paused by a
hook in a child ``python -c`` script (a file ``paused`` appears; creating ``go`` lets them continue)."""

from __future__ import annotations

import collections
import errno
import gc
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tolcli import convert_bundle, drop_layers, open_bundle, open_checkpoint, precompute, strip_checkpoint
from tolcli.bundle import sharded
from tolcli.bundle.writer import Staging
from tolcli.compress import CompressOptions, compress
from tolcli.errors import ExitCode, OutputError, TolcliError, UsageError
from tolcli.fsutil import (
    LockBusy,
    OutputLock,
    Terminated,
    check_sums_path,
    leftovers,
    lock_path,
    sigterm_as_interrupt,
    why_not_replaceable,
    write_sha256sums,
)
from tolcli.testing import tiny_config, write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent

# A child process: run ``tolcli ARGS`` with a hook that pauses it once, until ``go`` exists (60 s at most).
CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
def pause():
    if Path("paused").exists():
        return
    Path("paused").write_text("1")
    deadline = time.monotonic() + 60
    while not Path("go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
import tolcli.bundle.st_format as st
from tolcli.bundle.writer import Staging
from tolcli.cli import main
from tolcli.fsutil import sigterm_as_interrupt
hook = {hook!r}
if hook == "commit":  # after the first completed layer
    commit = Staging.commit_layer
    def paused_commit(self, index, entry):
        commit(self, index, entry)
        pause()
    Staging.commit_layer = paused_commit
elif hook == "write":  # in the middle of writing the output's temp file
    write = st.write
    def paused_write(f, entries, manifest_json):
        f.write(b"\\0" * 4096)
        f.flush()
        pause()
        f.seek(0)
        f.truncate()
        return write(f, entries, manifest_json)
    st.write = paused_write
with sigterm_as_interrupt():
    code = main({args!r})
raise SystemExit(code)
"""


def start_paused(args: list[str], hook: str, cwd: Path) -> subprocess.Popen[str]:
    """Start ``tolcli ARGS`` in a child; return once it is paused (holding its locks)."""
    code = CHILD.format(root=str(ROOT), hook=hook, args=[str(a) for a in args])
    p = subprocess.Popen(
        [sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 90
    while not (cwd / "paused").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if not (cwd / "paused").exists():
        p.kill()
        _, err = p.communicate()
        pytest.fail(f"the child never paused (exit {p.returncode}): {err[-2000:]}")
    return p


def resume_child(p: subprocess.Popen[str], cwd: Path) -> tuple[int, str]:
    (cwd / "go").write_text("1")
    _, err = p.communicate(timeout=120)
    return p.returncode, err


def temps(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-"))


def locks(out: Path) -> list[str]:
    return sorted(
        p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") and p.name.endswith(".lock")
    )


def verifies(path: Path) -> bool:
    with open_bundle(path, verify=True) as b:
        b.verify()
    return True


@pytest.fixture
def ckpt(make_ckpt) -> Path:
    return make_ckpt("memoryllm", num_hidden_layers=4)


@pytest.fixture
def dense(ckpt: Path, tmp_path: Path) -> Path:
    return precompute(ckpt, tmp_path / "dense.safetensors").path


# ---- 2. two writers on one output ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["precompute", "compress"])
def test_a_second_writer_is_refused_and_the_first_completes(
    command: str, ckpt: Path, dense: Path, tmp_path: Path, cli
) -> None:
    out = tmp_path / "out.safetensors"
    args = (
        ["precompute", ckpt, "-o", out, "--batch-tokens", "32"]
        if command == "precompute"
        else ["compress", dense, "-o", out, "--scheme", "int8"]
    )
    first = start_paused(args, "commit", tmp_path)  # holds the staging lock, one layer staged
    try:
        staged = sorted(p.name for p in (tmp_path / ".out.safetensors.partial").iterdir())
        for extra in ([], ["--force"], ["--resume"], ["--resume", "--force"]):
            r = cli(*args, *extra)
            assert r.code == ExitCode.OUTPUT == 6, r.err
            assert f"another tolcli run is writing {out} (pid {first.pid})" in r.err, r.err
            assert sorted(p.name for p in (tmp_path / ".out.safetensors.partial").iterdir()) == staged
            assert not out.exists()
    finally:
        code, err = resume_child(first, tmp_path)
    assert code == 0, err
    assert verifies(out)
    assert cli("verify", out).code == 0
    assert not temps(out) and not locks(out) and not (tmp_path / ".out.safetensors.partial").exists()


@pytest.mark.parametrize("shard", [None, "20kB"])
def test_a_second_convert_to_the_same_output_is_refused(dense: Path, tmp_path: Path, cli, shard: str | None) -> None:
    out = tmp_path / ("out" if shard else "out.safetensors")
    args = ["convert", dense, out, "--force"] + (["--max-shard-size", shard] if shard else [])
    first = start_paused(args, "write", tmp_path)  # in the middle of writing its temp file (or a shard)
    try:
        assert temps(out), "the first writer has its temp output"
        r = cli(*args)
        assert r.code == 6 and f"another tolcli run is writing {out} (pid {first.pid})" in r.err, r.err
        r = cli(
            "drop", dense, "-o", out, "--drop-last", "1", "--force", *(["--max-shard-size", shard] if shard else [])
        )
        assert r.code == 6 and "another tolcli run is writing" in r.err, r.err
    finally:
        code, err = resume_child(first, tmp_path)
    assert code == 0, err
    assert verifies(out) and not temps(out) and not locks(out)


def test_output_lock_rules(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    lock = lock_path(out)
    lock.write_text("424242\n")  # a killed run's lock file: no process holds the flock
    with OutputLock(lock, out):
        assert lock.read_text() == f"{os.getpid()}\n"
        with OutputLock(lock, out):  # the same thread shares it (a nested writer)
            pass
        assert lock.exists()
        errors: list[BaseException] = []

        def other() -> None:
            try:
                OutputLock(lock, out).acquire()
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert isinstance(errors[0], LockBusy) and f"(pid {os.getpid()})" in str(errors[0])
    assert not lock.exists()  # removed by its last holder
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.link(victim, lock)  # a hard link: locked, never written to
    with OutputLock(lock, out):
        pass
    assert victim.read_text() == "precious" and not lock.exists()  # only the name at the lock path went
    lock.symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        OutputLock(lock, out).acquire()
    assert victim.read_text() == "precious" and lock.is_symlink()


# ---- 4. symlinks planted at predictable paths ----------------------------------------------------------------------
def snapshot(paths: list[Path]) -> dict[str, Any]:
    """Everything about the victims: content, size, mtime, inode, and a directory's entries."""
    out: dict[str, Any] = {}
    for root in paths:
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            st = os.lstat(p)
            data = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, data)
    return out


@pytest.fixture
def victims(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("victims")
    (d / "victim.txt").write_text("do not touch\n")
    (d / "victim_dir").mkdir()
    (d / "victim_dir" / "keep.txt").write_text("keep\n")
    return d / "victim.txt", d / "victim_dir"


PLANTED = {  # name pattern -> outcome when a symlink to a victim sits there
    ".{name}.partial": 6,
    ".{name}.partial.lock": 6,
    ".{name}.lock": 6,
    ".{name}.tmp-{pid}": 0,  # the old predictable temp name: never opened again, reclaimed (the link only)
    ".{name}.tmp-dist": 0,
    "{name}": 0,  # the output itself, with --force: the link is replaced, its target never followed
}


@pytest.mark.parametrize("pattern", sorted(PLANTED))
@pytest.mark.parametrize("target", ["file", "dir"])
def test_planted_symlinks_never_touch_their_target(
    ckpt: Path, tmp_path: Path, cli, victims: tuple[Path, Path], pattern: str, target: str
) -> None:
    out = tmp_path / "out.safetensors"
    planted = tmp_path / pattern.format(name=out.name, pid=os.getpid())
    planted.symlink_to(victims[0] if target == "file" else victims[1])
    before = snapshot(list(victims))
    r = cli("precompute", ckpt, "-o", out, "--force")
    assert r.code == PLANTED[pattern], r.err
    assert snapshot(list(victims)) == before
    if r.code == 0:
        assert not out.is_symlink() and verifies(out)
        assert not temps(out) and not locks(out)  # the planted temp link was reclaimed (the link, not its target)
    else:
        assert "symbolic link" in r.err and planted.is_symlink() and not out.exists()


@pytest.mark.parametrize("command", ["precompute", "convert-sharded", "strip"])
def test_links_planted_after_the_reclaim_or_by_another_user_are_left_alone(
    command: str, ckpt: Path, dense: Path, tmp_path: Path, cli, monkeypatch, victims: tuple[Path, Path]
) -> None:
    """The old predictable temp names hold links to the victims, planted in the instant after the leftovers were
    reclaimed (or owned by another user, whose files the reclaim never removes): tolcli's temp names are
    unpredictable and created exclusively, so nothing follows them."""
    import tolcli.fsutil as fs

    out = tmp_path / ("out.safetensors" if command == "precompute" else "out")
    names = [f".{out.name}.tmp-{os.getpid()}", f".{out.name}.tmp-dist"]
    reclaim = fs._reclaim_locked

    def then_plant(path: Path) -> list[Path]:
        found = reclaim(path)
        for k, name in enumerate(names):
            if not os.path.lexists(path.parent / name):
                (path.parent / name).symlink_to(victims[k % 2])
        return found

    monkeypatch.setattr(fs, "_reclaim_locked", then_plant)
    before = snapshot(list(victims))
    args = {
        "precompute": ["precompute", ckpt, "-o", out],
        "convert-sharded": ["convert", dense, out, "--max-shard-size", "20kB"],
        "strip": ["strip", ckpt, "-o", out],
    }[command]
    r = cli(*args)
    assert r.code == 0, r.err
    assert snapshot(list(victims)) == before
    assert all((tmp_path / n).is_symlink() for n in names)
    if os.geteuid() == 0:  # another user's links beside the output: never followed, never removed
        monkeypatch.setattr(fs, "_reclaim_locked", reclaim)
        for n in names:
            os.lchown(tmp_path / n, 65534, 65534)
        assert cli(*args, "--force").code == 0
        assert snapshot(list(victims)) == before and all((tmp_path / n).is_symlink() for n in names)
    if command == "strip":
        assert open_checkpoint(out).config.stripped
    else:
        assert verifies(out)


def test_symlinks_planted_inside_an_interrupted_staging(
    ckpt: Path, tmp_path: Path, monkeypatch, victims: tuple[Path, Path]
) -> None:
    """Resuming: staged names not yet written and the old state temp name are links to the victim."""
    out = tmp_path / "out.safetensors"
    ref = precompute(ckpt, tmp_path / "ref.safetensors").path.read_bytes()
    commit = Staging.commit_layer

    def interrupted(self, index, entry):
        commit(self, index, entry)
        raise KeyboardInterrupt

    monkeypatch.setattr(Staging, "commit_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        precompute(ckpt, out)
    monkeypatch.setattr(Staging, "commit_layer", commit)
    partial = tmp_path / ".out.safetensors.partial"
    assert (partial / "state.json").exists()
    used = {p.name for p in partial.iterdir()}
    for k in range(12):
        if f"{k:05d}.bin" not in used:
            (partial / f"{k:05d}.bin").symlink_to(victims[0])
    (partial / "state.json.tmp").symlink_to(victims[0])
    (partial / "sub").symlink_to(victims[1])
    before = snapshot(list(victims))
    notes: list[str] = []
    precompute(ckpt, out, resume=True, note=notes.append)
    assert any(n.startswith("resuming: 1 layer(s)") for n in notes), notes
    assert out.read_bytes() == ref and snapshot(list(victims)) == before
    # a staged file replaced by a link is not reused (and not followed): the run starts over
    monkeypatch.setattr(Staging, "commit_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        precompute(ckpt, out, force=True)
    monkeypatch.setattr(Staging, "commit_layer", commit)
    first = sorted(partial.glob("*.bin"))[0]
    first.unlink()
    first.symlink_to(victims[0])
    notes = []
    precompute(ckpt, out, resume=True, force=True, note=notes.append)
    assert any("removing the partial output" in n for n in notes), notes
    assert out.read_bytes() == ref and snapshot(list(victims)) == before


# ---- 5. what --force may replace -----------------------------------------------------------------------------------
def tree(path: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def test_force_refuses_a_directory_tolcli_did_not_write(ckpt: Path, dense: Path, tmp_path: Path, cli) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('hi')\n")
    (project / "README.md").write_text("mine\n")
    before = tree(project)
    for args in (
        ["convert", dense, project, "--max-shard-size", "1MB", "--force"],
        ["drop", dense, "-o", project, "--drop-last", "1", "--max-shard-size", "1MB", "--force"],
        ["precompute", ckpt, "-o", project, "--max-shard-size", "1MB", "--force"],
        ["strip", ckpt, "-o", project, "--force"],
    ):
        r = cli(*args)
        assert r.code == 6 and "--force replaces only a directory tolcli wrote" in r.err and str(project) in r.err
        assert tree(project) == before
    assert not list(tmp_path.glob(".project*"))  # refused before anything was staged or locked
    r = cli("strip", ckpt, "-o", ckpt, "--force")  # the input checkpoint itself is not a stripped one
    assert r.code == 6 and "not a stripped checkpoint" in r.err
    assert open_checkpoint(ckpt).config.stripped is False


def test_force_replaces_what_tolcli_wrote(ckpt: Path, dense: Path, tmp_path: Path, cli, victims) -> None:
    many = convert_bundle(dense, tmp_path / "many", max_shard_size="20kB")
    assert why_not_replaceable(many) is None
    assert cli("convert", dense, many, "--max-shard-size", "1MB", "--force").code == 0
    assert len(list(many.iterdir())) == 2 and verifies(many)  # one shard and the index: the old shards are gone
    (many / "notes.txt").write_text("mine\n")  # something tolcli did not write
    r = cli("convert", dense, many, "--max-shard-size", "20kB", "--force")
    assert r.code == 6 and "'notes.txt' is not part of the sharded bundle" in r.err
    stripped = strip_checkpoint(ckpt, tmp_path / "active").path
    assert cli("strip", ckpt, "-o", stripped, "--force").code == 0 and open_checkpoint(stripped).config.stripped
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("convert", dense, empty, "--max-shard-size", "1MB", "--force").code == 0 and verifies(empty)
    # a symlink at the output: the link is replaced, the directory it points at is untouched
    link = tmp_path / "link"
    link.symlink_to(victims[1])
    before = snapshot(list(victims))
    assert cli("convert", dense, link, "--max-shard-size", "1MB").code == 6  # exists: needs --force
    assert cli("convert", dense, link, "--max-shard-size", "1MB", "--force").code == 0
    assert not link.is_symlink() and verifies(link) and snapshot(list(victims)) == before
    assert not list(tmp_path.glob(".*tmp-*")) and not list(tmp_path.glob(".*.lock"))


# ---- 10. leftovers -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shard", [None, "20kB"])
def test_kill_9_leftovers_are_reclaimed_by_the_next_run(ckpt: Path, tmp_path: Path, cli, shard: str | None) -> None:
    out = tmp_path / ("out" if shard else "out.safetensors")
    args = ["precompute", ckpt, "-o", out] + (["--max-shard-size", shard] if shard else [])
    p = start_paused(args, "write", tmp_path)  # every layer staged, the output's temp half written
    p.kill()
    p.wait()
    left = temps(out)
    assert left, "the kill did not land while the temp output existed: the test proves nothing"
    assert (tmp_path / f".{out.name}.partial").is_dir() and locks(out)
    r = cli(*args, "--resume")
    assert r.code == 0, r.err
    assert "removed 1 temp file(s) that an interrupted run left" in r.err
    assert "resuming: 4 layer(s)" in r.err
    assert not temps(out) and not locks(out) and not (tmp_path / f".{out.name}.partial").exists()
    assert verifies(out)


@pytest.mark.parametrize("command", ["precompute", "convert"])
def test_sigterm_removes_temp_files_and_keeps_staging(
    command: str, ckpt: Path, dense: Path, tmp_path: Path, cli
) -> None:
    out = tmp_path / "out.safetensors"
    args = ["precompute", ckpt, "-o", out] if command == "precompute" else ["convert", dense, out]
    p = start_paused(args, "write", tmp_path)
    assert temps(out), "SIGTERM must land while the temp output exists"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip().endswith("tolcli: error: interrupted"), (p.returncode, err)
    assert not temps(out) and not locks(out) and not out.exists()
    if command == "precompute":
        assert (tmp_path / ".out.safetensors.partial").is_dir()  # kept for --resume
        r = cli(*args, "--resume")
        assert r.code == 0 and "resuming: 4 layer(s)" in r.err, r.err
    assert cli(*args, "--force").code == 0 and verifies(out)


def test_sigterm_as_interrupt_restores_and_respects_ignored_signals() -> None:
    before, hup = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # nohup stays nohup
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGHUP, hup)


def test_sigterm_still_unwinds_after_a_ctrl_c_that_was_handled() -> None:
    """Ctrl-C is recorded too (an error it turns into still exits 130), but a handled one must not make a later
    SIGTERM a no-op."""
    # a process started in the background of a non-interactive shell (a CI runner's `cmd &`) inherits SIGINT
    # ignored, and Python then leaves it so: install Python's own handler, as an interactive start has it
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with sigterm_as_interrupt() as fired:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                pass
            assert fired == [signal.SIGINT]
            with pytest.raises(Terminated):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            assert fired == [signal.SIGINT, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGINT, before)


def test_usage_errors_and_failed_runs_leave_no_staging(ckpt: Path, tmp_path: Path, cli, monkeypatch) -> None:
    out = tmp_path / "out.safetensors"
    stage, commit = Staging.stage, Staging.commit_layer

    def late_usage_error(self, *a, **k):  # found while computing the first layer, before anything is staged
        raise UsageError("a late usage error")

    monkeypatch.setattr(Staging, "stage", late_usage_error)
    r = cli("precompute", ckpt, "-o", out)
    assert r.code == 2
    gc.collect()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt0"]  # nothing staged, locked or written

    def fails_before_completing_a_layer(self, index, entry):  # tensors staged, no layer complete
        raise OutputError("disk trouble")

    monkeypatch.setattr(Staging, "stage", stage)
    monkeypatch.setattr(Staging, "commit_layer", fails_before_completing_a_layer)
    r = cli("precompute", ckpt, "-o", out)
    gc.collect()
    assert r.code == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt0"]
    # a run that completed layers keeps them for --resume; a different job with --resume is refused and
    # leaves that staging alone
    monkeypatch.setattr(Staging, "commit_layer", _commit_then_stop(commit))
    with pytest.raises(KeyboardInterrupt):
        precompute(ckpt, out)
    gc.collect()
    partial = tmp_path / ".out.safetensors.partial"
    kept = tree(partial)
    r = cli("precompute", ckpt, "-o", out, "--dtype", "fp16", "--resume")
    assert r.code == 2 and "different inputs or options" in r.err
    assert tree(partial) == kept and not locks(out)
    # the CLI in its own process: the usage error leaves nothing behind either
    r2 = subprocess.run(
        [sys.executable, "-m", "tolcli", "precompute", str(ckpt), "-o", "o2.safetensors", "--layers", "9"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r2.returncode == 2 and not list(tmp_path.glob("*o2*"))


def _commit_then_stop(commit: Callable[..., None]) -> Callable[..., None]:
    def stop(self, index, entry):
        commit(self, index, entry)
        raise KeyboardInterrupt

    return stop


# ---- 11. --sha256sums onto the bundle; unwritable and full disks ----------------------------------------------------
def test_sha256sums_never_replaces_the_bundle(dense: Path, tmp_path: Path, cli) -> None:
    before = dense.read_bytes()
    many = convert_bundle(dense, tmp_path / "many", max_shard_size="20kB")
    for sums, protected in [
        (dense, [dense]),
        (tmp_path / "many" / ".." / dense.name, [dense]),
        (many / "SHA256SUMS", [many]),
        (many / sharded.INDEX_NAME, [many]),
    ]:
        with pytest.raises(UsageError, match="sums there would destroy it"):
            check_sums_path(sums, *protected)
    link = tmp_path / "sums-link"
    link.symlink_to(dense)
    with pytest.raises(UsageError):
        check_sums_path(link, dense)
    assert check_sums_path(tmp_path / "SHA256SUMS", dense, many) == tmp_path / "SHA256SUMS"
    with pytest.raises(UsageError):
        write_sha256sums(dense, [dense])
    assert dense.read_bytes() == before
    out = tmp_path / "c.safetensors"
    r = cli("convert", dense, out, "--sha256sums", out)  # the CLI checks before any work
    assert r.code == 2 and "--sha256sums" in r.err, r.err
    assert not out.exists()


@pytest.mark.parametrize(
    "err", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO, errno.EFBIG], ids=errno.errorcode.get
)
def test_strip_on_a_full_or_read_only_disk_exits_6(ckpt: Path, tmp_path: Path, cli, monkeypatch, err: int) -> None:
    import tolcli.bundle.st_format as st

    def failing(f, entries, manifest_json):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(st, "write", failing)
    out = tmp_path / "active"
    r = cli("strip", ckpt, "-o", out)
    assert r.code == ExitCode.OUTPUT == 6, r.err
    assert not out.exists() and not temps(out) and not locks(out)


def test_staging_on_a_full_disk_exits_6_and_keeps_completed_layers(
    ckpt: Path, tmp_path: Path, cli, monkeypatch
) -> None:
    """The disk fills up when the second layer's state is saved (it was an internal error, exit 1)."""
    import tempfile

    mkstemp, calls = tempfile.mkstemp, []

    def full(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return mkstemp(*a, **k)

    monkeypatch.setattr(tempfile, "mkstemp", full)
    out = tmp_path / "out.safetensors"
    r = cli("precompute", ckpt, "-o", out)
    assert r.code == 6 and "cannot write the staging state: No space left on device" in r.err, r.err
    assert "--resume" in r.err and not out.exists() and not temps(out)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    gc.collect()
    r = cli("precompute", ckpt, "-o", out, "--resume")
    assert r.code == 0 and "resuming: 1 layer(s)" in r.err and verifies(out)


def test_an_unsearchable_output_directory_exits_6(ckpt: Path, dense: Path, tmp_path: Path, cli, monkeypatch) -> None:
    """A non-root user writing under a directory they may not search: lstat fails with EACCES."""
    private = tmp_path / "private"
    lstat, stat_ = os.lstat, os.stat

    def denied(fn):
        def call(p, *a, **k):
            if str(private) in os.fspath(p):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(p))
            return fn(p, *a, **k)

        return call

    monkeypatch.setattr(os, "lstat", denied(lstat))
    monkeypatch.setattr(os, "stat", denied(stat_))
    for args in (["strip", ckpt, "-o", private / "x"], ["convert", dense, private / "x.safetensors"]):
        r = cli(*args)
        assert r.code == 6 and "Permission denied" in r.err, r.err


def test_recogniser_names_agree_with_the_writers() -> None:
    from tolcli import fsutil
    from tolcli.checkpoint import CONFIG_NAME, ST_SINGLE, TOKENIZER_NAME

    assert fsutil._INDEX_NAME == sharded.INDEX_NAME and fsutil._SHARDED_FORMAT == sharded.SHARDED_FORMAT
    assert set(fsutil._STRIPPED_FILES) == {CONFIG_NAME, ST_SINGLE, TOKENIZER_NAME}


# ---- a bounded, seeded set of concurrent writers and symlinked paths -----------------------------------------------
COMMANDS = ["precompute", "precompute-sharded", "compress", "convert", "convert-sharded", "drop", "strip"]
EXISTING = ["none", "link-file", "link-dir", "dangling", "own", "foreign-dir", "bundle-plus-extra", "empty-dir", "file"]
PLANTS = [".{n}.partial", ".{n}.partial.lock", ".{n}.lock", ".{n}.tmp-{pid}", ".{n}.tmp-dist", ".{n}.tmp-abcd1234"]
RIVALS = ["none", "none", "holder-output", "holder-staging", "threads"]
N_CASES = 140

HOLDER = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from tolcli.fsutil import OutputLock
held = {{}}
for line in sys.stdin:
    cmd, path = line.split(" ", 1)
    path = path.strip()
    if cmd == "lock":
        try:
            held[path] = OutputLock(Path(path), Path(path)).acquire()
            print("locked", flush=True)
        except Exception as e:
            print("error", e, flush=True)
    else:
        held.pop(path).release()
        print("released", flush=True)
"""


class Holder:
    """Another process holding a lock file, on demand."""

    def __init__(self) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-c", HOLDER.format(root=str(ROOT))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, line: str) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    ck = write_random_checkpoint(d / "ckpt", tiny_config("memoryllm"))
    dense = precompute(ck, d / "dense.safetensors").path
    many = convert_bundle(dense, d / "many", max_shard_size="20kB")
    return {"ckpt": ck, "dense": dense, "many": many}


def out_name(command: str) -> str:
    return {
        "precompute": "out.safetensors",
        "compress": "out.safetensors",
        "convert": "out.h5",
        "drop": "out.safetensors",
    }.get(command, "out")


def run_command(command: str, inputs: dict[str, Path], out: Path, force: bool, resume: bool) -> str:
    """Run one command through the library; 'ok' or the error's class and message (exit code first)."""
    try:
        if command.startswith("precompute"):
            shard = "20kB" if command.endswith("sharded") else None
            precompute(inputs["ckpt"], out, force=force, resume=resume, max_shard_size=shard)
        elif command == "compress":
            compress(inputs["dense"], out, CompressOptions("int8"), force=force, resume=resume)
        elif command.startswith("convert"):
            shard = "20kB" if command.endswith("sharded") else None
            convert_bundle(inputs["dense"], out, force=force, max_shard_size=shard)
        elif command == "drop":
            drop_layers(inputs["dense"], out, drop_last=1, force=force)
        else:
            strip_checkpoint(inputs["ckpt"], out, force=force)
    except TolcliError as e:
        return f"{int(e.exit_code)} {e.message}"
    except Exception as e:  # an internal error: what the invariant below refuses
        return f"1 {type(e).__name__}: {e}"
    return "0 ok"


def category(result: str) -> str:
    code, _, msg = result.partition(" ")
    for pattern, name in [
        ("another tolcli run", "locked by another run"),
        ("output exists", "exists without --force"),
        ("--force replaces only", "not a directory tolcli wrote"),
        ("symbolic link", "planted symlink refused"),
        ("not a staging directory", "bad staging directory"),
        ("directory", "directory output needs --max-shard-size"),
    ]:
        if pattern in msg:
            return f"{code} {name}"
    return f"{code} {msg[:60]}"


def output_state(out: Path) -> Any:
    st = os.lstat(out) if os.path.lexists(out) else None
    if st is None:
        return None
    if out.is_symlink():
        return ("link", os.readlink(out))
    if out.is_dir():
        return ("dir", tree(out))
    return ("file", out.read_bytes())


def check_written(command: str, out: Path) -> None:
    assert not out.is_symlink()
    if command == "strip":
        assert open_checkpoint(out).config.stripped
    else:
        assert verifies(out)


def test_generated_concurrent_writers_and_symlinked_paths(inputs: dict[str, Path], tmp_path: Path, victims) -> None:
    rng = random.Random(20240611)
    holder = Holder()
    counts: collections.Counter[str] = collections.Counter()
    per_command: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    t_start = time.monotonic()
    try:
        for case in range(N_CASES):
            command, existing, rival = rng.choice(COMMANDS), rng.choice(EXISTING), rng.choice(RIVALS)
            force, resume = rng.random() < 0.7, command in ("precompute", "compress") and rng.random() < 0.3
            plants = rng.sample(PLANTS, k=rng.choice([0, 0, 1, 2]))
            d = tmp_path / f"case{case:03d}"
            d.mkdir()
            out = d / out_name(command)
            label = f"case {case}: {command} existing={existing} rival={rival} force={force} plants={plants}"
            # what is at the output before
            if existing == "link-file":
                out.symlink_to(victims[0])
            elif existing == "link-dir":
                out.symlink_to(victims[1])
            elif existing == "dangling":
                out.symlink_to(d / "nowhere")
            elif existing == "own":
                assert run_command(command, inputs, out, False, False) == "0 ok", label
            elif existing == "foreign-dir":
                (out / "src").mkdir(parents=True)
                (out / "src" / "a.py").write_text("x = 1\n")
            elif existing == "bundle-plus-extra":
                shutil.copytree(inputs["many"], out)
                (out / "notes.txt").write_text("mine\n")
            elif existing == "empty-dir":
                out.mkdir()
            elif existing == "file":
                out.write_text("a user's file\n")
            planted = []
            for k, pattern in enumerate(plants):
                p = d / pattern.format(n=out.name, pid=os.getpid())
                if not os.path.lexists(p):
                    p.symlink_to(victims[k % 2])
                    planted.append(p.name)
            before_victims = snapshot(list(victims))
            before_out = output_state(out)
            held = None
            if rival.startswith("holder"):
                held = str(lock_path(out) if rival == "holder-output" else lock_path(d / f".{out.name}.partial"))
                reply = holder.ask(f"lock {held}")
                if reply != "locked":
                    held = None  # a planted symlink there: the holder is refused too
            t0 = time.monotonic()
            if rival == "threads":
                results: list[str] = []
                job = (command, inputs, out, force, resume)
                threads = [
                    threading.Thread(target=lambda j=job, r=results: r.append(run_command(*j))) for _ in range(2)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=60)
                assert not any(t.is_alive() for t in threads), f"{label}: hung"
            else:
                results = [run_command(command, inputs, out, force, resume)]
            assert time.monotonic() - t0 < 60, f"{label}: took too long"
            if held is not None:
                assert holder.ask(f"unlock {held}") == "released"
            gc.collect()
            # invariants
            for res in results:
                assert res.split(" ", 1)[0] in ("0", "2", "6"), f"{label}: {res}"
                counts[category(res)] += 1
            per_command[command] += 1
            kinds[f"rival={rival}"] += 1
            kinds[f"existing={existing}"] += 1
            kinds["with planted links" if planted else "without planted links"] += 1
            assert snapshot(list(victims)) == before_victims, f"{label}: a victim outside the output changed"
            if any(r.startswith("0 ") for r in results):
                check_written(command, out)
            else:
                assert output_state(out) == before_out, f"{label}: a refused run changed the output"
            assert {p.name for p in leftovers(out)} <= set(planted), f"{label}: {leftovers(out)}"
            left_locks = {p.name for p in d.iterdir() if p.name.endswith(".lock")}
            assert left_locks <= set(planted), f"{label}: lock files left: {left_locks}"
            if rival == "holder-output" and held is not None and command.startswith(("precompute", "compress")):
                pass  # the run computed every layer and was refused at assembly: its staging is kept for --resume
    finally:
        holder.close()
    elapsed = time.monotonic() - t_start
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    print(f"\n{N_CASES} generated cases in {elapsed:.1f}s; runs by outcome: {summary}")
    print(f"by command: {dict(per_command)}; cases: {dict(sorted(kinds.items()))}")
    assert sum(per_command.values()) == N_CASES >= 100
    assert counts["0 ok"] >= 20 and any(k.startswith("6 locked") for k in counts)
    assert not any(re.match(r"1 ", k) for k in counts)
