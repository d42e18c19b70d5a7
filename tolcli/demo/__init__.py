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


def resolve_checkpoint_arg(arg: str | Path) -> Path:
    """Map ``demo`` / ``demo:NAME`` to the shipped demo; any other value is a path."""
    s = str(arg)
    if s == "demo":
        return demo_checkpoint_path()
    if s.startswith("demo:"):
        return demo_checkpoint_path(s.split(":", 1)[1])
    return Path(arg)


# The README's evaluation protocol for the demo figures.
DEMO_CTX = 128
DEMO_STRIDE = 64


def demo_figures(ctx: int = DEMO_CTX, stride: int = DEMO_STRIDE) -> dict[str, float | int]:
    """Held-out perplexity of the demo models (memoryllm, llama, memoryllm with FFN memory zeroed) and
    their parameter counts, as quoted in the README."""
    from tolcli.checkpoint import open_checkpoint
    from tolcli.evaluate import score
    from tolcli.info import parameter_counts
    from tolcli.model import ZeroSource, load_model
    from tolcli.text import load_tokenizer, read_tokens

    out: dict[str, float | int] = {}
    for kind in DEMO_MODELS:
        ckpt = open_checkpoint(demo_checkpoint_path(kind))
        assert ckpt.tokenizer_path is not None
        tokens = read_tokens(demo_heldout_path(), load_tokenizer(ckpt.tokenizer_path), ckpt.config.vocab_size)
        model = load_model(ckpt)
        params = parameter_counts(ckpt.config, set(ckpt.tensors))
        out[f"{kind}_params_total"] = params["total"]
        out[f"{kind}_params_active"] = params["active"]
        out[f"{kind}_ppl"] = score(model, tokens, ctx=ctx, stride=stride).perplexity
        if ckpt.config.has_memory:
            out[f"{kind}_ppl_memory_zeroed"] = score(
                model, tokens, ctx=ctx, stride=stride, source=ZeroSource()
            ).perplexity
        out["heldout_tokens"] = tokens.numel()
    return out
