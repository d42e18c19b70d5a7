from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tolcli.cli import main
from tolcli.testing import tiny_config, write_random_checkpoint

torch.set_num_threads(2)


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
