"""The shipped demo models (trained by ``scripts/build_demo.py``) and their held-out text.

``demo`` (or ``demo:memoryllm``) and ``demo:llama`` can be given wherever the CLI takes a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from tolcli.errors import InputError, UsageError
from tolcli.jsonsafe import short

DEMO_DIR = Path(__file__).resolve().parent
DEMO_MODELS: tuple[str, ...] = ("memoryllm", "llama")


def demo_checkpoint_path(kind: str = "memoryllm") -> Path:
    """Directory of a shipped demo checkpoint: ``memoryllm`` (default) or ``llama``.

    Example:
        >>> from tolcli import demo_checkpoint_path
        >>> sorted(p.name for p in demo_checkpoint_path("llama").iterdir())
        ['config.json', 'model.safetensors', 'tokenizer.json']
    """
    if kind not in DEMO_MODELS:
        raise InputError(f"unknown demo model {kind!r}; expected one of {', '.join(DEMO_MODELS)}")
    return DEMO_DIR / kind


def demo_heldout_path() -> Path:
    """Held-out text (standard-library docstrings never seen in training) for evaluating the demos.

    Example:
        >>> from tolcli import demo_heldout_path
        >>> text = demo_heldout_path().read_text(encoding="utf-8")
        >>> len(text) > 60_000, text.split(chr(10))[0]
        (True, 'Simple class to read IFF chunks.')
    """
    return DEMO_DIR / "heldout.txt"


def resolve_checkpoint_arg(arg: str | Path, *, revision: str | None = None) -> Path:
    """The checkpoint path a command's CHECKPOINT argument names, in this order: ``demo`` / ``demo:NAME`` (the
    shipped demos); an existing path (a ``models--ORG--NAME`` folder of the Hugging Face cache becomes its snapshot);
    a Hub id ``org/name`` found in the local cache (:mod:`tolcli.hub`; never downloaded); otherwise the path as given,
    so that the checkpoint reader reports it missing.

    ``revision`` (branch, tag or commit) applies to Hub ids and cache folders only; with anything else it is a
    :class:`~tolcli.errors.UsageError` rather than silently ignored.

    Example:
        >>> resolve_checkpoint_arg("demo:llama").name, resolve_checkpoint_arg("./my-model").name
        ('llama', 'my-model')
    """
    from tolcli import hub

    s = str(arg)
    if s == "demo" or s.startswith("demo:"):
        path = demo_checkpoint_path(s.split(":", 1)[1]) if ":" in s else demo_checkpoint_path()
    else:
        snapshot = hub.resolve_hub(s, revision=revision)
        if snapshot is not None:
            return snapshot
        path = Path(arg)
    if revision is not None:
        raise UsageError(
            f"`revision` applies to Hub ids and Hugging Face cache folders, not to {short(s, 120)}",
            hint="drop --revision, or name the model by its Hub id (org/name)",
        )
    return path
