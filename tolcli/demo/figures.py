"""The demo models' README figures: held-out perplexity and parameter counts (``python -m tolcli.demo``)."""

from __future__ import annotations

import math

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
    """Held-out perplexity and bits per byte (lm-eval's definition, NLL of the scored tokens over the text's UTF-8
    bytes) of the demo models (memoryllm, llama, memoryllm with FFN memory zeroed) and their parameter counts,
    as quoted in the README."""
    out: dict[str, float | int] = {}
    nbytes = len(demo_heldout_path().read_text(encoding="utf-8").encode("utf-8"))
    for kind in DEMO_MODELS:
        ckpt = open_checkpoint(demo_checkpoint_path(kind))
        assert ckpt.tokenizer_path is not None
        tokens = read_tokens(demo_heldout_path(), load_tokenizer(ckpt.tokenizer_path), ckpt.config.vocab_size)
        model = load_model(ckpt)
        params = parameter_counts(ckpt.config, set(ckpt.tensors))
        out[f"{kind}_params_total"] = params["total"]
        out[f"{kind}_params_active"] = params["active"]
        own = score(model, tokens, ctx=ctx, stride=stride)
        out[f"{kind}_ppl"] = own.perplexity
        out[f"{kind}_bpb"] = own.nll_sum / (nbytes * math.log(2))
        if ckpt.config.has_memory:
            zeroed = score(model, tokens, ctx=ctx, stride=stride, source=ZeroSource())
            out[f"{kind}_ppl_memory_zeroed"] = zeroed.perplexity
            out[f"{kind}_bpb_memory_zeroed"] = zeroed.nll_sum / (nbytes * math.log(2))
        out["heldout_tokens"] = tokens.numel()
    out["heldout_bytes"] = nbytes
    return out
