"""Sharded bundles: read identically to single files; every writing command can produce them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tolcli import CompressOptions, compress, convert_bundle, demo_checkpoint_path, drop_layers, open_bundle, precompute
from tolcli.bundle.sharded import INDEX_NAME
from tolcli.errors import ExitCode, InputError, OutputError, UsageError, VerifyError
from tolcli.fsutil import parse_bytes


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sh")
    one = precompute(demo_checkpoint_path(), d / "one.safetensors", dtype="bf16").path
    many = precompute(demo_checkpoint_path(), d / "many", dtype="bf16", max_shard_size="1.5MB").path
    return one, many


def test_sharded_and_single_file_read_identically(pair: tuple[Path, Path]) -> None:
    one, many = pair
    files = sorted(p.name for p in many.iterdir())
    assert files[-1] == INDEX_NAME and len(files) == 7  # 6 shards of <= 1.5 MB: a 1.05 MB table each
    with open_bundle(one) as a, open_bundle(many, verify=True) as b:
        assert a.manifest == b.manifest
        ids = torch.randint(0, 4096, (3, 50), generator=torch.Generator().manual_seed(0))
        for layer in range(6):
            assert torch.equal(a.lookup(layer, ids), b.lookup(layer, ids))
        assert a.tokenizer_bytes() == b.tokenizer_bytes()
    index = json.loads((many / INDEX_NAME).read_text())
    assert index["format"] == "tolcli.tol.sharded" and set(index["weight_map"]) == set(index["manifest"]["tensors"])
    assert all(r["bytes"] <= 1_500_000 for r in index["shards"])


def test_every_writer_can_shard_and_conversions_round_trip(pair: tuple[Path, Path], tmp_path: Path) -> None:
    one, many = pair
    back = convert_bundle(many, tmp_path / "back.safetensors")
    assert back.read_bytes() == one.read_bytes()
    h5dir = convert_bundle(one, tmp_path / "h5dir", container="hdf5", max_shard_size=2_000_000)
    assert {p.suffix for p in h5dir.iterdir()} == {".h5", ".json"}
    with open_bundle(h5dir, verify=True) as b:
        assert b.container == "hdf5"
    c = compress(many, tmp_path / "c", CompressOptions("int4"), max_shard_size="500kB")
    with open_bundle(c.path, verify=True) as b:
        assert len(list(c.path.glob("tol-*"))) > 1 and b.manifest["layers"][0]["codec"] == "int4"
    _, m = drop_layers(many, tmp_path / "d", drop_last=3, max_shard_size="1MB")
    assert [e["status"] for e in m["layers"]].count("dropped") == 3


@pytest.mark.parametrize("damage", ["flip", "missing", "index", "resize"])
def test_damaged_sharded_bundles_are_caught(pair: tuple[Path, Path], tmp_path: Path, damage: str, cli) -> None:
    _, many = pair
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in many.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = bad / "tol-00002-of-00006.safetensors"
    if damage == "flip":
        raw = bytearray(shard.read_bytes())
        raw[-100] ^= 1
        shard.write_bytes(bytes(raw))
        with open_bundle(bad) as b, pytest.raises(VerifyError):
            b.verify()
        assert cli("verify", bad).code == ExitCode.VERIFY_FAILED
    elif damage == "missing":
        shard.unlink()
        with pytest.raises(InputError, match="is missing"):
            open_bundle(bad)
    elif damage == "index":
        idx = json.loads((bad / INDEX_NAME).read_text())
        idx["weight_map"]["layers.0.table"] = "tol-00005-of-00006.safetensors"
        (bad / INDEX_NAME).write_text(json.dumps(idx))
        with pytest.raises(InputError, match="disagree"):
            open_bundle(bad)
    else:
        shard.write_bytes(shard.read_bytes() + b"\0")
        with pytest.raises(VerifyError, match="the index says"):
            open_bundle(bad)


def test_directory_rules(pair: tuple[Path, Path], tmp_path: Path) -> None:
    one, many = pair
    with pytest.raises(OutputError, match="output exists"):
        convert_bundle(one, many, max_shard_size="1MB")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="needs --max-shard-size"):
        convert_bundle(one, empty, force=True)
    with pytest.raises(InputError, match=r"needs tol\.index\.json"):
        open_bundle(empty)
    assert parse_bytes("1.5GiB") == 1610612736 and parse_bytes("2GB") == 2 * 10**9 and parse_bytes(123) == 123
    with pytest.raises(UsageError):
        parse_bytes("lots")
