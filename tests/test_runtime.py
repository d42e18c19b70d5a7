"""Hot-token cache: the same rows as the bundle, with honest hit-rate accounting."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
from tolcli.runtime import HotTokenCache, hot_tokens


def test_cache_returns_the_bundle_rows_and_counts_hits(tmp_path: Path, cli) -> None:
    dense = precompute(demo_checkpoint_path(), tmp_path / "d.safetensors", dtype="fp32").path
    q = compress(dense, tmp_path / "q", CompressOptions("int4"), max_shard_size="1MB").path
    counts = torch.zeros(4096)
    counts[[5, 9, 77]] = torch.tensor([10.0, 30.0, 20.0])
    assert hot_tokens(counts, 2).tolist() == [9, 77] and hot_tokens(counts, 0).numel() == 0
    with open_bundle(q) as b:
        cache = HotTokenCache(b, hot_tokens(counts, 3))
        ids = torch.tensor([[5, 6, 9], [4095, 77, 5]])
        for layer in range(6):
            assert torch.equal(cache.lookup(layer, ids), b.lookup(layer, ids))
        assert cache.stats.lookups == 36 and cache.stats.hits == 24 and cache.resident_bytes == 6 * 3 * 128 * 4
        model = load_model(open_checkpoint(demo_checkpoint_path()))
        x = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(model(x, cache), model(x, b.as_source()))
    r = cli("bench-lookup", q, "--data", demo_heldout_path(), "--cache-tokens", "256", "--json")
    doc = json.loads(r.out)
    assert r.code == 0 and doc["layers"] == 6 and doc["tokens"] == 18619
    assert 0.5 < doc["hit_rate"] < 0.8  # 256 of 4,096 tokens cover about two thirds of the text
