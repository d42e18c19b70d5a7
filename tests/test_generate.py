"""Generation: the KV cache against the uncached forward pass, greedy decoding against a brute-force loop, ToLs
against the model's own FFNs, and the sampling rules against their definitions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tolcli import CompressOptions, compress, demo_checkpoint_path, load_model, open_checkpoint, precompute
from tolcli.bundle.reader import open_bundle
from tolcli.errors import UsageError
from tolcli.generate import SamplingOptions, bundle_step_source, generate, generate_text, next_token
from tolcli.model import KVCache
from tolcli.strip import strip_checkpoint


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {k: load_model(open_checkpoint(demo_checkpoint_path(k))) for k in ("memoryllm", "llama")}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gen")
    dense = precompute(demo_checkpoint_path(), d / "dense.safetensors", dtype="fp32").path
    int4 = compress(dense, d / "int4.safetensors", CompressOptions("int4")).path
    stripped = strip_checkpoint(demo_checkpoint_path(), d / "stripped").path
    return {"dense": dense, "int4": int4, "stripped": stripped}


@pytest.mark.parametrize("kind", ["memoryllm", "llama"])
def test_cached_decoding_equals_the_uncached_forward(models, kind: str) -> None:
    # Expected: the logits of the whole sequence in one causal pass; the cache feeds a prefill of 7 tokens, single
    # tokens, then a block of 5 (attending to the cache and causally within the block).
    model = models[kind]
    ids = torch.randint(0, 4096, (1, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.cfg, capacity=40)
        parts = [model(ids[:, :7], cache=cache)]
        parts += [model(ids[:, t : t + 1], cache=cache) for t in range(7, 32)]
        parts.append(model(ids[:, 32:], cache=cache))
    assert cache.length == 37
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"):
        model(ids[:, :4], cache=cache)


def _greedy_without_cache(model, ids: list[int], n: int, source=None) -> list[int]:
    """Brute force: the whole sequence through the model at every step, argmax of the last position."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]), source)[0, -1].argmax()))
    return seq[len(ids) :]


@pytest.mark.parametrize("kind", ["memoryllm", "llama"])
def test_greedy_equals_a_brute_force_loop(models, kind: str) -> None:
    prompt = [701, 221, 15, 99]
    got = generate(models[kind], prompt, options=SamplingOptions(max_new_tokens=12)).new_ids
    assert got == _greedy_without_cache(models[kind], prompt, 12)


def test_greedy_with_a_dense_bundle_equals_the_models_own_ffns(models, bundles) -> None:
    prompt = [701, 221]
    own = generate(models["memoryllm"], prompt, options=SamplingOptions(max_new_tokens=20)).new_ids
    with open_bundle(bundles["dense"]) as b:
        via_tol = generate(
            models["memoryllm"], prompt, source=bundle_step_source(b), options=SamplingOptions(max_new_tokens=20)
        ).new_ids
    assert via_tol == own
    # the stripped checkpoint with the bundle: the deployable pair
    res = generate_text(bundles["stripped"], "def ", tol=bundles["dense"], options=SamplingOptions(max_new_tokens=20))
    full = generate_text(demo_checkpoint_path(), "def ", options=SamplingOptions(max_new_tokens=20))
    assert res.generation.new_ids == full.generation.new_ids and res.text == full.text


def test_step_source_fetches_all_layers_once_per_step(bundles) -> None:
    calls: list[int] = []
    with open_bundle(bundles["int4"]) as b:
        src = bundle_step_source(b)
        inner = src.lookup
        src.lookup = lambda ids: (calls.append(ids.numel()), inner(ids))[1]
        ids = torch.tensor([[5, 6, 7]])
        x0 = torch.zeros(1, 3, 128)
        rows = [src(layer, ids, x0) for layer in range(6)]
        assert calls == [3]  # one all-layers lookup for the 6 layers
        for layer in range(6):
            torch.testing.assert_close(rows[layer][0], b.lookup(layer, ids[0]), rtol=0, atol=0)


def test_sampling_rules_against_their_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([3.0, 2.5, 0.0, -1.0, 2.9])
    assert next_token(logits, SamplingOptions(), g) == 0  # greedy
    assert next_token(logits, SamplingOptions(temperature=1.0, top_k=1), g) == 0
    # top-k 2: only tokens 0 and 4 (the two largest logits) can ever appear
    seen = {next_token(logits, SamplingOptions(temperature=1.0, top_k=2), g) for _ in range(300)}
    assert seen == {0, 4}
    # top-p: probabilities softmax = p; the smallest most-likely set with mass >= 0.5 is {0, 4}
    p = torch.softmax(logits.double(), 0)
    assert p[0] < 0.5 <= p[0] + p[4]
    seen = {next_token(logits, SamplingOptions(temperature=1.0, top_p=0.5), g) for _ in range(300)}
    assert seen == {0, 4}
    # temperature 1, no filter: empirical frequencies follow softmax (3 sigma over 4,000 draws)
    draws = torch.tensor([next_token(logits, SamplingOptions(temperature=1.0), g) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=5).double() / 4000
    assert ((freq - p).abs() <= 3 * (p * (1 - p) / 4000).sqrt() + 1e-9).all()


def test_seeded_sampling_is_reproducible(models) -> None:
    opts = SamplingOptions(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    a = generate(models["memoryllm"], [701, 221], options=opts).new_ids
    b = generate(models["memoryllm"], [701, 221], options=opts).new_ids
    c = generate(models["memoryllm"], [701, 221], options=SamplingOptions(16, 0.9, None, 0.95, seed=8)).new_ids
    assert a == b and a != c


def test_bad_options_and_limits(models) -> None:
    for kw in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(UsageError):
            SamplingOptions(**kw)
    with pytest.raises(UsageError, match="max_position_embeddings"):
        generate(models["memoryllm"], [1] * 500, options=SamplingOptions(max_new_tokens=13))
    with pytest.raises(UsageError, match="empty"):
        generate(models["memoryllm"], [])


def test_cli_generate_prints_text_and_json(bundles, cli) -> None:
    r = cli("generate", bundles["stripped"], "--tol", bundles["int4"], "--prompt", "def ", "-n", "8")
    assert r.code == 0, r.err
    assert r.out.startswith("def ") and len(r.out.strip()) > len("def") and "ms/token" in r.err
    r = cli("generate", "demo", "--prompt", "def ", "-n", "8", "--json", "--cache-tokens", "0")
    doc = json.loads(r.out)
    assert r.code == 0 and len(doc["new_ids"]) == 8 and doc["prompt_ids"] == [701, 221] and doc["ms_per_token"] > 0
    hot = cli(
        "generate",
        bundles["stripped"],
        "--tol",
        bundles["int4"],
        "--prompt",
        "def ",
        "-n",
        "8",
        "--json",
        "--cache-tokens",
        "2",
    )
    cold = cli("generate", bundles["stripped"], "--tol", bundles["int4"], "--prompt", "def ", "-n", "8", "--json")
    assert hot.code == cold.code == 0 and json.loads(hot.out)["new_ids"] == json.loads(cold.out)["new_ids"]
    r = cli("generate", bundles["stripped"], "--prompt", "def ")
    assert r.code == 2 and "stripped" in r.err
    r = cli("generate", "demo", "--prompt", "x", "--top-p", "2")
    assert r.code == 2
