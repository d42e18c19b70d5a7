"""The shipped demo models (trained by ``scripts/build_demo.py``) and their held-out text.

``demo`` (or ``demo:memoryllm``) and ``demo:llama`` can be given wherever the CLI takes a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from tolcli.errors import InputError

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
    """Map ``demo`` / ``demo:NAME`` to the shipped demo; any other value is a path.

    ``revision`` is for Hub ids resolved from the local Hugging Face cache (:mod:`tolcli.hub`)."""
    s = str(arg)
    if s == "demo":
        return demo_checkpoint_path()
    if s.startswith("demo:"):
        return demo_checkpoint_path(s.split(":", 1)[1])
    return Path(arg)
