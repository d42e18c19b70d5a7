"""Checkpoint reader: round trips in every layout, strictness, and one clear error per bad input."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tolcli import open_checkpoint
from tolcli.checkpoint import ST_INDEX
from tolcli.errors import CheckpointError, ExitCode
from tolcli.layout import ATTENTION, expected_tensors
from tolcli.model import load_model
from tolcli.testing import random_state_dict, tiny_config, write_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "sharded-bin"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_every_layout(tmp_path: Path, layout: str, dtype: torch.dtype) -> None:
    cfg = tiny_config("flex_memoryllm")
    state = random_state_dict(cfg, seed=3, dtype=dtype)
    d = write_checkpoint(tmp_path / "c", cfg, state, layout=layout, shards=3)  # type: ignore[arg-type]
    with open_checkpoint(d) as ckpt:
        assert set(ckpt.tensors) == set(state)
        for name, t in state.items():
            got = ckpt.load(name, dtype=None)
            assert got.dtype == dtype
            assert torch.equal(got, t), name
        assert ckpt.total_bytes() == sum(t.numel() * t.element_size() for t in state.values())


def test_sharded_index_is_used(tmp_path: Path) -> None:
    cfg = tiny_config("memoryllm")
    d = write_checkpoint(tmp_path / "c", cfg, random_state_dict(cfg), layout="sharded", shards=4)
    ckpt = open_checkpoint(d)
    assert len(ckpt.files) == 4 and ckpt.index_path == d / ST_INDEX


def test_weights_file_path_with_config_beside_it(make_ckpt) -> None:
    d = make_ckpt("llama")
    assert open_checkpoint(d / "model.safetensors").config.model_type == "llama"


def test_reads_lazily_only_what_is_asked(make_ckpt) -> None:
    d = make_ckpt("memoryllm")
    ckpt = open_checkpoint(d)
    assert ckpt.loaded == []
    load_model(ckpt, memory_ffn=False)
    specs = expected_tensors(ckpt.config)
    assert ckpt.loaded and not any(specs[n].group == "memory_ffn" for n in ckpt.loaded)
    ckpt.loaded.clear()
    ckpt.load("model.layers.0.mlp.up_proj.weight")
    assert not any(specs[n].group == ATTENTION for n in ckpt.loaded)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_payload_is_refused(tmp_path: Path) -> None:
    cfg = tiny_config("memoryllm")
    d = write_checkpoint(tmp_path / "c", cfg, random_state_dict(cfg), layout="bin")
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    state["evil"] = Evil()  # type: ignore[assignment]
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump(state, f)  # a legacy pickle whose loading would call os.system
    with pytest.raises(CheckpointError, match="refused to load"):
        open_checkpoint(d)


def _err(path: Path) -> str:
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(path)
    return ei.value.one_line()


def test_missing_tensor_names_file_tensor_and_shape(tmp_path: Path) -> None:
    cfg = tiny_config("memoryllm")
    state = random_state_dict(cfg)
    del state["model.layers.2.mlp.down_proj.weight"]
    d = write_checkpoint(tmp_path / "c", cfg, state)
    msg = _err(d)
    assert "model.safetensors" in msg and "model.layers.2.mlp.down_proj.weight" in msg and "[32, 48]" in msg


def test_wrong_shape(tmp_path: Path) -> None:
    cfg = tiny_config("memoryllm")
    state = random_state_dict(cfg)
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 32)
    msg = _err(write_checkpoint(tmp_path / "c", cfg, state))
    assert "k_proj" in msg and "[32, 32]" in msg and "expected [16, 32]" in msg


def test_unexpected_tensor_suggests_tensor_map(tmp_path: Path) -> None:
    cfg = tiny_config("llama")
    state = random_state_dict(cfg)
    state["transformer.wte.weight"] = torch.zeros(3)
    assert "--tensor-map" in _err(write_checkpoint(tmp_path / "c", cfg, state))


def test_integer_dtype_refused(tmp_path: Path) -> None:
    cfg = tiny_config("llama")
    state = random_state_dict(cfg)
    state["model.norm.weight"] = torch.ones(32, dtype=torch.int32)
    assert "dtype I32" in _err(write_checkpoint(tmp_path / "c", cfg, state))


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda c: c.update(model_type="gpt2"), "unknown model_type 'gpt2'"),
        (lambda c: c.pop("hidden_size"), "missing required key 'hidden_size'"),
        (lambda c: c.update(num_key_value_heads=3), "not a multiple"),
        (lambda c: c.update(vocab_size=-5), "vocab_size=-5 is out of range"),
        (lambda c: c.update(vocab_size=1 << 40), "out of range"),
        (lambda c: c.update(memory_norm_type="batchnorm"), "memory_norm_type"),
        (lambda c: c.update(tie_word_embeddings="yes"), "true or false"),
    ],
)
def test_bad_config(make_ckpt, mutate, expect: str) -> None:
    d = make_ckpt("memoryllm")
    cfg = json.loads((d / "config.json").read_text())
    mutate(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _err(d)
    assert expect in msg and "config.json" in msg


def test_config_not_json(make_ckpt) -> None:
    d = make_ckpt()
    (d / "config.json").write_text("{not json")
    assert "invalid JSON at line 1" in _err(d)


@pytest.mark.parametrize(
    ("index", "expect"),
    [
        ("{", "invalid JSON"),
        ('{"metadata": {}}', 'missing or empty "weight_map"'),
        ('{"weight_map": {"model.norm.weight": "../../etc/passwd"}}', "expected a file name"),
        ('{"weight_map": {"model.norm.weight": "model-00009-of-00009.safetensors"}}', "is missing"),
    ],
)
def test_malformed_index(make_ckpt, index: str, expect: str) -> None:
    d = make_ckpt(layout="sharded")
    (d / ST_INDEX).write_text(index)
    msg = _err(d)
    assert expect in msg and ST_INDEX in msg


def test_index_disagrees_with_shards(make_ckpt) -> None:
    d = make_ckpt(layout="sharded")
    idx = json.loads((d / ST_INDEX).read_text())
    name = "model.norm.weight"
    other = next(f for f in set(idx["weight_map"].values()) if f != idx["weight_map"][name])
    idx["weight_map"][name] = other
    (d / ST_INDEX).write_text(json.dumps(idx))
    assert "the index says" in _err(d)


def test_not_a_safetensors_file(tmp_path: Path, make_ckpt) -> None:
    d = make_ckpt()
    (d / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    assert "Git LFS pointer" in _err(d) and "git lfs pull" in _err(d)
    (d / "model.safetensors").write_text("<!DOCTYPE html><html><body>502 Bad Gateway</body></html>")
    assert "looks like HTML" in _err(d)
    (d / "model.safetensors").write_bytes(b"\x07" * 100)
    assert "not a readable safetensors file" in _err(d)


def test_no_weights_and_ambiguous_weights(make_ckpt) -> None:
    d = make_ckpt()
    os.rename(d / "model.safetensors", d / "a.safetensors")
    save_file({"x": torch.zeros(1)}, str(d / "b.safetensors"))
    assert "several weight files" in _err(d)
    os.remove(d / "a.safetensors")
    os.remove(d / "b.safetensors")
    assert "no weights found" in _err(d)


def test_missing_path() -> None:
    assert "checkpoint not found" in _err(Path("/nonexistent/ckpt"))


def test_tensor_map_example_loads_foreign_names(tmp_path: Path) -> None:
    """docs/examples/tensor-map.json maps a foreign naming scheme onto the canonical one."""
    cfg = tiny_config("memoryllm")
    state = random_state_dict(cfg, seed=5)
    foreign = {}
    for name, t in state.items():
        n = name.replace("model.layers.", "blocks.").replace("model.embed_tokens.", "tok_embeddings.")
        n = (
            n.replace("self_attn.", "attn.")
            .replace("memory_layernorm.", "mem_norm.")
            .replace("model.norm.", "final_norm.")
        )
        n = n.replace("lm_head.", "output.")
        foreign[n] = t
    foreign["blocks.0.attn.rotary.inv_freq_cache"] = torch.zeros(4)
    d = write_checkpoint(tmp_path / "c", cfg, foreign)
    with pytest.raises(CheckpointError):
        open_checkpoint(d)
    ckpt = open_checkpoint(d, tensor_map=REPO / "docs" / "examples" / "tensor-map.json")
    assert set(ckpt.tensors) == set(state)
    assert torch.equal(
        ckpt.load("model.layers.2.self_attn.q_proj.weight"), state["model.layers.2.self_attn.q_proj.weight"]
    )


def test_cli_bad_checkpoint_is_one_line_with_exit_code(cli, make_ckpt) -> None:
    d = make_ckpt()
    (d / "config.json").write_text("{}")
    r = cli("info", d)
    assert r.code == ExitCode.BAD_INPUT == 4
    assert r.err.count("\n") == 1 and r.err.startswith("tolcli: error: ") and "Traceback" not in r.err
    r = cli("--debug", "info", d)
    assert r.code == 4 and "Traceback" in r.err
