"""Bundle format v1: bytes against the spec, independent readers, conversions, corruption, schema."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from pathlib import Path

import h5py
import jsonschema
import numpy as np
import pytest
import torch
from safetensors import safe_open

from tolcli import convert_bundle, demo_checkpoint_path, open_bundle, precompute
from tolcli.bundle.entries import TensorEntry
from tolcli.bundle.h5_format import chunk_shape
from tolcli.bundle.manifest import MANIFEST_SCHEMA
from tolcli.bundle.writer import write_bundle
from tolcli.errors import ExitCode, InputError, VerifyError
from tolcli.testing import tiny_manifest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def demo_bundles(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("demo")
    st = d / "demo.safetensors"
    precompute(demo_checkpoint_path(), st, dtype="bf16")
    h5 = d / "demo.h5"
    convert_bundle(st, h5)
    return {"safetensors": st, "hdf5": h5}


# The golden file, typed from docs/bundle-format.md (not produced by tolcli): the manifest as canonical JSON
# (sorted keys, no spaces), inside a safetensors header with its tensor entry, space-padded to 8 bytes, then the
# 24 data bytes of float32 0..5 little-endian, row-major.
GOLDEN_SHA = "b3bf58dac02fdc73c9f32893750c12e4592f669861442438468b0b77467bc1ce"  # sha256 of golden_bytes()


def golden_bytes() -> bytes:
    data = b"".join(struct.pack("<f", v) for v in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0))
    table_sha = hashlib.sha256(data).hexdigest()
    manifest = (
        '{"format":"tolcli.tol","format_version":1,'
        '"layers":[{"bits_per_value":32.0,"codec":"dense","index":0,"params":{"dtype":"F32"},'
        '"status":"present","stored_bytes":24,"tensors":{"table":"layers.0.table"}}],'
        '"model":{"ffn_alpha":1.0,"hidden_size":2,"memory_norm_type":"layernorm","num_layers":1,'
        '"type":"memoryllm","vocab_size":3},'
        '"source":{"checkpoint":"x","config":{},"files":[]},'
        '"tensors":{"layers.0.table":{"bytes":24,"dtype":"F32","sha256":"' + table_sha + '","shape":[3,2]}},'
        '"tolcli_version":"test",'
        '"vocabulary":{"embedded":false,"size":3,"special_tokens":[],"tokenizer_sha256":null}}'
    )
    escaped = manifest.replace("\\", "\\\\").replace('"', '\\"')
    header = (
        '{"__metadata__":{"format":"pt","tol.manifest":"' + escaped + '"},'
        '"layers.0.table":{"data_offsets":[0,24],"dtype":"F32","shape":[3,2]}}'
    ).encode()
    header += b" " * (-(8 + len(header)) % 8)
    return struct.pack("<Q", len(header)) + header + data


def test_golden_bytes_safetensors(tmp_path: Path) -> None:
    """A 3 x 2 fp32 table, byte for byte as docs/bundle-format.md specifies."""
    expected = golden_bytes()
    assert hashlib.sha256(expected).hexdigest() == GOLDEN_SHA  # the expectation itself is pinned
    table = np.arange(6, dtype="<f4").reshape(3, 2)
    entry = TensorEntry(
        "layers.0.table", "F32", (3, 2), hashlib.sha256(table.tobytes()).hexdigest(), lambda: iter([table])
    )
    raw = write_bundle(tmp_path / "g.safetensors", [entry], tiny_manifest()).read_bytes()
    assert raw == expected
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0  # data starts 8-byte aligned


def test_independent_safetensors_reader_agrees(demo_bundles) -> None:
    st = demo_bundles["safetensors"]
    with open_bundle(st) as b, safe_open(str(st), framework="pt") as f:
        assert sorted(f.keys()) == b.tensor_names
        assert json.loads(f.metadata()["tol.manifest"]) == b.manifest
        t = f.get_tensor("layers.3.table")
        assert t.dtype == torch.bfloat16 and t.shape == (4096, 128)
        assert torch.equal(t.float(), b.dense_layer(3))
        ids = torch.tensor([5, 4095, 0, 5])
        assert torch.equal(b.lookup(3, ids), t[ids].float())


def test_hdf5_layout(demo_bundles) -> None:
    h5 = demo_bundles["hdf5"]
    with h5py.File(h5, "r") as f, open_bundle(h5) as b:
        ds = f["layers/2/table"]
        assert ds.dtype == np.dtype("<u2") and ds.attrs["tol.dtype"] == "BF16"
        assert ds.chunks == (1024, 128)  # 256 KiB row chunks
        assert json.loads(f.attrs["tol.manifest"]) == b.manifest
        assert bytes(f["tokenizer"][()]) == b.tokenizer_bytes()
        raw = torch.from_numpy(ds[()].view(np.int16)).view(torch.bfloat16)
        assert torch.equal(raw.float(), b.dense_layer(2))


@pytest.mark.parametrize(
    ("shape", "itemsize"),
    [((128256, 2048), 2), ((32000, 4096), 4), ((50000, 768), 2), ((151936, 8192), 2), ((128256, 1024), 1)],
)
def test_hdf5_chunks_sized_for_row_gathers(shape, itemsize) -> None:
    rows, width = chunk_shape(shape, itemsize)
    assert width == shape[1]
    assert 64 << 10 <= rows * width * itemsize <= 1 << 20


def test_convert_round_trips_are_lossless(demo_bundles, tmp_path: Path) -> None:
    st, h5 = demo_bundles["safetensors"], demo_bundles["hdf5"]
    with open_bundle(st) as a, open_bundle(h5) as b:
        assert a.manifest == b.manifest  # same tensor hashes, same everything
        for name in a.tensor_names:
            assert torch.equal(a.tensor(name).view(torch.uint8), b.tensor(name).view(torch.uint8))
    back = convert_bundle(h5, tmp_path / "back.safetensors")
    assert back.read_bytes() == st.read_bytes()
    again = convert_bundle(back, tmp_path / "again.h5")
    assert again.read_bytes() == h5.read_bytes()
    gz = convert_bundle(st, tmp_path / "gz.h5", compression="gzip")
    with open_bundle(gz, verify=True) as g:
        assert g.manifest == a.manifest


def _data_offset(path: Path, name: str) -> int:
    if path.suffix == ".h5":
        with h5py.File(path, "r") as f:
            return f[name.replace(".", "/")].id.get_chunk_info(0).byte_offset
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8 : 8 + n])
    return 8 + n + header[name]["data_offsets"][0]


@pytest.mark.parametrize("kind", ["safetensors", "hdf5"])
def test_verify_catches_a_flipped_byte(demo_bundles, tmp_path: Path, kind: str, cli) -> None:
    bad = tmp_path / demo_bundles[kind].name
    data = bytearray(demo_bundles[kind].read_bytes())
    data[_data_offset(demo_bundles[kind], "layers.4.table") + 1000] ^= 0x10
    bad.write_bytes(bytes(data))
    with open_bundle(bad) as b, pytest.raises(VerifyError, match=r"layers\.4\.table"):
        b.verify()
    r = cli("verify", bad)
    assert r.code == ExitCode.VERIFY_FAILED == 5 and "layers.4.table" in r.err
    r = cli("verify", bad, "--json")
    assert r.code == 5 and json.loads(r.out)["ok"] is False
    r = cli("verify", demo_bundles[kind], "--json")
    doc = json.loads(r.out)
    assert r.code == 0 and {k: doc[k] for k in ("path", "ok", "tensors", "bytes", "layers_present")} == {
        "path": str(demo_bundles[kind]),
        "ok": True,
        "tensors": 7,
        "bytes": 6 * 4096 * 128 * 2 + len(open_bundle(bad).tokenizer_bytes()),
        "layers_present": [0, 1, 2, 3, 4, 5],
    }


@pytest.mark.parametrize("kind", ["safetensors", "hdf5"])
def test_verify_catches_truncation(demo_bundles, tmp_path: Path, kind: str, cli) -> None:
    bad = tmp_path / demo_bundles[kind].name
    bad.write_bytes(demo_bundles[kind].read_bytes()[:-5000])
    r = cli("verify", bad)
    assert r.code == ExitCode.VERIFY_FAILED, r.err
    assert r.err.startswith("tolcli: error: ") and r.err.count("\n") == 1


def test_manifest_inconsistent_with_tensors_is_refused(tmp_path: Path) -> None:
    table = np.zeros((3, 2), dtype="<f4")
    entry = TensorEntry(
        "layers.0.table", "F32", (3, 2), hashlib.sha256(table.tobytes()).hexdigest(), lambda: iter([table])
    )
    m = tiny_manifest()
    m["layers"][0]["params"] = {"dtype": "F16"}  # codec says fp16, tensor is fp32
    out = write_bundle(tmp_path / "bad.safetensors", [entry], m)
    with pytest.raises(InputError, match="expects F16"):
        open_bundle(out)
    m = tiny_manifest()
    m["model"]["num_layers"] = 2
    out = write_bundle(tmp_path / "bad2.safetensors", [entry], m)
    with pytest.raises(InputError, match=r"indices 0\.\.1"):
        open_bundle(out)


def test_hdf5_external_link_and_virtual_dataset_refused(demo_bundles, tmp_path: Path) -> None:
    for how in ("external", "virtual"):
        bad = tmp_path / f"{how}.h5"
        bad.write_bytes(demo_bundles["hdf5"].read_bytes())
        with h5py.File(bad, "a") as f:
            if how == "external":
                f["layers/9"] = h5py.ExternalLink("/etc/passwd", "/x")
            else:
                layout = h5py.VirtualLayout(shape=(4,), dtype="u1")
                layout[:] = h5py.VirtualSource(str(tmp_path / "other.h5"), "x", shape=(4,))
                f.create_virtual_dataset("extra", layout)
        with pytest.raises(InputError, match=how):
            open_bundle(bad)


def test_not_a_bundle(tmp_path: Path, cli) -> None:
    p = tmp_path / "x.safetensors"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n")
    r = cli("inspect", p)
    assert r.code == ExitCode.BAD_INPUT and "Git LFS pointer" in r.err
    p.write_text("<!DOCTYPE html><html>")
    assert "HTML" in cli("verify", p).err


def test_written_manifest_validates_against_printed_schema(demo_bundles, cli) -> None:
    r = cli("schema")
    schema = json.loads(r.out)
    assert schema == MANIFEST_SCHEMA
    jsonschema.Draft202012Validator.check_schema(schema)
    with open_bundle(demo_bundles["safetensors"]) as b:
        jsonschema.validate(b.manifest, schema)


def _schema_paths(schema: dict, prefix: str = "") -> list[str]:
    out = []
    props = schema.get("properties", {})
    for k, v in props.items():
        out.append(prefix + k)
        out += _schema_paths(v, prefix + k + ".")
        if "items" in v and isinstance(v["items"], dict):
            out += _schema_paths(v["items"], prefix + k + "[].")
    return out


def test_bundle_format_doc_covers_the_schema() -> None:
    text = (DOCS / "bundle-format.md").read_text(encoding="utf-8")
    missing = [p for p in _schema_paths(MANIFEST_SCHEMA) if f"`{p}`" not in text]
    assert not missing, f"docs/bundle-format.md does not describe: {missing}"


def test_cli_round_trip_with_sha256sums(tmp_path: Path, cli) -> None:
    st = tmp_path / "a.safetensors"
    r = cli("precompute", "demo", "-o", st, "--dtype", "fp16", "--json")
    assert r.code == 0 and json.loads(r.out)["manifest"]["layers"][0]["params"] == {"dtype": "F16"}
    r = cli("convert", st, tmp_path / "a.h5", "--sha256sums", tmp_path / "SHA256SUMS")
    assert r.code == 0 and "wrote" in r.out
    subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path, check=True, capture_output=True)
    r = cli("inspect", tmp_path / "a.h5", "--json")
    doc = json.loads(r.out)
    assert doc["summary"]["fraction_of_dense_fp16"] == 1.0 and doc["summary"]["container"] == "hdf5"
    r = cli("inspect", st)
    assert "dtype=F16" in r.out and "100.0% of dense fp16" in r.out
    assert cli("convert", st, tmp_path / "a.h5").code == ExitCode.OUTPUT
    assert cli("convert", st, tmp_path / "a.bin").code == ExitCode.USAGE
