"""Checkpoints named by Hub id or by a Hugging Face cache folder, resolved offline (``tolcli/hub.py``).

The cache is built here the way huggingface_hub lays it out (``models--ORG--NAME/{refs,snapshots,blobs}``, each
snapshot file a relative link ``../../blobs/<sha256>``), and huggingface_hub's own offline reader is the independent
reference that it is a real cache and that tolcli picks the same snapshot. Sockets fail in every test of this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import require

from tolcli.errors import ExitCode, UsageError
from tolcli.hub import MAX_REF_BYTES, check_revision, hub_cache_dir, is_repo_id
from tolcli.testing import tiny_config, write_random_checkpoint

COMMIT_A = hashlib.sha1(b"first").hexdigest()
COMMIT_B = hashlib.sha1(b"second").hexdigest()


@dataclass
class Cache:
    root: Path  # HF_HUB_CACHE
    repo: Path  # models--org--tiny
    src_a: Path  # the checkpoint at main, as a plain directory named like its snapshot
    src_b: Path  # the checkpoint at tag v2 (another config)

    def snapshot(self, commit: str) -> Path:
        return self.repo / "snapshots" / commit


def cache_snapshot(repo: Path, source: Path, commit: str, refs: tuple[str, ...] = ()) -> Path:
    """Put checkpoint directory ``source`` into cache repo folder ``repo`` as huggingface_hub does: bytes in
    ``blobs/<sha256>``, ``snapshots/<commit>/<name>`` a relative link to its blob, ``refs/<ref>`` holding the commit."""
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(source.iterdir()):
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", digest))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, like huggingface_hub
    return snap


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cache:
    """``org/tiny`` in a fresh cache: main -> a 3-layer model, tag v2 -> a 2-layer model of another width."""
    src_a = write_random_checkpoint(tmp_path / "src" / COMMIT_A, tiny_config(), seed=1)
    src_b = write_random_checkpoint(
        tmp_path / "src" / COMMIT_B, tiny_config(num_hidden_layers=2, hidden_size=48), seed=2
    )
    root = tmp_path / "hf" / "hub"
    repo = root / "models--org--tiny"
    cache_snapshot(repo, src_a, COMMIT_A, refs=("main",))
    cache_snapshot(repo, src_b, COMMIT_B, refs=("v2",))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return Cache(root, repo, src_a, src_b)


def info_json(cli, *args: Any) -> dict[str, Any]:
    r = cli("info", *args, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


def test_a_hub_id_reads_the_cached_snapshot_as_huggingface_hub_resolves_it(cli, cache: Cache) -> None:
    hf = require("huggingface_hub")
    doc, ref = info_json(cli, "org/tiny"), info_json(cli, cache.src_a)
    assert doc["config"] == ref["config"] and doc["parameters"] == ref["parameters"]
    assert doc["config"]["num_hidden_layers"] == 3 and doc["config"]["hidden_size"] == 32
    assert doc["checkpoint"] == str(cache.snapshot(COMMIT_A))
    # huggingface_hub's own offline resolution of the same cache: the same folders
    for revision, commit in ((None, COMMIT_A), ("v2", COMMIT_B), (COMMIT_B, COMMIT_B)):
        got = hf.snapshot_download("org/tiny", revision=revision, cache_dir=cache.root, local_files_only=True)
        assert Path(got).resolve() == cache.snapshot(commit).resolve()


@pytest.mark.parametrize("revision", ["v2", COMMIT_B])
def test_revision_picks_another_snapshot(cli, cache: Cache, revision: str) -> None:
    ref_a, ref_b = info_json(cli, cache.src_a), info_json(cli, cache.src_b)
    assert ref_a["config"] != ref_b["config"]
    for name in ("org/tiny", cache.repo):
        doc = info_json(cli, name, "--revision", revision)
        assert doc["config"] == ref_b["config"] and doc["checkpoint"] == str(cache.snapshot(COMMIT_B))


def test_cache_folder_and_snapshot_paths_work(cli, cache: Cache) -> None:
    ref = info_json(cli, cache.src_a)["config"]
    assert info_json(cli, cache.repo)["config"] == ref  # models--org--tiny: its main snapshot
    assert info_json(cli, cache.snapshot(COMMIT_A))["config"] == ref  # a snapshot folder: links into blobs/ are fine


def test_an_existing_local_path_wins_over_a_hub_id(cli, cache: Cache, tmp_path: Path, monkeypatch) -> None:
    local = tmp_path / "cwd"
    shutil.copytree(cache.src_b, local / "org" / "tiny")
    monkeypatch.chdir(local)
    assert info_json(cli, "org/tiny")["config"] == info_json(cli, cache.src_b)["config"]


def test_the_cache_root_is_refused_naming_its_models(cli, cache: Cache) -> None:
    r = cli("info", cache.root)
    assert r.code == ExitCode.BAD_INPUT and "Hugging Face cache folder (1 model: org/tiny)" in r.err, r.err
    (cache.root / "models--other--m" / "snapshots").mkdir(parents=True)
    r = cli("info", cache.root)
    assert r.code == ExitCode.BAD_INPUT, r.err
    assert "Hugging Face cache folder (2 models: org/tiny, other/m)" in r.err and "name one model" in r.err


def test_an_id_not_in_the_cache_names_the_cache_and_how_to_download(cli, cache: Cache) -> None:
    r = cli("info", "org/absent")
    assert r.code == ExitCode.BAD_INPUT and r.err.count("\n") == 1, r.err
    assert f"org/absent is not in the local Hugging Face cache ({cache.root}); tolcli never downloads" in r.err
    assert "(hint: download it with 'hf download org/absent' (" in r.err and "set HF_HUB_CACHE" in r.err
    r = cli("info", "org/tiny", "--revision", "v9")
    assert r.code == ExitCode.BAD_INPUT, r.err
    assert f"{cache.repo}: revision 'v9' is not in the local cache (no refs/v9; cached: 'main', 'v2')" in r.err
    assert "'hf download org/tiny --revision v9'" in r.err


def test_a_missing_huggingface_cache_is_not_in_cache(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nowhere"))
    r = cli("info", "org/tiny")
    assert r.code == ExitCode.BAD_INPUT and "not in the local Hugging Face cache" in r.err, r.err


@pytest.mark.parametrize(
    "revision", ["../x", "refs/../../x", "/abs", "a//b", ".hidden", "v1..2", "", "x" * 256, "a\x00b", "a b"]
)
def test_a_revision_that_is_no_ref_name_is_refused_before_any_read(cli, cache: Cache, revision: str) -> None:
    (cache.repo / "x").write_text(COMMIT_B)  # what refs/../x would read
    with pytest.raises(UsageError):
        check_revision(revision)
    for name in ("org/tiny", cache.repo, "org/absent"):
        r = cli("info", name, "--revision", revision)
        assert r.code == ExitCode.USAGE and "--revision" in r.err and "is not a branch, tag or commit" in r.err, r.err


@pytest.mark.parametrize("where", ["demo", "plain", "missing"])
def test_revision_on_a_plain_path_is_a_usage_error(cli, cache: Cache, tmp_path: Path, where: str) -> None:
    arg = {"demo": "demo", "plain": str(cache.src_a), "missing": str(tmp_path / "nothing")}[where]
    r = cli("info", arg, "--revision", "main")
    assert r.code == ExitCode.USAGE and "--revision applies to Hub ids" in r.err, r.err
    assert cli("info", tmp_path / "nothing").code == ExitCode.BAD_INPUT  # without it: the usual "not found"


def _link_file_out(cache: Cache, outside: Path) -> None:
    shutil.copy(cache.src_a / "config.json", outside / "config.json")  # valid content: only the place is wrong
    (cache.snapshot(COMMIT_A) / "config.json").unlink()
    (cache.snapshot(COMMIT_A) / "config.json").symlink_to(outside / "config.json")


def _link_snapshot_out(cache: Cache, outside: Path) -> None:
    shutil.copytree(cache.src_a, outside / "ckpt")
    shutil.rmtree(cache.snapshot(COMMIT_A))
    cache.snapshot(COMMIT_A).symlink_to(outside / "ckpt")


def _link_ref_out(cache: Cache, outside: Path) -> None:
    (outside / "ref").write_text(COMMIT_A)
    (cache.repo / "refs" / "main").unlink()
    (cache.repo / "refs" / "main").symlink_to(outside / "ref")


@pytest.mark.parametrize("tamper", [_link_file_out, _link_snapshot_out, _link_ref_out])
def test_links_out_of_the_cache_are_refused(cli, cache: Cache, tmp_path: Path, tamper) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tamper(cache, outside)
    for arg in ("org/tiny", cache.repo):
        r = cli("info", arg)
        assert r.code == ExitCode.BAD_INPUT and "is a link that leaves its directory" in r.err, r.err
        assert str(outside) in r.err


def test_a_snapshot_may_not_link_into_another_repo_of_the_cache(cli, cache: Cache) -> None:
    """A snapshot's files link into their own repo folder's blobs/; even another repo of the same cache is out."""
    other = cache.root / "models--other--m" / "blobs"
    other.mkdir(parents=True)
    _link_file_out(cache, other)
    for arg in ("org/tiny", cache.repo, cache.snapshot(COMMIT_A)):
        r = cli("info", arg)
        assert r.code == ExitCode.BAD_INPUT and "leaves its directory" in r.err, r.err


def test_a_snapshot_given_directly_still_may_not_link_out(cli, cache: Cache, tmp_path: Path) -> None:
    """The checkpoint reader itself: a snapshot's files may link into their repo folder, nowhere else."""
    (tmp_path / "outside").mkdir()
    _link_file_out(cache, tmp_path / "outside")
    r = cli("info", cache.snapshot(COMMIT_A))
    assert r.code == ExitCode.BAD_INPUT and "leaves its directory" in r.err, r.err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"a" * (MAX_REF_BYTES + 1), f"ref has {MAX_REF_BYTES + 1:,} bytes (limit {MAX_REF_BYTES:,})"),
        (b"not a commit", "ref does not hold a commit hash (it holds 'not a commit')"),
        (COMMIT_A.encode() + b"\n" + COMMIT_B.encode(), "ref does not hold a commit hash"),
        (COMMIT_A.upper().encode(), "ref does not hold a commit hash"),
        (b"\xff" * 40, "ref does not hold a commit hash"),
        ("a" * 40, "commit aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa (refs/main) has no snapshot in the cache"),
        ("dir", "ref is a directory, not a regular file"),
        ("fifo", "ref is a FIFO, not a regular file"),
    ],
)
def test_hostile_refs_are_refused(cli, cache: Cache, content: bytes | str, message: str) -> None:
    ref = cache.repo / "refs" / "main"
    ref.unlink()
    if content == "dir":
        ref.mkdir()
    elif content == "fifo":
        os.mkfifo(ref)  # would block a reader forever: refused before it is opened
    else:
        ref.write_bytes(content if isinstance(content, bytes) else content.encode())
    r = cli("info", "org/tiny")
    assert r.code == ExitCode.BAD_INPUT and message in r.err, r.err


