"""Random checkpoints for tests, benchmarks and users' own CI (no downloads).

Example:
    >>> import tempfile
    >>> from tolcli.testing import tiny_config, write_random_checkpoint
    >>> from tolcli import open_checkpoint
    >>> d = write_random_checkpoint(tempfile.mkdtemp(), tiny_config("memoryllm"))
    >>> open_checkpoint(d).config.hidden_size
    32
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from tolcli.checkpoint import CONFIG_NAME, PT_INDEX, PT_SINGLE, ST_INDEX, ST_SINGLE
from tolcli.config import ModelConfig
from tolcli.layout import expected_tensors

Layout = Literal["safetensors", "sharded", "bin", "sharded-bin"]


def tiny_config(model_type: str = "memoryllm", **overrides: Any) -> ModelConfig:
    """A small config of the given type (override any ``config.json`` key)."""
    base: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": 101,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    if model_type != "llama":
        base.update(memory_norm_type="layernorm", ffn_alpha=1.0)
    if model_type == "flex_memoryllm":
        base["context_intermediate_size"] = 40
    base.update(overrides)
    return ModelConfig.from_dict(base)


def random_state_dict(
    cfg: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32, memory_norm_bias: bool = True
) -> dict[str, torch.Tensor]:
    """Every tensor of the canonical layout, random (norm weights near 1, so the model is well scaled)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for spec in expected_tensors(cfg).values():
        if spec.optional and not (spec.name.endswith("memory_layernorm.bias") and memory_norm_bias):
            continue
        if len(spec.shape) == 1:
            t = 1.0 + 0.1 * torch.randn(spec.shape, generator=g)
            if spec.name.endswith(".bias"):
                t = 0.1 * torch.randn(spec.shape, generator=g)
        else:
            t = torch.randn(spec.shape, generator=g) * (spec.shape[-1] ** -0.5)
        out[spec.name] = t.to(dtype).contiguous()
    return out


def write_checkpoint(
    directory: str | Path,
    cfg: ModelConfig | dict[str, Any],
    state: dict[str, torch.Tensor],
    *,
    layout: Layout = "safetensors",
    shards: int = 2,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write ``config.json`` and weights in one of the accepted layouts; returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg_dict = cfg.to_dict() if isinstance(cfg, ModelConfig) else cfg
    (d / CONFIG_NAME).write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    names = sorted(state)
    if layout in ("safetensors", "bin"):
        if layout == "safetensors":
            save_file(state, str(d / ST_SINGLE), metadata={"format": "pt"})
        else:
            torch.save(state, d / PT_SINGLE)
    else:
        ext, index_name = (".safetensors", ST_INDEX) if layout == "sharded" else (".bin", PT_INDEX)
        prefix = "model" if layout == "sharded" else "pytorch_model"
        weight_map: dict[str, str] = {}
        for k in range(shards):
            part = {n: state[n] for n in names[k::shards]}
            fname = f"{prefix}-{k + 1:05d}-of-{shards:05d}{ext}"
            if ext == ".safetensors":
                save_file(part, str(d / fname), metadata={"format": "pt"})
            else:
                torch.save(part, d / fname)
            weight_map.update(dict.fromkeys(part, fname))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (d / index_name).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        (d / "tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
    return d


def write_random_checkpoint(
    directory: str | Path,
    cfg: ModelConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    layout: Layout = "safetensors",
    memory_norm_bias: bool = True,
    tokenizer: str | Path | None = None,
) -> Path:
    """A random checkpoint of ``cfg`` on disk (see :func:`write_checkpoint`)."""
    state = random_state_dict(cfg, seed=seed, dtype=dtype, memory_norm_bias=memory_norm_bias)
    return write_checkpoint(directory, cfg, state, layout=layout, tokenizer=tokenizer)


def write_word_tokenizer(path: str | Path, words: int = 100) -> Path:
    """A word-level tokenizer of ``words`` words ``w0 w1 ...`` plus ``[UNK]`` (``words + 1`` ids: 101, the
    vocabulary of :func:`tiny_config`), so that tests can read calibration text with tiny checkpoints."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate([*(f"w{i}" for i in range(words)), "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return Path(path)


def tiny_manifest(vocab: int = 3, hidden: int = 2) -> dict[str, Any]:
    """The manifest of a one-layer ``vocab`` x ``hidden`` dense fp32 bundle, for tests that write bundles by hand
    (``tensors`` is filled in by the writer)."""
    return {
        "format": "tolcli.tol",
        "format_version": 1,
        "tolcli_version": "test",
        "source": {"checkpoint": "x", "files": [], "config": {}},
        "model": {
            "type": "memoryllm",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_layers": 1,
            "ffn_alpha": 1.0,
            "memory_norm_type": "layernorm",
        },
        "vocabulary": {"size": vocab, "embedded": False, "tokenizer_sha256": None, "special_tokens": []},
        "layers": [
            {
                "index": 0,
                "status": "present",
                "codec": "dense",
                "params": {"dtype": "F32"},
                "tensors": {"table": "layers.0.table"},
                "stored_bytes": vocab * hidden * 4,
                "bits_per_value": 32.0,
            }
        ],
        "tensors": {},
    }


def write_layer_bundle(
    path: str | Path, codec: str, params: dict[str, Any], arrays: dict[str, Any], vocab: int, hidden: int
) -> Path:
    """A one-layer bundle whose layer is ``codec`` with ``params`` and the stored role -> numpy array ``arrays``,
    written by the library's writer (for tests and benchmarks that craft a layer's tensors by hand)."""
    import hashlib

    import numpy as np

    from tolcli.bundle.entries import TensorEntry
    from tolcli.bundle.writer import write_bundle

    names = {np.dtype("u1"): "U8", np.dtype("i1"): "I8", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16"}
    arrays = {r: np.ascontiguousarray(a) for r, a in arrays.items()}
    m = tiny_manifest(vocab, hidden)
    nbytes = sum(a.nbytes for a in arrays.values())
    m["layers"] = [
        {
            "index": 0,
            "status": "present",
            "codec": codec,
            "params": params,
            "tensors": {r: f"layers.0.{r}" for r in arrays},
            "stored_bytes": nbytes,
            "bits_per_value": nbytes * 8 / (vocab * hidden),
        }
    ]
    entries = [
        TensorEntry(f"layers.0.{r}", names[a.dtype], a.shape, hashlib.sha256(a.data).hexdigest(), lambda a=a: iter([a]))
        for r, a in arrays.items()
    ]
    return write_bundle(Path(path), entries, m)


_PROBE = """\
import sys, threading, time
{setup}

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

peak, done = [anon()], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)

t = threading.Thread(target=sample, daemon=True)
t.start()
base = anon()
{body}
done.set()
t.join()
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(base, max(peak[0], anon()), int(hwm.split()[1]) * 1024)
"""


def memory_probe_script(body: str, *, setup: str = "") -> str:
    """A ``python -c`` script that runs ``setup`` (imports), then ``body`` (top-level code reading ``sys.argv``)
    while a thread samples the anonymous RSS every millisecond, and prints ``anonymous-RSS-before-body
    peak-anonymous-RSS VmHWM`` in bytes: the memory of one job in a fresh process, for memory tests and benchmarks."""
    return _PROBE.format(setup=textwrap.dedent(setup).strip(), body=textwrap.dedent(body).strip())
