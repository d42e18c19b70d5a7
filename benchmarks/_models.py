"""Synthetic checkpoints and tables for benchmarks (bigger than the demo, still minutes on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import torch

from tolcli.testing import tiny_config, write_random_checkpoint


def synthetic_checkpoint(directory: Path, *, vocab: int, hidden: int, ffn: int, layers: int) -> Path:
    cfg = tiny_config(
        "memoryllm",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    return write_random_checkpoint(directory, cfg, seed=0)


def decaying_table(rows: int, cols: int, decay: float = 0.99, seed: int = 0) -> torch.Tensor:
    """A table with a smoothly decaying spectrum, like real ToLs (not low-rank, not white)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, cols, generator=g)).Q
    v = torch.linalg.qr(torch.randn(cols, cols, generator=g)).Q
    return (u * decay ** torch.arange(cols).float()) @ v.T * rows**0.5
