"""The demo models' README figures: held-out perplexity and parameter counts (``python -m tolcli.demo``)."""

from __future__ import annotations

from tolcli.checkpoint import open_checkpoint
from tolcli.demo import DEMO_MODELS, demo_checkpoint_path, demo_heldout_path
from tolcli.info import parameter_counts
from tolcli.model import ZeroSource, load_model
from tolcli.scoring import score
from tolcli.text import load_tokenizer, read_tokens

# The README's evaluation protocol for the demo figures.
DEMO_CTX = 128
DEMO_STRIDE = 64


def demo_figures(ctx: int = DEMO_CTX, stride: int = DEMO_STRIDE) -> dict[str, float | int]:
    """Held-out perplexity of the demo models (memoryllm, llama, memoryllm with FFN memory zeroed) and
    their parameter counts, as quoted in the README."""
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