def test_a_ref_with_a_trailing_newline_is_accepted(cli, cache: Cache) -> None:
    (cache.repo / "refs" / "main").write_text(COMMIT_B + "\n")
    assert info_json(cli, "org/tiny")["config"]["num_hidden_layers"] == 2


@pytest.mark.parametrize("revision", [None, "v2"])
def test_precompute_by_hub_id_is_byte_identical_to_the_directory(
    cli, cache: Cache, tmp_path: Path, revision: str | None
) -> None:
    src = cache.src_a if revision is None else cache.src_b
    by_id, by_dir = tmp_path / "id.safetensors", tmp_path / "dir.safetensors"
    rev = () if revision is None else ("--revision", revision)
    assert cli("precompute", "org/tiny", "-o", by_id, "--quiet", *rev).code == 0
    assert cli("precompute", src, "-o", by_dir, "--quiet").code == 0
    assert by_id.read_bytes() == by_dir.read_bytes()


REPO_ID_CANDIDATES = [
    "org/tiny",
    "Org-1/na_me.v2",
    "_o/_x",
    "a/b",
    "org/-x",
    "org/x-",
    "-org/x",
    "org/.x",
    "org/x.",
    "org/a--b",
    "org/a..b",
    "a/b/c",
    "org/x.git",
    "./x",
    "../x",
    "/abs/x",
    "org/",
    "/x",
    "tiny",
    "o/" + "x" * 96,
    "o/" + "x" * 97,
    "ü/x",
    "org/ti ny",
    "org\\tiny",
]


