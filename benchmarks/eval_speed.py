"""eval-ppl throughput with ToL bundles (dense, svd, int4) vs with the model's own FFNs (goal >= 1.0x)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks._util import best_of, row
from tolcli import (
    CompressOptions,
    compress,
    demo_checkpoint_path,
    demo_heldout_path,
    load_model,
    open_bundle,
    open_checkpoint,
    precompute,
)
from tolcli.scoring import score
from tolcli.text import load_tokenizer, read_tokens


def run() -> list[str]:
    ckpt = open_checkpoint(demo_checkpoint_path())
    model = load_model(ckpt)
    tokens = read_tokens(demo_heldout_path(), load_tokenizer(ckpt.tokenizer_path), ckpt.config.vocab_size)[:8192]
    out = ["eval-ppl on the demo model: 8,192 tokens, ctx 128, batch 8 (ratio = FFN time / bundle time)"]
    with tempfile.TemporaryDirectory() as d:
        dense = Path(d) / "dense.safetensors"
        precompute(ckpt, dense, dtype="fp32")
        paths = {"dense fp32": dense}
        paths["svd r64"] = compress(dense, Path(d) / "svd.safetensors", CompressOptions("svd", rank=64)).path
        paths["int4 g64"] = compress(dense, Path(d) / "int4.safetensors", CompressOptions("int4")).path
        with torch.no_grad():
            t_ffn = best_of(lambda: score(model, tokens, ctx=128, batch_size=8))
            out.append(row("own FFNs (baseline)", f"{8191 / t_ffn:,.0f} tok/s"))
            for name, p in paths.items():
                with open_bundle(p) as b:
                    src = b.as_source()
                    t = best_of(lambda src=src: score(model, tokens, ctx=128, batch_size=8, source=src))
                out.append(row(f"bundle: {name}", f"{8191 / t:,.0f} tok/s", t_ffn / t, "goal >= 1.0x"))
    return out
