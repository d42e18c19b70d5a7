"""The reference model against independent computations: transformers' Llama, and a hand-written loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tolcli import TableSource, ZeroSource, load_model, open_checkpoint
from tolcli.config import ModelConfig


@pytest.mark.parametrize("tied", [False, True])
def test_llama_matches_transformers(make_ckpt, hf_llama, tied: bool) -> None:
    d = make_ckpt(
        "llama",
        vocab_size=97,
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=80,
        num_hidden_layers=3,
        rope_theta=5000.0,
        tie_word_embeddings=tied,
    )
    ckpt = open_checkpoint(d)
    cfg = ckpt.config
    ours = load_model(ckpt)
    hf, missing, unexpected = hf_llama(ckpt)
    assert not unexpected and all("rotary" in m or (tied and m == "lm_head.weight") for m in missing)
    idx = torch.randint(0, cfg.vocab_size, (3, 41), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=idx).logits
        got = ours(idx)
    assert (got - ref).abs().max().item() <= 1e-4


def hand_forward(
    state: dict[str, torch.Tensor], cfg: ModelConfig, idx: torch.Tensor, zero_memory: bool = False
) -> torch.Tensor:
    """An independent per-layer loop with plain tensor ops (no tolcli modules), for one sequence."""
    T = idx.shape[0]
    h, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def rms(x, w, eps):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    def mem_norm(x, i):
        w = state[f"model.layers.{i}.memory_layernorm.weight"]
        if cfg.memory_norm_type == "rmsnorm":
            return rms(x, w, cfg.memory_norm_eps)
        b = state.get(f"model.layers.{i}.memory_layernorm.bias", torch.zeros(h))
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.memory_norm_eps) * w + b

    def swiglu(x, prefix):
        g, u, dn = (state[f"{prefix}.{p}_proj.weight"] for p in ("gate", "up", "down"))
        a = x @ g.T
        return ((a / (1 + torch.exp(-a))) * (x @ u.T)) @ dn.T

    def rope(v):  # v: (heads, T, hd); rotate pairs (j, j + hd/2) by angle pos * theta^(-2j/hd)
        out = v.clone()
        for j in range(hd // 2):
            ang = torch.arange(T, dtype=torch.float64) * cfg.rope_theta ** (-2 * j / hd)
            c, s = torch.cos(ang).float(), torch.sin(ang).float()
            a, b = v[..., j], v[..., j + hd // 2]
            out[..., j], out[..., j + hd // 2] = a * c - b * s, b * c + a * s
        return out

    x0 = state["model.embed_tokens.weight"][idx]
    x = x0
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        a = rms(x, state[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
        q = rope((a @ state[f"{p}.self_attn.q_proj.weight"].T).view(T, nh, hd).transpose(0, 1))
        k = rope((a @ state[f"{p}.self_attn.k_proj.weight"].T).view(T, nkv, hd).transpose(0, 1))
        v = (a @ state[f"{p}.self_attn.v_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        heads = []
        for j in range(nh):
            kk, vv = k[j // (nh // nkv)], v[j // (nh // nkv)]
            att = (q[j] @ kk.T) / math.sqrt(hd)
            att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            heads.append(torch.softmax(att, -1) @ vv)
        hmid = x + torch.cat(heads, -1) @ state[f"{p}.self_attn.o_proj.weight"].T
        if cfg.model_type == "flex_memoryllm":
            hmid = hmid + swiglu(
                rms(hmid, state[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps), f"{p}.context_mlp"
            )
        if not zero_memory:
            hmid = hmid + cfg.ffn_alpha * swiglu(mem_norm(x0, i), f"{p}.mlp")
        x = hmid
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    return rms(x, state["model.norm.weight"], cfg.rms_norm_eps) @ head.T


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("memoryllm", {}),
        ("memoryllm", {"memory_norm_type": "rmsnorm", "ffn_alpha": 0.5, "tie_word_embeddings": True}),
        ("memoryllm", {"vocab_size": 67, "hidden_size": 40, "num_attention_heads": 5, "num_key_value_heads": 1}),
        ("flex_memoryllm", {"ffn_alpha": 2.0}),
    ],
)
def test_memory_models_match_hand_loop(make_ckpt, model_type: str, overrides: dict) -> None:
    d = make_ckpt(model_type, memory_norm_bias=overrides.get("memory_norm_type") != "rmsnorm", **overrides)
    ckpt = open_checkpoint(d)
    model = load_model(ckpt)
    state = {n: ckpt.load(n) for n in ckpt.tensors}
    idx = torch.randint(0, ckpt.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(idx)
        zero = model(idx, ZeroSource())
    for b in range(2):
        assert (got[b] - hand_forward(state, ckpt.config, idx[b])).abs().max().item() <= 1e-4
        assert (zero[b] - hand_forward(state, ckpt.config, idx[b], zero_memory=True)).abs().max().item() <= 1e-4
    assert (got - zero).abs().max().item() > 1e-2  # the memory term is not negligible


def test_table_source_equals_ffn_path(make_ckpt) -> None:
    ckpt = open_checkpoint(make_ckpt("memoryllm"))
    model = load_model(ckpt)
    cfg = ckpt.config
    with torch.no_grad():
        x0 = model.model.embed_tokens.weight
        tables = {i: model.model.layers[i].memory_term(x0) for i in range(cfg.num_hidden_layers)}
        idx = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
        assert (model(idx, TableSource(tables)) - model(idx)).abs().max().item() <= 1e-5
        tables.pop(1)  # an absent layer contributes zero
        one_dropped = model(idx, TableSource(tables))
        assert (one_dropped - model(idx)).abs().max().item() > 1e-3


def test_bf16_forward_is_close_to_fp32(make_ckpt) -> None:
    ckpt = open_checkpoint(make_ckpt("flex_memoryllm", dtype=torch.bfloat16))
    idx = torch.randint(0, ckpt.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = load_model(ckpt)(idx)
        got = load_model(ckpt, dtype=torch.bfloat16)(idx)
    assert got.dtype == torch.bfloat16
    p, q = F.log_softmax(ref, -1), F.log_softmax(got.float(), -1)
    assert (p.exp() * (p - q)).sum(-1).mean().item() < 1e-2  # KL small