def test_the_hub_id_rule_is_huggingface_hubs(monkeypatch) -> None:
    """Reference: huggingface_hub's validate_repo_id, restricted to ids with an organisation (``org/name``)."""
    validators = require("huggingface_hub.utils")

    def hf_accepts(text: str) -> bool:
        try:
            validators.validate_repo_id(text)
        except validators.HFValidationError:
            return False
        return "/" in text

    expected = {c: hf_accepts(c) for c in REPO_ID_CANDIDATES}
    assert sum(expected.values()) == 5  # the four plain ones and the 96-character name
    assert {c: is_repo_id(c) for c in REPO_ID_CANDIDATES} == expected


HF_ENV = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
ENV_CASES: list[dict[str, str]] = [
    {},
    {"HF_HUB_CACHE": "/c/hub"},
    {"HF_HOME": "/h"},
    {"XDG_CACHE_HOME": "/x"},
    {"HUGGINGFACE_HUB_CACHE": "/legacy"},
    {"HF_HOME": "/h", "HF_HUB_CACHE": "/c/hub", "XDG_CACHE_HOME": "/x"},
    {"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"},
    {"HF_HOME": "~/hf"},
    {"HF_HUB_CACHE": "$HOME/c"},
]


def test_the_cache_location_follows_huggingface_hubs_environment_rule(monkeypatch, tmp_path: Path) -> None:
    """Reference: huggingface_hub.constants.HF_HUB_CACHE, computed in a fresh interpreter for each environment."""
    require("huggingface_hub")
    script = (
        "import importlib, json, os, sys\n"
        "from huggingface_hub import constants\n"
        "out = []\n"
        "for case in json.loads(sys.argv[1]):\n"
        f"    for k in {HF_ENV!r}: os.environ.pop(k, None)\n"
        "    os.environ.update(case)\n"
        "    out.append(importlib.reload(constants).HF_HUB_CACHE)\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in HF_ENV} | {"HOME": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-c", script, json.dumps(ENV_CASES)], capture_output=True, text=True, env=env, check=True
    )
    expected = json.loads(r.stdout)
    monkeypatch.setenv("HOME", str(tmp_path))
    got = []
    for case in ENV_CASES:
        for k in HF_ENV:
            monkeypatch.delenv(k, raising=False)
        for k, v in case.items():
            monkeypatch.setenv(k, v)
        got.append(str(hub_cache_dir()))
    assert got == expected
    assert expected[0] == str(tmp_path / ".cache" / "huggingface" / "hub")
