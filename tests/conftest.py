from __future__ import annotations

import importlib
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tolcli.cli import main
from tolcli.testing import tiny_config, write_random_checkpoint

torch.set_num_threads(2)


def require(module: str) -> Any:
    """Import an optional test dependency: a skip on a developer's machine without it, a failure when ``CI`` is
    set, so that an independent cross-check can never silently turn into a skip in CI."""
    if os.environ.get("CI"):
        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"CI is set but {module!r} cannot be imported ({e}): install the dev extra")
    return pytest.importorskip(module)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run ``tolcli ARGS...`` in-process; returns exit code, stdout and stderr."""

    def run(*args: Any) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def make_ckpt(tmp_path: Path) -> Callable[..., Path]:
    """Write a random checkpoint: ``make_ckpt("memoryllm", layout="sharded", dtype=torch.bfloat16, hidden_size=48)``."""
    counter = itertools.count()

    def make(
        model_type: str = "memoryllm",
        *,
        layout: str = "safetensors",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        memory_norm_bias: bool = True,
        **overrides: Any,
    ) -> Path:
        cfg = tiny_config(model_type, **overrides)
        d = tmp_path / f"ckpt{next(counter)}"
        return write_random_checkpoint(d, cfg, seed=seed, dtype=dtype, layout=layout, memory_norm_bias=memory_norm_bias)  # type: ignore[arg-type]

    return make


@pytest.fixture
def hf_llama() -> Callable[..., Any]:
    """An independent reference: ``transformers.LlamaForCausalLM`` holding a tolcli checkpoint's weights.

    Returns ``(model, missing_keys, unexpected_keys)``; skips when transformers is not installed (fails in CI)."""
    transformers = require("transformers")

    def build(ckpt) -> tuple[Any, list[str], list[str]]:
        cfg = ckpt.config
        hf = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers,
                num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads,
                head_dim=cfg.head_dim,
                rms_norm_eps=cfg.rms_norm_eps,
                rope_theta=cfg.rope_theta,
                max_position_embeddings=cfg.max_position_embeddings,
                tie_word_embeddings=cfg.tie_word_embeddings,
                attention_bias=False,
                mlp_bias=False,
            )
        ).eval()
        missing, unexpected = hf.load_state_dict({n: ckpt.load(n) for n in ckpt.tensors}, strict=False)
        return hf, list(missing), list(unexpected)

    return build
