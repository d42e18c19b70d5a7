"""``tolcli inspect --entropy``: the codes' order-0 entropy and the layers' zstd sizes, checked against a histogram
the test builds itself (each row's bit stream read as one Python integer) and against codes of known entropy."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tolcli import CompressOptions, compress, open_bundle, precompute
from tolcli.bundle.codestats import bytes_to_read, code_statistics
from tolcli.bundle.entries import TensorEntry
from tolcli.bundle.writer import write_bundle
from tolcli.testing import tiny_config, tiny_manifest, write_random_checkpoint


def stream_codes(packed: np.ndarray, bits: int) -> list[int]:
    """Every code of a packed code tensor (rows of little-endian bit streams; 8 bits: the bytes)."""
    raw = np.ascontiguousarray(packed).view(np.uint8).reshape(packed.shape[0], -1)
    codes: list[int] = []
    for row in raw:
        s = int.from_bytes(row.tobytes(), "little")
        codes += [(s >> (j * bits)) & ((1 << bits) - 1) for j in range(row.size * 8 // bits)]
    return codes


def entropy_of(codes: list[int]) -> float:
    n = len(codes)
    return -sum(c / n * math.log2(c / n) for c in Counter(codes).values())


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("codestats")
    ckpt = write_random_checkpoint(d / "ckpt", tiny_config("memoryllm", hidden_size=64))
    dense = precompute(ckpt, d / "dense.safetensors", dtype="fp32").path
    out = {"dense": dense}
    for name, opts in {
        "int4": CompressOptions(scheme="int4"),
        "int3": CompressOptions(scheme="int3"),
        "int8": CompressOptions(scheme="int8"),
        "mixed": CompressOptions(codec="mixed(bits=3)"),
        "svd+int4": CompressOptions(scheme="svd+int4", rank=32),
    }.items():
        out[name] = compress(dense, d / f"{name}.h5", opts).path
    return out


@pytest.mark.parametrize("name", ["int4", "int3", "int8", "mixed", "svd+int4"])
def test_entropy_matches_a_histogram_of_the_stored_codes(bundles: dict[str, Path], name: str) -> None:
    with open_bundle(bundles[name]) as b:
        stats = code_statistics(b)
        assert [s.index for s in stats] == sorted(b.layers)
        for s in stats:
            entry = b.manifest["layers"][s.index]
            code_tensors = {r: t for r, t in entry["tensors"].items() if r.endswith("codes")}
            assert code_tensors, entry["tensors"]
            total_bits = total_codes = entropy_bits = 0.0
            for role, tensor in code_tensors.items():
                bits = {"int4": 4, "int3": 3, "int8": 8, "svd+int4": 4}.get(name)
                if name == "mixed":
                    bits = entry["params"]["classes"][int(role.split(".")[0][5:])][0]
                codes = stream_codes(b.tensor(tensor).numpy(), bits)
                total_codes += len(codes)
                total_bits += bits * len(codes)
                entropy_bits += entropy_of(codes) * len(codes)
            stored = sum(b.manifest["tensors"][t]["bytes"] for t in entry["tensors"].values())
            packed = sum(b.manifest["tensors"][t]["bytes"] for t in code_tensors.values())
            assert s.codes == total_codes and s.stored_bits_per_code == pytest.approx(total_bits / total_codes)
            assert s.entropy_bits_per_code == pytest.approx(entropy_bits / total_codes, rel=1e-12)
            assert 0 < s.entropy_bits_per_code < s.stored_bits_per_code  # trained codes never use levels evenly
            assert s.stored_bytes == stored == entry["stored_bytes"]
            assert s.entropy_coded_bytes == stored - packed + math.ceil(entropy_bits / 8)
            assert 0 < s.zstd_bytes < stored * 1.01 + 16 * len(entry["tensors"])  # a frame's header per tensor


def _crafted(path: Path, codes: np.ndarray) -> Path:
    """A one-layer int2 bundle, 64 rows x 64 values, whose codes are the bytes ``codes`` [64, 16]."""
    m = tiny_manifest(64, 64)
    arrays = {
        "codes": codes,
        "scales": np.full((64, 1), 0.5, np.float16),
        "offsets": np.zeros((64, 1), np.float16),
    }
    entries = [
        TensorEntry(f"layers.0.{r}", {"u1": "U8", "f2": "F16"}[a.dtype.str[1:]], a.shape,
                    hashlib.sha256(a.tobytes()).hexdigest(), lambda a=a: iter([a]))
        for r, a in arrays.items()
    ]  # fmt: skip
    nbytes = sum(a.nbytes for a in arrays.values())
    m["layers"][0].update(
        codec="int2",
        params={"bits": 2, "group_size": 64},
        tensors={r: f"layers.0.{r}" for r in arrays},
        stored_bytes=nbytes,
        bits_per_value=nbytes * 8 / (64 * 64),
    )
    return write_bundle(path, entries, m)


def test_codes_of_known_entropy(tmp_path: Path) -> None:
    """0x1B holds the 2-bit codes 3, 2, 1, 0: four equally frequent codes, 2 bits each, nothing to gain; all-zero
    codes carry no information (0 bits) and zstd shrinks them to almost nothing."""
    even = _crafted(tmp_path / "even.safetensors", np.full((64, 16), 0x1B, np.uint8))
    zero = _crafted(tmp_path / "zero.safetensors", np.zeros((64, 16), np.uint8))
    with open_bundle(even) as b:
        (s,) = code_statistics(b)
    assert (s.codes, s.stored_bits_per_code, s.entropy_bits_per_code) == (4096, 2.0, 2.0)
    assert s.entropy_coded_bytes == s.stored_bytes == 64 * 16 + 2 * 64 * 2
    with open_bundle(zero) as b:
        (s,) = code_statistics(b)
    assert s.entropy_bits_per_code == 0.0 and s.entropy_coded_bytes == 2 * 64 * 2
    assert s.zstd_bytes < 100


def test_inspect_entropy_table_and_json(bundles: dict[str, Path], cli) -> None:
    r = cli("inspect", bundles["int4"], "--entropy")
    assert r.code == 0 and "Codes (order-0 entropy" in r.out and "entropy bits/code" in r.out
    r = cli("inspect", bundles["dense"], "--entropy", "--json")
    doc = json.loads(r.out)
    assert r.code == 0 and all(s["codes"] == 0 and s["entropy_bits_per_code"] is None for s in doc["code_statistics"])
    assert all(s["codec"] == "dense" and 0 < s["zstd_bytes"] <= s["stored_bytes"] for s in doc["code_statistics"])
    r = cli("inspect", bundles["int4"], "--json")
    assert json.loads(r.out)["code_statistics"] is None  # not read unless asked


@pytest.mark.parametrize("name", ["dense", "int4", "mixed"])
def test_the_progress_total_is_what_is_read(bundles: dict[str, Path], name: str) -> None:
    read: list[int] = []
    with open_bundle(bundles[name]) as b:
        code_statistics(b, progress=read.append)
        assert sum(read) == bytes_to_read(b) > 0
