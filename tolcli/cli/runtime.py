"""``tolcli bench-lookup``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from tolcli.bundle.reader import open_bundle
from tolcli.cli._common import DeviceOpt, JsonOpt, Output, fmt_bytes
from tolcli.cli.bundles import BundleArg
from tolcli.errors import InputError
from tolcli.precompute import resolve_device
from tolcli.runtime import HotTokenCache, hot_tokens
from tolcli.text import load_token_weights, read_tokens


def bench_lookup_cmd(
    bundle: BundleArg,
    data: Annotated[Path, typer.Option("--data", help="Text (or .npy ids) whose token stream is looked up.")],
    cache_tokens: Annotated[int, typer.Option("--cache-tokens", metavar="K", help="Resident rows per layer.")] = 1024,
    token_weights: Annotated[
        Path | None, typer.Option("--token-weights", metavar="FILE.npy", help="Pick hot tokens from these counts.")
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option("--calibration", metavar="TEXT", help="Pick hot tokens from this text's counts.")
    ] = None,
    batch: Annotated[int, typer.Option("--batch", help="Token ids per lookup call.")] = 4096,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Lookup throughput and hit rate of a hot-token cache over a token stream (misses read the bundle).

    Hot tokens come from --token-weights or --calibration, else from the data itself (an optimistic bound).

    Example:

        tolcli bench-lookup int4.safetensors --data tolcli/demo/heldout.txt --cache-tokens 256
    """
    out = Output(json=json_out)
    dev = resolve_device(device)
    with open_bundle(bundle) as b:
        tok = b.tokenizer()
        ids = read_tokens(data, tok, b.vocab_size)
        if token_weights is None and calibration is None:
            counts, source = torch.bincount(ids, minlength=b.vocab_size).double(), "the data itself"
        else:
            counts, info = load_token_weights(
                b.vocab_size, weights_file=token_weights, calibration=calibration, tokenizer=tok, floor=0.0
            )
            source = info["name"]
        if not b.layers:
            raise InputError("the bundle has no present layer", path=bundle)
        layers = sorted(b.layers)

        def run(fn) -> float:
            t0 = time.perf_counter()
            for s in range(0, ids.numel(), batch):
                chunk = ids[s : s + batch]
                for layer in layers:
                    fn(layer, chunk)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        direct = run(lambda layer, chunk: b.lookup(layer, chunk).to(dev))
        cache = HotTokenCache(b, hot_tokens(counts, cache_tokens), dev)
        cached = run(cache.lookup)
    rows = ids.numel() * len(layers)
    doc = {
        "bundle": str(bundle),
        "tokens": ids.numel(),
        "layers": len(layers),
        "cache_tokens": cache.tokens.numel(),
        "hot_tokens_from": source,
        "resident_bytes": cache.resident_bytes,
        "hit_rate": cache.stats.hit_rate,
        "rows_per_s_direct": rows / direct,
        "rows_per_s_cached": rows / cached,
        "speedup": direct / cached,
        "device": dev.type,
    }
    if json_out:
        out.emit_json(doc)
        return
    t = Table(show_header=False, title=f"{bundle}: {ids.numel():,} tokens x {len(layers)} layers", title_justify="left")
    t.add_row(
        "hot tokens",
        f"{cache.tokens.numel():,} (from {source}), {fmt_bytes(cache.resident_bytes)} resident on {dev.type}",
    )
    t.add_row("hit rate", f"{100 * cache.stats.hit_rate:.1f}%")
    t.add_row("bundle reads", f"{rows / direct:,.0f} rows/s")
    t.add_row("with the cache", f"{rows / cached:,.0f} rows/s ({direct / cached:.2f}x)")
    out.print(t)
