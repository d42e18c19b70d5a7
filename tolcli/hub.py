"""Checkpoints named by a Hub id (``org/name``) or by a folder of the local Hugging Face cache, resolved offline.

tolcli never downloads. A Hub id is looked up in the cache that ``huggingface_hub`` fills
(``hf download org/name``), laid out as::

    <cache>/models--ORG--NAME/
        refs/main                      the commit the branch or tag points to (40 hex digits, nothing else)
        snapshots/<commit>/config.json -> ../../blobs/<hash>   (each file a relative link into blobs/)
        blobs/<hash>

The cache is ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub`` (huggingface_hub's rule), read from the
environment at each call. Resolution is done here, without huggingface_hub (which needs not be installed), because
the cache is read as untrusted input: the revision is checked before it becomes part of a path (no ``../``), a ref
file is a bounded regular file inside ``refs/`` holding exactly one commit hash, and the snapshot must resolve inside
the repo's own cache folder. The checkpoint reader then lets the snapshot's files link into that folder (``blobs/``,
see :func:`link_root`) and nowhere else.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

from tolcli.errors import InputError, UsageError
from tolcli.jsonsafe import cut, inside, read_bytes, short

DEFAULT_REVISION = "main"
REPO_PREFIX = "models--"
MAX_REF_BYTES = 256  # a ref holds a 40-character commit hash
MAX_SCAN = 10_000  # directory entries looked at to tell a cache root or list refs
MAX_REVISION_CHARS = 255

_COMMIT = re.compile(r"[0-9a-f]{40}")
# huggingface_hub's rule (validate_repo_id): parts of 1-96 of [A-Za-z0-9_.-], not starting or ending with - or .
_ID_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_ID_PART}/{_ID_PART}")
# One component of a branch or tag name: never "." or "..", never starting with "." (git's rule).
_REF_PART = re.compile(r"[A-Za-z0-9_+=@-][A-Za-z0-9_.+=@-]*")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` is a Hub model id ``org/name`` (huggingface_hub's characters; no ``--`` or ``..``).

    Example:
        >>> [is_repo_id(s) for s in ("org/tiny", "./tiny", "/abs/x", "org/a--b", "a/b/c", "org/x.git")]
        [True, False, False, False, False, False]
    """
    return bool(_REPO_ID.fullmatch(text)) and "--" not in text and ".." not in text and not text.endswith(".git")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as it is now (huggingface_hub's precedence).

    Example:
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"HF_HUB_CACHE": "~/hf", "HOME": "/home/me"}):
        ...     str(hub_cache_dir())
        '/home/me/hf'
    """
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def repo_id_of(folder: Path) -> str:
    """``models--org--name`` -> ``org/name`` (a Hub id never contains ``--``)."""
    return folder.name[len(REPO_PREFIX) :].replace("--", "/")


def download_hint(repo_id: str, revision: str | None = None) -> str:
    """How to put a repo into the cache (tolcli itself never downloads)."""
    rev = f" --revision {revision}" if revision else ""
    cmd = f"hf download {repo_id}{rev}"
    return f"download it with '{cmd}' ('huggingface-cli download' before huggingface_hub 1.0), then rerun"


def check_revision(revision: str) -> str:
    """``revision`` if it is a branch, tag or commit name that cannot leave ``refs/`` (no ``..``, no absolute path).

    Example:
        >>> check_revision("refs/pr/1")
        'refs/pr/1'
        >>> try:
        ...     check_revision("../x")
        ... except UsageError as e:
        ...     print(e.message)
        `revision` '../x' is not a branch, tag or commit name
    """
    parts = revision.split("/")
    if len(revision) > MAX_REVISION_CHARS or not all(_REF_PART.fullmatch(p) for p in parts) or ".." in revision:
        raise UsageError(
            f"`revision` {short(revision, 80)} is not a branch, tag or commit name",
            hint="use a name such as main, v1.0 or refs/pr/1, or a 40-digit commit hash",
        )
    return revision


def resolve_hub(arg: str, *, revision: str | None = None) -> Path | None:
    """The snapshot directory that ``arg`` names in the local Hugging Face cache, or None for an ordinary path.

    - an existing ``models--ORG--NAME`` folder: its snapshot for ``revision`` (default ``main``);
    - an existing cache root (a folder holding ``models--*`` folders): refused, the user must name the repo;
    - any other existing path, or a string that is not a Hub id: None (the caller uses it as a path);
    - a Hub id ``org/name``: its snapshot in :func:`hub_cache_dir`; an :class:`InputError` when it is not cached.

    ``revision`` is a branch or tag (looked up in ``refs/``) or a commit hash (a ``snapshots/`` folder).

    Example:
        >>> resolve_hub("./not-a-hub-id") is None
        True
    """
    if os.path.exists(arg):
        real = Path(os.path.realpath(arg))
        if real.is_dir() and real.name.startswith(REPO_PREFIX):
            return cached_snapshot(real, revision)
        _refuse_cache_root(real)
        return None
    if not is_repo_id(arg):
        return None
    if revision is not None:
        check_revision(revision)  # before it appears in a message
    return cached_snapshot(_repo_folder(arg, revision), revision)


def _repo_folder(repo_id: str, revision: str | None) -> Path:
    """``repo_id``'s folder in the cache, or an InputError naming the cache searched."""
    cache = hub_cache_dir()
    folder = cache / (REPO_PREFIX + repo_id.replace("/", "--"))
    if not folder.is_dir():
        raise InputError(
            f"{repo_id} is not in the local Hugging Face cache ({cut(str(cache), 200)}); tolcli never downloads",
            hint=f"{download_hint(repo_id, revision)}; or set HF_HUB_CACHE to the cache that holds it",
        )
    return folder


