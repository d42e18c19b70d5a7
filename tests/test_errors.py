"""The bad-input matrix of docs/errors.md: one test per row not covered elsewhere, and a check that every
row names a test that exists."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest

from tolcli import convert_bundle, eval_ppl, open_bundle, precompute
from tolcli.errors import ExitCode, InputError, VerifyError
from tolcli.testing import random_state_dict, tiny_config, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("err")
    cfg = tiny_config("memoryllm", vocab_size=37, hidden_size=32, intermediate_size=32, num_hidden_layers=2)
    ck = write_checkpoint(d / "ckpt", cfg, random_state_dict(cfg))
    return precompute(ck, d / "b.safetensors", dtype="fp32").path


def header_of(raw: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def with_header(raw: bytes, header: dict) -> bytes:
    n, _ = header_of(raw)
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def test_corrupted_json_header(bundle: Path, tmp_path: Path) -> None:
    raw = bytearray(bundle.read_bytes())
    raw[9] = ord("#")  # inside the JSON
    (tmp_path / "x.safetensors").write_bytes(bytes(raw))
    with pytest.raises(InputError, match="corrupted safetensors header"):
        open_bundle(tmp_path / "x.safetensors")


def test_forged_shape_is_refused_before_allocating(bundle: Path, tmp_path: Path) -> None:
    raw = bundle.read_bytes()
    _, h = header_of(raw)
    h["layers.0.table"]["shape"] = [1 << 30, 1 << 30]  # 2^60 values claimed
    (tmp_path / "x.safetensors").write_bytes(with_header(raw, h))
    with pytest.raises(InputError, match="offsets span"):
        open_bundle(tmp_path / "x.safetensors")
    _, h = header_of(raw)
    last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
    h[last]["shape"] = [h[last]["shape"][0] + (1 << 40)]  # the last tensor claims a terabyte more (U8)
    h[last]["data_offsets"][1] += 1 << 40
    (tmp_path / "y.safetensors").write_bytes(with_header(raw, h))
    with pytest.raises((InputError, VerifyError), match=r"corrupted header entry|file is truncated"):
        open_bundle(tmp_path / "y.safetensors")  # a dimension beyond 2^31, or bytes beyond the file


def test_overlapping_offsets(bundle: Path, tmp_path: Path) -> None:
    raw = bundle.read_bytes()
    _, h = header_of(raw)
    a, b = h["layers.0.table"]["data_offsets"], h["layers.1.table"]["data_offsets"]
    h["layers.1.table"]["data_offsets"] = [a[0], a[0] + (b[1] - b[0])]  # both tensors on the same bytes
    (tmp_path / "x.safetensors").write_bytes(with_header(raw, h))
    with pytest.raises(InputError, match="overlapping or non-contiguous"):
        open_bundle(tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    ("edit", "msg"),
    [
        (lambda m: m.pop("layers"), "manifest is invalid"),
        (lambda m: m.update(format_version=7), "newer than this tolcli"),
        (lambda m: m["model"].update(vocab_size=38), "shape implies|stored as|vocabulary.size"),
        (lambda m: m["vocabulary"].update(size=99), "vocabulary.size differs"),
        (lambda m: m["layers"][1]["params"].update(dtype="BF16"), "expects BF16"),
    ],
)
def test_manifest_inconsistent_or_malformed(bundle: Path, tmp_path: Path, edit, msg: str) -> None:
    raw = bundle.read_bytes()
    _, h = header_of(raw)
    m = json.loads(h["__metadata__"]["tol.manifest"])
    edit(m)
    h["__metadata__"]["tol.manifest"] = json.dumps(m)
    (tmp_path / "x.safetensors").write_bytes(with_header(raw, h))
    with pytest.raises(InputError, match=msg):
        open_bundle(tmp_path / "x.safetensors")


def test_manifest_missing_or_not_json(bundle: Path, tmp_path: Path, cli) -> None:
    raw = bundle.read_bytes()
    _, h = header_of(raw)
    h["__metadata__"] = {"format": "pt"}
    (tmp_path / "x.safetensors").write_bytes(with_header(raw, h))
    r = cli("inspect", tmp_path / "x.safetensors")
    assert r.code == ExitCode.BAD_INPUT and "not a tolcli bundle" in r.err
    h["__metadata__"]["tol.manifest"] = "{not json"
    (tmp_path / "y.safetensors").write_bytes(with_header(raw, h))
    with pytest.raises(InputError, match="not valid JSON"):
        open_bundle(tmp_path / "y.safetensors")


def test_hdf5_external_storage_refused(bundle: Path, tmp_path: Path) -> None:
    h5 = convert_bundle(bundle, tmp_path / "x.h5")
    (tmp_path / "raw.bin").write_bytes(bytes(64))
    with h5py.File(h5, "a") as f:
        f.create_dataset("extra", shape=(64,), dtype="u1", external=[(str(tmp_path / "raw.bin"), 0, 64)])
    with pytest.raises(InputError, match="external storage"):
        open_bundle(h5)


def test_nan_in_weights_is_reported_with_layer_and_count(tmp_path: Path, cli) -> None:
    cfg = tiny_config("memoryllm", num_hidden_layers=3)
    state = random_state_dict(cfg)
    state["model.layers.2.mlp.up_proj.weight"][5, :7] = float("nan")
    d = write_checkpoint(tmp_path / "c", cfg, state)
    r = cli("precompute", d, "-o", tmp_path / "t.safetensors")
    assert r.code == ExitCode.BAD_INPUT
    assert "layer 2:" in r.err and "model.layers.2.mlp.up_proj.weight (7)" in r.err
    assert not (tmp_path / "t.safetensors").exists()


def test_nan_in_a_table_fails_verify(bundle: Path, tmp_path: Path, cli) -> None:
    raw = bytearray(bundle.read_bytes())
    n, h = header_of(bytes(raw))
    start = 8 + n + h["layers.1.table"]["data_offsets"][0]
    raw[start : start + 4] = np.array([np.nan], dtype="<f4").tobytes()
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(bytes(raw))
    with open_bundle(bad) as b:
        with pytest.raises(VerifyError, match=r"layers\.1\.table"):  # the hash catches it first...
            b.verify()
        with pytest.raises(VerifyError, match="layer 1: 1 NaN"):  # ...and the value check names the layer
            b.check_values()
    r = cli("convert", bad, tmp_path / "y.h5", "--verify")  # --verify on read refuses it too
    assert r.code == ExitCode.VERIFY_FAILED and not (tmp_path / "y.h5").exists()


def test_bundle_and_checkpoint_sizes_must_match(bundle: Path, tmp_path: Path) -> None:
    other = write_checkpoint(
        tmp_path / "c",
        tiny_config("memoryllm", vocab_size=41),
        random_state_dict(tiny_config("memoryllm", vocab_size=41)),
    )
    np.save(tmp_path / "ids.npy", np.arange(30))
    with pytest.raises(InputError, match="does not match the checkpoint"):
        eval_ppl(other, [tmp_path / "ids.npy"], tols=[bundle], ctx=16)


def test_every_row_of_errors_md_names_an_existing_test() -> None:
    text = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    text = text.split("## The bad-input matrix")[1].split("## Resource bounds")[0]
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= 25
    for line in rows:
        refs = re.findall(r"`(tests/test_\w+\.py)::(\w+)`", line)
        assert refs, f"row without a test: {line}"
        for file, name in refs:
            source = (ROOT / file).read_text(encoding="utf-8")
            assert re.search(rf"^def {name}\(", source, re.M), f"{file}::{name} does not exist"


def test_library_errors_name_parameters_and_the_cli_names_flags(make_ckpt, tmp_path: Path, cli) -> None:
    from tolcli import precompute
    from tolcli.errors import UsageError

    ckpt = make_ckpt("memoryllm")
    with pytest.raises(UsageError) as e:
        precompute(ckpt, tmp_path / "t.safetensors", batch_rows=0, dtype="fp32")
    assert str(e.value) == "batch_rows must be >= 1, got 0"
    r = cli("precompute", ckpt, "-o", tmp_path / "t.safetensors", "--batch-tokens", "0")
    assert r.code == 2 and r.err == "tolcli: error: --batch-tokens must be >= 1, got 0\n"
    r = cli("precompute", ckpt, "-o", tmp_path / "t.safetensors", "--batch-tokens", "0", "--json")
    error = json.loads(r.out)["error"]
    assert r.code == 2 and error["message"] == "--batch-tokens must be >= 1, got 0" and error["code"] == "usage"
    r = cli("eval-ppl", ckpt, "--data", tmp_path / "x.txt", "--drop-last", "1", "--keep-layers", "0")
    assert r.err == "tolcli: error: give --drop-last or --layers, not both\n"
