"""``info`` arithmetic: parameter counts and ToL sizes, checked by hand formulas."""

from __future__ import annotations

import json

from tolcli.config import ModelConfig
from tolcli.info import describe_config, parameter_counts, tol_sizes


def memoryllm_1b() -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "model_type": "memoryllm",
            "vocab_size": 128256,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 24,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "tie_word_embeddings": True,
        }
    )


def test_memoryllm_1b_tol_size_matches_paper_without_allocating() -> None:
    tol = tol_sizes(memoryllm_1b())
    assert tol["values_per_layer"] == 128256 * 2048
    assert tol["bytes_total"]["fp16"] == 24 * 128256 * 2048 * 2 == 12_608_077_824  # the paper's ~12.6 GB
    assert tol["bytes_total"]["fp32"] == 2 * tol["bytes_total"]["fp16"]
    # int4 with an fp16 scale and offset per 64 values: 0.5 + 4/64 bytes per value
    assert tol["bytes_total"]["int4-g64"] == 24 * 128256 * 2048 * 9 // 16


def test_parameter_counts_by_hand() -> None:
    cfg = memoryllm_1b()
    h, v, i, L = 2048, 128256, 8192, 24
    q, kv = 32 * 64, 8 * 64
    attn = L * (h + h * q + 2 * h * kv + q * h)
    mem = L * (3 * h * i + h)  # + memory norm weight (the optional bias is not counted without a checkpoint)
    p = parameter_counts(cfg)
    assert p["attention"] == attn
    assert p["memory_ffn"] == mem
    assert p["embedding"] == v * h and p["head"] == h  # tied: only the final norm
    assert p["context_ffn"] == 0
    assert p["total"] == attn + mem + v * h + h
    assert p["active"] == attn


def test_flex_and_llama_active() -> None:
    base = {
        "vocab_size": 100,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    llama = parameter_counts(ModelConfig.from_dict({"model_type": "llama", **base}))
    assert llama["memory_ffn"] == 0 and llama["context_ffn"] == 2 * (3 * 16 * 24 + 16)
    assert llama["head"] == 16 + 100 * 16  # untied
    flex = parameter_counts(
        ModelConfig.from_dict({"model_type": "flex_memoryllm", "context_intermediate_size": 8, **base})
    )
    assert flex["context_ffn"] == 2 * (3 * 16 * 8 + 16)
    assert flex["memory_ffn"] == 2 * (3 * 16 * 24 + 16)
    assert flex["active"] == flex["attention"] + flex["context_ffn"]
    assert tol_sizes(ModelConfig.from_dict({"model_type": "llama", **base}))["layers"] == 0


def test_info_json_counts_present_bias(cli, make_ckpt) -> None:
    d = make_ckpt("memoryllm")
    r = cli("info", d, "--json")
    assert r.code == 0 and r.err == ""
    doc = json.loads(r.out)
    cfg = ModelConfig.from_file(d / "config.json")
    assert doc["parameters"]["memory_ffn"] == describe_config(cfg)["parameters"]["memory_ffn"] + 3 * 32  # biases
    assert doc["storage"]["tensor_bytes"] == 4 * doc["parameters"]["total"]
    assert doc["tol"]["bytes_total"]["fp16"] == 3 * 101 * 32 * 2


def test_info_human_output_is_plain_off_a_terminal(cli, make_ckpt) -> None:
    r = cli("info", make_ckpt("flex_memoryllm"))
    assert r.code == 0
    assert "\x1b[" not in r.out
    assert "ToL tables: 101 x 32 per layer" in r.out and "active" in r.out
    r = cli("info", make_ckpt("llama"))
    assert "has no ToLs" in r.out