def _refuse_cache_root(directory: Path) -> None:
    """Refuse a cache root (a folder of ``models--*`` folders): the user must say which repo."""
    if not directory.is_dir():
        return
    with os.scandir(directory) as it:
        repos = [
            repo_id_of(Path(e.name))
            for e in itertools.islice(it, MAX_SCAN)
            if e.name.startswith(REPO_PREFIX) and e.is_dir()
        ]
    if repos:
        shown = ", ".join(sorted(repos)[:5]) + (", ..." if len(repos) > 5 else "")
        count = f"{len(repos)} model{'s' * (len(repos) > 1)}"
        raise InputError(
            f"this is a Hugging Face cache folder ({count}: {shown}), not a checkpoint",
            path=directory,
            hint=f"name one model: its Hub id ({sorted(repos)[0]}) or its {REPO_PREFIX}ORG--NAME folder",
        )


def cached_snapshot(folder: Path, revision: str | None = None) -> Path:
    """The snapshot of cache repo folder ``folder`` (``models--ORG--NAME``) for ``revision`` (default ``main``),
    refused unless it resolves inside ``folder`` (its files are checked by the checkpoint reader, see
    :func:`link_root`)."""
    rev = DEFAULT_REVISION if revision is None else check_revision(revision)
    commit = rev if _COMMIT.fullmatch(rev) else _read_ref(folder, rev)
    snapshot = folder / "snapshots" / commit
    if not snapshot.is_dir():
        via = "" if rev == commit else f" (refs/{rev})"
        raise InputError(
            f"commit {commit}{via} has no snapshot in the cache",
            path=folder,
            hint=download_hint(repo_id_of(folder), revision),
        )
    inside(snapshot, folder, what="snapshot")
    return snapshot


def _read_ref(folder: Path, rev: str) -> str:
    """The commit that ``refs/<rev>`` holds: a small regular file inside ``refs/``, exactly one commit hash."""
    ref = folder / "refs" / rev
    if not (ref.exists() or ref.is_symlink()):
        raise InputError(
            f"revision {short(rev, 80)} is not in the local cache (no refs/{rev}; cached: {_cached_refs(folder)})",
            path=folder,
            hint=download_hint(repo_id_of(folder), rev),
        )
    inside(folder / "refs", folder, what="refs folder")  # refs/ itself may not be a link out of the repo
    inside(ref, folder / "refs", what="ref")
    text = read_bytes(ref, max_bytes=MAX_REF_BYTES, what="ref").decode("ascii", "replace").strip()
    if not _COMMIT.fullmatch(text):
        raise InputError(f"ref does not hold a commit hash (it holds {short(text, 60)})", path=ref)
    return text


def _cached_refs(folder: Path) -> str:
    """The branch and tag names in ``refs/`` (top level, at most 10), for a message."""
    refs = folder / "refs"
    if not refs.is_dir():
        return "none"
    with os.scandir(refs) as it:
        names = sorted(e.name for e in itertools.islice(it, MAX_SCAN))
    return ", ".join(short(n, 40) for n in names[:10]) + (", ..." if len(names) > 10 else "") if names else "none"


def link_root(directory: str | Path) -> Path:
    """The folder that a checkpoint directory's files may link into: for a snapshot of the Hugging Face cache
    (``.../models--ORG--NAME/snapshots/<commit>``, whose files link to ``../../blobs/``), the repo folder; for any
    other directory, the directory itself.

    Example:
        >>> str(link_root("/c/models--org--tiny/snapshots/" + "a" * 40))
        '/c/models--org--tiny'
        >>> str(link_root("/data/my-model"))
        '/data/my-model'
    """
    real = Path(os.path.realpath(directory))
    if (
        _COMMIT.fullmatch(real.name)
        and real.parent.name == "snapshots"
        and real.parent.parent.name.startswith(REPO_PREFIX)
    ):
        return real.parent.parent
    return Path(directory)
