"""Bad option values: a usage error (exit 2) or an output error (exit 6) naming the option, never exit 1 or a
silent default (issue 13, class 11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tolcli import demo_checkpoint_path, open_bundle, precompute
from tolcli.errors import InputError
from tolcli.runtime import HotTokenCache

HELD = str(Path(__file__).resolve().parent.parent / "tolcli" / "demo" / "heldout.txt")


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return precompute(
        demo_checkpoint_path(), tmp_path_factory.mktemp("usage") / "d.safetensors", dtype="fp16", layers="0-1"
    ).path


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["bench-lookup", "{d}", "--data", HELD, "--batch", "0"], 2, "--batch-tokens must be >= 1"),
        (["compress", "{d}", "-o", "{t}/x.safetensors", "-s", "svd", "--rank", "8", "--svd-method", "randomized",
          "--oversample", "-100"], 2, "oversample and power_iters must be >= 0"),
        (["compress", "{d}", "-o", "{t}/x.safetensors", "-s", "svd", "--rank", "8", "--svd-method", "randomized",
          "--seed", str(2**70)], 2, "seed must be within"),
        (["compress", "{d}", "-o", "{t}/x.safetensors", "-s", "int4", "--group-size", "0"], 2, "group size"),
        (["sweep", "demo", "--data", HELD, "-o", "{t}/sw", "--ranks", "8,x"], 2, "--ranks '8,x'"),
        (["inspect", "{d}", "--plot", "/proc/no-such-dir/x.png"], 6, "cannot write the plot"),
        (["eval-ppl", "demo", "--data", HELD, "--stride", "0"], 2, "1 <= --stride <= --ctx"),
        (["eval-ppl", "demo", "--data", HELD, "--max-tokens", "-5"], 2, "--max-tokens must be >= 2"),
        (["eval-ppl", "demo", "--data", HELD, "--batch-size", "-1"], 2, "--batch-size must be >= 1"),
    ],
)  # fmt: skip
def test_bad_option_values(cli, dense: Path, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    if "--plot" in args:
        pytest.importorskip("matplotlib")
    r = cli(*[a.format(d=dense, t=tmp_path) for a in args])
    assert (r.code, r.err.count("\n")) == (code, 1), r.err
    assert message in r.err
    r = cli(*[a.format(d=dense, t=tmp_path) for a in args], "--json")  # the same error as a JSON document
    doc = json.loads(r.out)
    assert r.code == code == doc["error"]["exit_code"] and doc["ok"] is False and doc["command"] == args[0]
    assert message in doc["error"]["message"] and doc["error"]["code"] == {2: "usage", 6: "output"}[code]


def test_hot_token_cache_refuses_ids_outside_the_vocabulary(dense: Path) -> None:
    with open_bundle(dense) as b:
        cache = HotTokenCache(b, torch.tensor([5, 7]))
        V = b.vocab_size
        assert torch.equal(cache.lookup(0, torch.tensor([5, V - 1])), b.lookup(0, [5, V - 1]))
        for bad in ([-1], [V], [3, -(2**40)]):
            with pytest.raises(InputError, match="outside the vocabulary"):
                cache.lookup(0, torch.tensor(bad))
