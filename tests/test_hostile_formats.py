"""Hostile inputs, one class of the issue per section: each test builds the input an attacker (or a careless user)
made and asserts ONE clean error naming the file (InputError exit 4, VerifyError exit 5), never an internal error,
never a hang (every case that used to hang or exhaust memory runs under a SIGALRM :func:`deadline`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zstandard as zstd

from tests.adversarial import (
    deadline,
    honest_bundle,
    manifest_for,
    read_header,
    reference_lookup,
    safetensors_with_header,
    tensors_section,
    write_raw,
)
from tolcli import demo_checkpoint_path, open_bundle, open_checkpoint
from tolcli.bundle.sharded import INDEX_NAME
from tolcli.checkpoint import ST_INDEX
from tolcli.codecs import DenseCodec, Int4Codec
from tolcli.errors import CheckpointError, ExitCode, InputError, OutputError, TolcliError, VerifyError
from tolcli.jsonsafe import MAX_INT_DIGITS
from tolcli.text import load_token_weights, read_tokens
from tolcli.transport import pack, unpack

DEMO_TOKENIZER = demo_checkpoint_path() / "tokenizer.json"


def one_clean_line(r, code: int, *needles: str) -> None:
    """A CLI result: the exit code, one short line on stderr holding every needle, no traceback."""
    assert r.code == code, r.err
    assert r.err.startswith("tolcli: error: ") and r.err.count("\n") == 1 and len(r.err) < 1000, r.err
    assert "Traceback" not in r.err and "internal error" not in r.err
    for n in needles:
        assert n in r.err, (n, r.err)


@pytest.fixture(scope="module")
def h5_bundle(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile-h5")
    return honest_bundle(d / "good.h5", [DenseCodec("F32"), Int4Codec(32)])[0]


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


# ==== 3. HDF5 that hangs or exhausts ===========================================================================
def test_hdf5_hard_link_dag_and_cycle_are_refused_quickly(h5_bundle: Path, tmp_path: Path, cli) -> None:
    """40 levels of double hard links: 2^40 paths in a ~100 KB file. Each object is visited once; the first one
    reached twice is refused (a bundle holds every object once)."""
    dag = copy_of(h5_bundle, tmp_path / "dag.h5")
    with h5py.File(dag, "a") as f:
        cur = f.create_group("dag")
        for k in range(40):
            nxt = f.create_group(f"tmp{k}")
            cur["a"] = nxt
            cur["b"] = nxt
            del f[f"tmp{k}"]  # reachable only through the two links
            cur = nxt
    assert dag.stat().st_size < 200_000
    with deadline(5, "opening a hard-link DAG"), pytest.raises(InputError, match="second hard link"):
        open_bundle(dag)
    with deadline(10, "tolcli verify on a hard-link DAG"):
        one_clean_line(cli("verify", dag), ExitCode.BAD_INPUT, "dag.h5", "second hard link")

    cycle = copy_of(h5_bundle, tmp_path / "cycle.h5")
    with h5py.File(cycle, "a") as f:
        f["layers/loop"] = f["/"]
    with deadline(5, "opening a hard-link cycle"), pytest.raises(InputError, match=r"/layers/loop is a second hard"):
        open_bundle(cycle)


def _declared_dense_manifest(V: int, h: int) -> dict:
    """A consistent manifest declaring one dense F32 [V, h] table (whose bytes the caller may never write)."""
    layer = {
        "index": 0,
        "status": "present",
        "codec": "dense",
        "params": {"dtype": "F32"},
        "tensors": {"table": "layers.0.table"},
        "stored_bytes": V * h * 4,
        "bits_per_value": 32.0,
    }
    m = manifest_for(V, h, [layer])
    m["tensors"] = {"layers.0.table": {"dtype": "F32", "shape": [V, h], "bytes": V * h * 4, "sha256": "0" * 64}}
    return m


def _sparse_bundle(path: Path, layout: str) -> Path:
    """A few KB declaring a 512 GiB dense table (2^24 x 8192 fp32) with a consistent manifest, never written."""
    V, h = 1 << 24, 8192
    m = _declared_dense_manifest(V, h)
    with h5py.File(path, "w", libver="earliest") as f:
        f.attrs.create("tol.manifest", json.dumps(m), dtype=h5py.string_dtype("utf-8"))
        chunks = (32, h) if layout == "chunked" else None
        ds = f.create_dataset("layers/0/table", shape=(V, h), dtype="<f4", chunks=chunks)
        ds.attrs.create("tol.dtype", "F32", dtype=h5py.string_dtype("ascii"))
    return path


@pytest.mark.parametrize("layout", ["chunked", "contiguous"])
def test_hdf5_sparse_dataset_declaring_512_gib_is_refused(tmp_path: Path, layout: str, cli) -> None:
    bad = _sparse_bundle(tmp_path / f"sparse-{layout}.h5", layout)
    assert bad.stat().st_size < 64_000
    with deadline(5, "opening a sparse 512 GiB dataset"), pytest.raises(VerifyError, match="sparse"):
        open_bundle(bad)
    with deadline(20, "verify/convert/compress of a sparse dataset"):
        one_clean_line(cli("verify", bad), ExitCode.VERIFY_FAILED, bad.name, "549,755,813,888 bytes")
        one_clean_line(cli("convert", bad, tmp_path / "out.safetensors"), ExitCode.VERIFY_FAILED, "sparse")
        one_clean_line(cli("compress", bad, "-o", tmp_path / "c.safetensors", "-s", "int4"), ExitCode.VERIFY_FAILED)
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "c.safetensors").exists()


def test_hdf5_partly_written_table_is_refused_as_sparse(h5_bundle: Path, tmp_path: Path) -> None:
    """Some chunks never written read as fill values: refused from the chunk count, not left to the hash."""
    bad = copy_of(h5_bundle, tmp_path / "partial.h5")
    with h5py.File(bad, "a") as f:
        table = f["layers/0/table"][()]
        del f["layers/0/table"]
        ds = f.create_dataset("layers/0/table", shape=table.shape, dtype="<f4", chunks=(8, 64))
        ds[:8] = table[:8]
        ds[16:] = table[16:]
        ds.attrs.create("tol.dtype", "F32", dtype=h5py.string_dtype("ascii"))
    with pytest.raises(VerifyError, match=r"declares 9,472 bytes in 5 chunks but stores 4 \(a sparse dataset\)"):
        open_bundle(bad)


def test_hdf5_gzip_bomb_is_refused_unread(tmp_path: Path, cli) -> None:
    """About 1 MB of gzip chunks that expand to 1 GiB: refused from the sizes alone (a ratio above 64x)."""
    V, h = 1 << 18, 1024
    bad = tmp_path / "bomb.h5"
    m = _declared_dense_manifest(V, h)
    chunk = zlib.compress(bytes(256 * h * 4), 9)
    with h5py.File(bad, "w", libver="earliest") as f:
        f.attrs.create("tol.manifest", json.dumps(m), dtype=h5py.string_dtype("utf-8"))
        ds = f.create_dataset("layers/0/table", shape=(V, h), dtype="<f4", chunks=(256, h), compression="gzip")
        for r in range(0, V, 256):
            ds.id.write_direct_chunk((r, 0), chunk)
    assert bad.stat().st_size < 2_000_000
    with deadline(5, "opening a gzip bomb"), pytest.raises(InputError, match="decompression bomb"):
        open_bundle(bad)
    with deadline(10, "tolcli verify of a gzip bomb"):
        one_clean_line(cli("verify", bad), ExitCode.BAD_INPUT, "bomb.h5", "decompression bomb")


# ==== 6. tokenizer (and config / weights / index) links that leave the checkpoint; garbage tokenizers ===========
def test_tokenizer_link_out_of_the_checkpoint_is_refused(make_ckpt, tmp_path: Path, cli) -> None:
    d = make_ckpt("memoryllm")
    secret = tmp_path / "id_ed25519"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot for bundles\n")
    (d / "tokenizer.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is a link that leaves its directory"):
        open_checkpoint(d)
    out = tmp_path / "t.safetensors"
    one_clean_line(cli("precompute", d, "-o", out), ExitCode.BAD_INPUT, "tokenizer.json", "leaves its directory")
    assert not out.exists()
    # a link that stays inside the checkpoint is fine, and what is embedded is the real tokenizer
    (d / "tokenizer.json").unlink()
    (d / "tok").mkdir()
    shutil.copyfile(DEMO_TOKENIZER, d / "tok" / "tokenizer.json")
    (d / "tokenizer.json").symlink_to(Path("tok") / "tokenizer.json")
    assert open_checkpoint(d).tokenizer_bytes == DEMO_TOKENIZER.read_bytes()


@pytest.mark.parametrize("which", ["config.json", "model.safetensors", ST_INDEX, "shard"])
def test_checkpoint_files_linking_out_are_refused(make_ckpt, tmp_path: Path, which: str) -> None:
    d = make_ckpt("memoryllm", layout="sharded" if which in (ST_INDEX, "shard") else "safetensors")
    if which == "shard":
        which = sorted(p.name for p in d.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(d / which, outside / which)
    (d / which).symlink_to(outside / which)
    with pytest.raises(CheckpointError, match=r"is a link that leaves its directory") as e:
        open_checkpoint(d)
    assert which in str(e.value)


def test_garbage_or_oversized_tokenizer_is_refused_before_embedding(
    make_ckpt, tmp_path: Path, cli, monkeypatch
) -> None:
    d = make_ckpt("memoryllm")
    (d / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(CheckpointError, match="not a tokenizers tokenizer"):
        open_checkpoint(d)
    one_clean_line(
        cli("precompute", d, "-o", tmp_path / "t.safetensors"), ExitCode.BAD_INPUT, "tokenizer.json", "tokenizer"
    )
    assert not (tmp_path / "t.safetensors").exists()
    (d / "tokenizer.json").write_bytes(b'{"\xff": 1}')
    with pytest.raises(CheckpointError, match="not UTF-8"):
        open_checkpoint(d)
    shutil.copyfile(DEMO_TOKENIZER, d / "tokenizer.json")
    assert open_checkpoint(d).tokenizer_bytes == DEMO_TOKENIZER.read_bytes()  # the real one passes
    monkeypatch.setattr("tolcli.checkpoint.MAX_TOKENIZER_BYTES", 1000)
    with pytest.raises(CheckpointError, match=r"tokenizer has [\d,]+ bytes \(limit 1,000\)"):
        open_checkpoint(d)


# ==== 7. verify says OK while a runtime reads different data =================================================
def test_hdf5_dataset_shadowing_a_layer_is_refused(h5_bundle: Path, tmp_path: Path, cli) -> None:
    """``/layers.0.table`` would become tensor ``layers.0.table`` too, shadowing ``/layers/0/table``."""
    for where in ("layers.0.table", "layers/0.table", "layers.0/table"):
        bad = copy_of(h5_bundle, tmp_path / "shadow.h5")
        with h5py.File(bad, "a") as f:
            f.create_dataset(where, data=np.zeros((37, 64), "<f4"))
        with pytest.raises(InputError, match="would alias a tensor name"):
            open_bundle(bad)
    one_clean_line(cli("verify", bad), ExitCode.BAD_INPUT, "shadow.h5", "alias")


def _polyglot(tmp_path: Path) -> bytes:
    """One file that is a valid safetensors bundle AND a valid HDF5 file (HDF5 after a 64 KiB user block that
    holds the safetensors header; the HDF5 bytes are the safetensors tokenizer tensor's tail)."""
    _, m, arrays = honest_bundle(tmp_path / "p.safetensors", [DenseCodec("F32")], V=8, h=8)
    ub = 1 << 16
    h5 = tmp_path / "p-ub.h5"
    with h5py.File(h5, "w", userblock_size=ub) as f:
        f.create_dataset("layers/0/table", data=np.full((8, 8), 7.0, "<f4"))  # other data than the safetensors
    h5_part = h5.read_bytes()[ub:]
    table = arrays["layers.0.table"][1]
    pad = 0
    for _ in range(10):  # the tokenizer's length changes the header's length: iterate to the fixed point
        tok = np.frombuffer(bytes(pad) + h5_part, dtype=np.uint8)
        arrays2 = {"layers.0.table": arrays["layers.0.table"], "tokenizer": ("U8", tok)}
        m2 = dict(m, vocabulary=dict(m["vocabulary"], embedded=True))
        m2["tensors"] = tensors_section(arrays2)
        m2["vocabulary"]["tokenizer_sha256"] = m2["tensors"]["tokenizer"]["sha256"]
        out = write_raw(tmp_path / "poly.safetensors", arrays2, m2, fill_tensors=False).read_bytes()
        (n,) = struct.unpack("<Q", out[:8])
        if 8 + n + table.nbytes + pad == ub:
            return out
        pad = ub - (8 + n + table.nbytes)
    raise AssertionError("no polyglot layout found")


def test_polyglot_and_suffix_contradicting_content_are_refused(h5_bundle: Path, tmp_path: Path, cli) -> None:
    raw = _polyglot(tmp_path)
    (tmp_path / "x.bin").write_bytes(raw)
    with h5py.File(tmp_path / "x.bin", "r") as f:  # really both: h5py reads other data from the same bytes
        assert float(f["layers/0/table"][0, 0]) == 7.0
    named_h5 = tmp_path / "poly.h5"
    named_h5.write_bytes(raw)
    with pytest.raises(InputError, match=r"named \.h5 \(HDF5\) but the content is safetensors"):
        open_bundle(named_h5)
    one_clean_line(cli("verify", named_h5), ExitCode.BAD_INPUT, "poly.h5", "named .h5 (HDF5)", "safetensors")
    named_st = tmp_path / "poly.safetensors"
    with pytest.raises(InputError, match="also an HDF5 file"):
        open_bundle(named_st)
    # and the plain mix-ups: HDF5 content named .safetensors, safetensors content named .hdf5
    h5_as_st = copy_of(h5_bundle, tmp_path / "h5.safetensors")
    with pytest.raises(InputError, match=r"named \.safetensors \(safetensors\) but the content is HDF5"):
        open_bundle(h5_as_st)
    st = honest_bundle(tmp_path / "s.safetensors", [DenseCodec("F32")])[0]
    with pytest.raises(InputError, match=r"named \.hdf5 \(HDF5\) but the content is safetensors"):
        open_bundle(copy_of(st, tmp_path / "s.hdf5"))


def _lie(tmp_path: Path, codecs, edit_manifest=None, edit_arrays=None, name: str = "lie.safetensors") -> Path:
    """An honest bundle re-written with an edited manifest and/or edited tensors, every hash consistent."""
    _, m, arrays = honest_bundle(tmp_path / "honest.safetensors", codecs)
    m = json.loads(json.dumps(m))
    if edit_arrays is not None:
        edit_arrays(arrays)
    m["tensors"] = tensors_section(arrays)
    if edit_manifest is not None:
        edit_manifest(m)
    return write_raw(tmp_path / name, arrays, m, fill_tensors=False)


def _relabel_int4_as_nf4(m) -> None:
    """Relabelled, the offsets dropped from the layer (its sizes adjusted), but left in the file."""
    e = m["layers"][0]
    e.update(codec="nf4", params={"bits": 4, "group_size": 32})
    del e["tensors"]["offsets"]
    e["stored_bytes"] -= m["tensors"]["layers.0.offsets"]["bytes"]
    e["bits_per_value"] = 8 * e["stored_bytes"] / (37 * 64)


def _alias(m) -> None:
    m["layers"][1]["tensors"]["table"] = "layers.0.table"


def _set(path: tuple, value):
    def edit(m) -> None:
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return edit


def _extra_tensor(arrays) -> None:
    arrays["layers.9.table"] = ("U8", np.zeros(4, np.uint8))


def _put(value: float, row: int = 3):
    def edit(arrays) -> None:
        dtype, arr = arrays["layers.1.table"]
        arr = arr.copy()
        arr[row, 2] = value
        arrays["layers.1.table"] = (dtype, arr)

    return edit


@pytest.mark.parametrize(
    ("case", "codecs", "edit_manifest", "edit_arrays", "error", "match"),
    [
        ("int4 relabelled nf4", [Int4Codec(32), DenseCodec("F32")], _relabel_int4_as_nf4, None, InputError,
         "'layers.0.offsets' is stored but no layer reads it"),
        ("two layers aliased to one table", [DenseCodec("F32")] * 2, _alias, None, InputError,
         "role table must be tensor 'layers.1.table'"),
        ('"symmetric": "false"', [Int4Codec(32), DenseCodec("F32")],
         _set(("layers", 0, "params", "symmetric"), "false"), None, InputError, "'false' is not of type 'boolean'"),
        ("a float group size", [Int4Codec(32), DenseCodec("F32")],
         _set(("layers", 0, "params", "group_size"), 32.0), None, InputError, "32.0 is not of type 'integer'"),
        ("fp16_overflow beyond the table", [DenseCodec("F16")] * 2, _set(("layers", 1, "fp16_overflow"), 37 * 64 + 1),
         None, InputError, "exceeds the table"),
        ("an unreferenced tensor", [DenseCodec("F32")] * 2, None, _extra_tensor, InputError,
         "'layers.9.table' is stored but no layer reads it"),
        ("stored_bytes", [DenseCodec("F32")] * 2, _set(("layers", 1, "stored_bytes"), 1), None, InputError,
         "stored_bytes is 1"),
        ("Inf in an F32 table counted as fp16 overflow", [DenseCodec("F32")] * 2,
         _set(("layers", 1, "fp16_overflow"), 1), _put(np.inf), VerifyError,
         "Inf is allowed only in an F16 dense table"),
        ("3e38 beyond max_abs", [DenseCodec("F32")] * 2, None, _put(3e38), VerifyError, "max_abs"),
        ("3e38 with max_abs raised to match", [DenseCodec("F32")] * 2, _set(("layers", 1, "max_abs"), 3e38),
         _put(3e38), VerifyError, "beyond the fp16 range, the manifest's fp16_overflow is 0"),
    ],
)  # fmt: skip
def test_manifest_lies_with_consistent_hashes_are_refused(
    tmp_path: Path, cli, case: str, codecs, edit_manifest, edit_arrays, error, match: str
) -> None:
    bad = _lie(tmp_path, codecs, edit_manifest, edit_arrays)
    with pytest.raises(error, match=match), open_bundle(bad) as b:
        b.verify()
    one_clean_line(cli("verify", bad), error.exit_code, "lie.safetensors")


def test_honestly_recorded_large_values_pass_and_read_back(tmp_path: Path) -> None:
    """The control: 3e38 recorded in max_abs and fp16_overflow is what the bundle says; verify passes."""

    def record(m) -> None:
        m["layers"][1].update(max_abs=3e38, fp16_overflow=1)

    ok = _lie(tmp_path, [DenseCodec("F32")] * 2, record, _put(3e38))
    with open_bundle(ok) as b:
        b.verify()
        assert float(b.lookup(1, [3])[0, 2]) == np.float32(3e38)


def test_manifest_hash_is_the_same_in_every_form(tmp_path: Path) -> None:
    """``manifest_sha256`` is the same for the file, its HDF5 twin and its sharded form; the file's (or index's)
    sha256 covers it (docs/bundle-format.md, "Integrity")."""
    st, _, _ = honest_bundle(tmp_path / "a.safetensors", [DenseCodec("F32"), Int4Codec(32)], tokenizer=b"{}")
    from tolcli import convert_bundle

    forms = [st, convert_bundle(st, tmp_path / "a.h5"), convert_bundle(st, tmp_path / "dir", max_shard_size=4000)]
    digests = set()
    for p in forms:
        with open_bundle(p, verify=True) as b:
            digests.add(b.manifest_sha256)
    assert len(digests) == 1
    index = json.loads((tmp_path / "dir" / INDEX_NAME).read_text())
    from tolcli.bundle.manifest import canonical_json

    assert hashlib.sha256(canonical_json(index["manifest"]).encode()).hexdigest() in digests


# ==== 8. untrusted JSON ends as internal errors ============================================================
# Each hazard and the words its message must hold (None: it depends on where the value lands).
EXPECTED = {
    "NaN": "NaN is not JSON",
    "Infinity": "-Infinity is not JSON",
    "1e999": "overflows a float",
    "4,300+ digits": "an integer of 5,000 digits",
    f"{MAX_INT_DIGITS + 1} digits": f"an integer of {MAX_INT_DIGITS + 1} digits",
    "deep nesting": "levels deep (limit 64)",
    "float for an integer": None,
    "duplicate key": "appears twice in one object",
}
HAZARDS = {
    "NaN": "NaN",
    "Infinity": "-Infinity",
    "1e999": "1e999",
    "4,300+ digits": "9" * 5000,
    f"{MAX_INT_DIGITS + 1} digits": "9" * (MAX_INT_DIGITS + 1),
    "deep nesting": "[" * 100_000 + "]" * 100_000,
    "float for an integer": "37.0",
    "duplicate key": '37,"vocab_size":37',
}


def _edited(text: str, key: str, value: str) -> str:
    """``"key": <number>`` (the first one) with its value replaced by ``value``."""
    i = text.index(f'"{key}":') + len(key) + 3
    while text[i] == " ":
        i += 1
    j = i
    assert text[j] in "-0123456789", text[i - 20 : i + 20]
    while text[j] in "-0123456789.eE":
        j += 1
    return text[:i] + value + text[j:]


@pytest.fixture(scope="module")
def json_targets(tmp_path_factory, make_ckpt_module) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("json")
    st = honest_bundle(d / "b.safetensors", [DenseCodec("F32")])[0]
    h5 = honest_bundle(d / "b.h5", [DenseCodec("F32")])[0]
    sharded = honest_bundle(d / "sharded", [DenseCodec("F32")] * 2, max_shard_size=5000)[0]
    return {"st": st, "h5": h5, "sharded": sharded, "ckpt": make_ckpt_module("memoryllm", layout="sharded")}


@pytest.fixture(scope="module")
def make_ckpt_module(tmp_path_factory):
    from tolcli.testing import tiny_config, write_random_checkpoint

    def make(model_type: str, **kw) -> Path:
        return write_random_checkpoint(tmp_path_factory.mktemp("ck") / "c", tiny_config(model_type), **kw)

    return make


def _hostile_copy(targets: dict[str, Path], where: str, value: str, tmp: Path) -> tuple[Path, object]:
    """A copy of one document with ``value`` spliced in; returns (the file named in the error, a reading call)."""
    if where == "manifest (safetensors)":
        n, header = read_header(targets["st"])
        text = _edited(header["__metadata__"]["tol.manifest"], "vocab_size", value)
        header["__metadata__"]["tol.manifest"] = text
        raw = targets["st"].read_bytes()
        bad = safetensors_with_header(tmp / "m.safetensors", json.dumps(header), raw[8 + n :])
        return bad, lambda: open_bundle(bad)
    if where == "manifest (HDF5)":
        bad = copy_of(targets["h5"], tmp / "m.h5")
        with h5py.File(bad, "a") as f:
            text = _edited(f.attrs["tol.manifest"], "vocab_size", value)
            f.attrs.create("tol.manifest", text, dtype=h5py.string_dtype("utf-8"))
        return bad, lambda: open_bundle(bad)
    if where == "safetensors header":
        n, header = read_header(targets["st"])
        text = json.dumps(header, sort_keys=True)
        if value.startswith("37,"):  # the duplicate key: a second entry for the same tensor
            twice = '"layers.0.table": {"data_offsets": [0, 4], "dtype": "F32", "shape": [1]}, "__metadata__":'
            text = text.replace('"__metadata__":', twice, 1)
        else:
            text = text.replace('"shape": [37, 64]', '"shape": [' + value + ", 64]", 1)
        raw = targets["st"].read_bytes()
        bad = safetensors_with_header(tmp / "h.safetensors", text, raw[8 + n :])
        return bad, lambda: open_bundle(bad)
    if where == "shard index":
        bad = tmp / "sharded"
        shutil.copytree(targets["sharded"], bad)
        text = (bad / INDEX_NAME).read_text()
        (bad / INDEX_NAME).write_text(_edited(text, "format_version", value.replace("vocab_size", "format_version")))
        return bad / INDEX_NAME, lambda: open_bundle(bad)
    if where == "config.json":
        ck = tmp / "ck"
        shutil.copytree(targets["ckpt"], ck)
        text = json.dumps(json.loads((ck / "config.json").read_text()))
        (ck / "config.json").write_text(_edited(text, "vocab_size", value))
        return ck / "config.json", lambda: open_checkpoint(ck)
    if where == "checkpoint index":
        ck = tmp / "ck"
        shutil.copytree(targets["ckpt"], ck)
        text = (ck / ST_INDEX).read_text()
        (ck / ST_INDEX).write_text(_edited(text, "total_size", value.replace("vocab_size", "total_size")))
        return ck / ST_INDEX, lambda: open_checkpoint(ck)
    assert where == ".jsonl"
    data = tmp / "d.jsonl"
    data.write_text('{"text": "hello"}\n{"text": "x", "n": ' + value.replace("vocab_size", "n") + "}\n")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEMO_TOKENIZER))
    return data, lambda: read_tokens(data, tok, 4096)


@pytest.mark.parametrize(
    "where",
    [
        "manifest (safetensors)",
        "manifest (HDF5)",
        "safetensors header",
        "shard index",
        "config.json",
        "checkpoint index",
        ".jsonl",
    ],
)
def test_hostile_json_in_every_document_is_one_clean_error(json_targets, tmp_path: Path, where: str) -> None:
    for hazard, value in HAZARDS.items():
        if hazard == "float for an integer" and where in ("checkpoint index", ".jsonl"):
            continue  # free-form numbers there (an index's metadata, a .jsonl record's other fields)
        case = tmp_path / hazard.replace(" ", "_").replace(",", "").replace("+", "")
        case.mkdir()
        named, read = _hostile_copy(json_targets, where, value, case)
        with deadline(10, f"{hazard} in {where}"), pytest.raises(TolcliError) as e:
            read()
        msg = str(e.value)
        assert isinstance(e.value, InputError), (hazard, where, msg)
        assert str(named) in msg and "\n" not in msg and len(msg) < 1000, (hazard, where, msg)
        assert EXPECTED[hazard] is None or EXPECTED[hazard] in msg, (hazard, where, msg)


def test_hostile_json_exit_codes(json_targets, tmp_path: Path, cli) -> None:
    bad, _ = _hostile_copy(json_targets, "manifest (safetensors)", "NaN", tmp_path)
    one_clean_line(cli("verify", bad), ExitCode.BAD_INPUT, "m.safetensors", "NaN is not JSON", "line 1 column")
    ck = tmp_path / "c2"
    ck.mkdir()
    named, _ = _hostile_copy(json_targets, "config.json", "9" * 5000, ck)
    one_clean_line(cli("info", named.parent), ExitCode.BAD_INPUT, "config.json", "an integer of 5,000 digits")


def test_huge_or_nested_codec_params_give_a_short_error(tmp_path: Path, cli) -> None:
    """Params of 5 MB, or nested 60 deep: the error is one short line, not the params repeated."""
    for name, value in [("huge", "x" * 5_000_000), ("nested", json.loads("[" * 60 + "]" * 60))]:
        bad = _lie(
            tmp_path, [DenseCodec("F32")], _set(("layers", 0, "params", "dtype"), value), name=f"{name}.safetensors"
        )
        with pytest.raises(InputError, match="manifest is invalid at layers/0/params/dtype") as e:
            open_bundle(bad)
        assert len(str(e.value)) < 800
        one_clean_line(cli("inspect", bad), ExitCode.BAD_INPUT, f"{name}.safetensors")


# ==== 9. size bombs ===========================================================================================
def test_manifest_with_a_million_layers_is_refused_in_seconds(tmp_path: Path, cli) -> None:
    """A 40 MB manifest of 1M dropped layers used to take > 120 s per command; it is refused once parsed."""
    _, m, arrays = honest_bundle(tmp_path / "h.safetensors", [DenseCodec("F32")])
    m["layers"] = [m["layers"][0]] + [{"index": i, "status": "dropped"} for i in range(1, 1_000_000)]
    m["model"]["num_layers"] = 1_000_000
    bad = write_raw(tmp_path / "million.safetensors", arrays, m, fill_tensors=False)
    assert bad.stat().st_size > 30_000_000
    t0 = time.monotonic()
    with deadline(60, "a manifest of a million layers"), pytest.raises(InputError, match="1,000,000 entries"):
        open_bundle(bad)
    assert time.monotonic() - t0 < 30
    with deadline(60, "tolcli inspect of a million layers"):
        one_clean_line(cli("inspect", bad), ExitCode.BAD_INPUT, "layers has 1,000,000 entries (limit 4,096)")


def test_zst_bomb_is_refused_before_writing(tmp_path: Path, cli) -> None:
    """32 KB of zstd declaring 1 GiB: refused from the frame header, nothing written."""
    bomb = tmp_path / "bomb.zst"
    cctx = zstd.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)
    with open(bomb, "wb") as fo, cctx.stream_writer(fo, size=1 << 30, closefd=False) as w:
        zeros = bytes(1 << 20)
        for _ in range(1024):
            w.write(zeros)
    assert bomb.stat().st_size < 64_000
    out = tmp_path / "out.safetensors"
    with deadline(5, "unpacking a zstd bomb"), pytest.raises(InputError, match="decompression bomb"):
        unpack(bomb, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bomb.zst"]
    one_clean_line(cli("unpack", bomb, "-o", out), ExitCode.BAD_INPUT, "bomb.zst", "decompression bomb")


def test_unpack_stops_at_the_declared_size_and_checks_the_content_early(tmp_path: Path) -> None:
    st = honest_bundle(tmp_path / "b.safetensors", [DenseCodec("F32")])[0]
    z = pack(st, tmp_path / "b.zst").path
    with pytest.raises(InputError, match=r"named \.h5 \(HDF5\) but the content is safetensors"):
        unpack(z, tmp_path / "x.h5")  # the container is checked on the first decompressed bytes
    junk = tmp_path / "junk.zst"
    junk.write_bytes(zstd.ZstdCompressor(write_checksum=True).compress(b"\x00" * 100_000))
    with pytest.raises(InputError, match="does not hold a bundle"):
        unpack(junk, tmp_path / "y.safetensors")
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y.safetensors").exists()


def _forged_npy(path: Path, shape: tuple[int, ...], dtype: str = "<f8", data: bytes = bytes(16)) -> Path:
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode("latin1")
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data)
    return path


def test_forged_npy_header_is_refused_before_allocating(tmp_path: Path, cli) -> None:
    """A 100-byte .npy declaring 8 TiB of counts, or of token ids: refused from the header alone."""
    forged = _forged_npy(tmp_path / "counts.npy", (1 << 40,))
    with deadline(5, "a forged .npy header"):
        with pytest.raises(InputError, match=r"declares \(1099511627776,\) float64 \(8,796,093,022,208 bytes\)"):
            load_token_weights(37, weights_file=forged)
        with pytest.raises(InputError, match=r"expected 1-D numeric counts of length 37"):
            load_token_weights(37, weights_file=_forged_npy(tmp_path / "c36.npy", (36,), data=bytes(36 * 8)))
        with pytest.raises(InputError, match=r"declares .* but the file holds 16 data bytes"):
            load_token_weights(37, weights_file=_forged_npy(tmp_path / "c37.npy", (37,)))
        with pytest.raises(InputError, match="declares"):
            read_tokens(_forged_npy(tmp_path / "ids.npy", (1 << 40,), "<i8"), None, 37)
        with pytest.raises(InputError, match="integer or float dtype"):
            load_token_weights(2, weights_file=_forged_npy(tmp_path / "obj.npy", (2,), "|O"))
    good = tmp_path / "ok.npy"
    np.save(good, np.arange(37, dtype=np.int32))
    w, _ = load_token_weights(37, weights_file=good, floor=0.0)
    assert torch.equal(w, torch.arange(37, dtype=torch.float64))
    src = honest_bundle(tmp_path / "b.safetensors", [DenseCodec("F32")])[0]
    r = cli("compress", src, "-o", tmp_path / "c.safetensors", "-s", "svd", "--rank", "8", "--token-weights", forged)
    one_clean_line(r, ExitCode.BAD_INPUT, "counts.npy")


# ==== 11. ids, shards, unpack, FIFOs ==========================================================================
def test_lookup_refuses_non_integer_ids(tmp_path: Path) -> None:
    st = honest_bundle(tmp_path / "b.safetensors", [DenseCodec("F32")])[0]
    with open_bundle(st) as b:
        assert torch.equal(b.lookup(0, [1, 2]), b.lookup(0, np.array([1, 2], dtype=np.uint8)))
        assert b.lookup(0, []).shape == (0, 64)
        for bad in ([1.5], [1.0], torch.tensor([2.0]), np.array([0.5]), [True], torch.tensor([1], dtype=torch.bool)):
            with pytest.raises(InputError, match="token ids must be integers"):
                b.lookup(0, bad)
        with pytest.raises(InputError, match="token ids must"):
            b.lookup(0, [2**70])


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    return honest_bundle(tmp_path / "sh", [DenseCodec("F32")] * 3, max_shard_size=10_000)[0]


def test_shard_links_out_of_the_directory_and_extra_shards_are_refused(sharded: Path, tmp_path: Path, cli) -> None:
    shards = sorted(p for p in sharded.iterdir() if p.name.startswith("tol-"))
    assert len(shards) == 3
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(shards[1], outside / shards[1].name)
    shards[1].symlink_to(outside / shards[1].name)
    with pytest.raises(InputError, match="is a link that leaves its directory"):
        open_bundle(sharded)
    one_clean_line(cli("verify", sharded), ExitCode.BAD_INPUT, shards[1].name, "leaves its directory")
    # inside the directory, a link is fine
    shards[1].unlink()
    (sharded / "real").mkdir()
    shutil.move(outside / shards[1].name, sharded / "real" / shards[1].name)
    shards[1].symlink_to(Path("real") / shards[1].name)
    with open_bundle(sharded, verify=True):
        pass
    extra = sharded / "tol-00004-of-00004.safetensors"
    shutil.copyfile(shards[0], extra)
    with pytest.raises(InputError, match=r"tol-00004-of-00004\.safetensors looks like a shard but"):
        open_bundle(sharded)


def test_verify_checks_the_index_shard_hashes(sharded: Path, cli) -> None:
    index = json.loads((sharded / INDEX_NAME).read_text())
    rec = index["shards"][2]
    rec["sha256"] = ("0" if rec["sha256"][0] != "0" else "1") + rec["sha256"][1:]
    (sharded / INDEX_NAME).write_text(json.dumps(index))
    with open_bundle(sharded) as b, pytest.raises(VerifyError, match=rf"shard {rec['name']}: sha256"):
        b.verify()
    one_clean_line(cli("verify", sharded), ExitCode.VERIFY_FAILED, rec["name"], "does not match the index")


def test_unpack_refuses_trailing_data_and_checksum_less_frames(tmp_path: Path, cli) -> None:
    st = honest_bundle(tmp_path / "b.safetensors", [DenseCodec("F32")])[0]
    z = pack(st, tmp_path / "b.zst").path
    frame = z.read_bytes()
    cases = {
        "trailing junk": (frame + b"junk", "unexpected data after the zstd frame"),
        "a second frame": (frame + zstd.ZstdCompressor(write_checksum=True).compress(b"x"), "after the zstd frame"),
        "no checksum": (zstd.ZstdCompressor(write_checksum=False).compress(st.read_bytes()), "no content checksum"),
        "no content size": (
            zstd.ZstdCompressor(write_checksum=True, write_content_size=False).compressobj().compress(st.read_bytes())
            + b"",
            "does not declare its content size",
        ),
    }
    nc = zstd.ZstdCompressor(write_checksum=True, write_content_size=False).compressobj()
    cases["no content size"] = (nc.compress(st.read_bytes()) + nc.flush(), "does not declare its content size")
    for name, (data, match) in cases.items():
        src = tmp_path / f"{name.replace(' ', '-')}.zst"
        src.write_bytes(data)
        out = tmp_path / "out.safetensors"
        with pytest.raises(InputError, match=match):
            unpack(src, out)
        assert not out.exists(), name
    one_clean_line(cli("unpack", tmp_path / "trailing-junk.zst", "-o", tmp_path / "o.safetensors"), ExitCode.BAD_INPUT)
    assert unpack(z, tmp_path / "fine.safetensors").path.read_bytes() == st.read_bytes()


def test_fifo_inputs_are_refused_not_waited_on(tmp_path: Path, make_ckpt, sharded: Path, cli) -> None:
    """Opening a FIFO for reading blocks until a writer comes: every reader stats first and refuses it."""
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    ck = make_ckpt("memoryllm")
    (ck / "config.json").unlink()
    os.mkfifo(ck / "config.json")
    ck2 = make_ckpt("memoryllm")
    os.mkfifo(ck2 / "tokenizer.json")
    data = tmp_path / "d.txt"
    os.mkfifo(data)
    z = tmp_path / "x.zst"
    os.mkfifo(z)
    shard = sorted(p for p in sharded.iterdir() if p.name.startswith("tol-"))[0]
    shard.unlink()
    os.mkfifo(shard)
    calls = {
        "bundle": lambda: open_bundle(fifo),
        "config.json": lambda: open_checkpoint(ck),
        "tokenizer.json": lambda: open_checkpoint(ck2),
        "data file": lambda: read_tokens(data, None, 37),
        ".zst": lambda: unpack(z, tmp_path / "o.safetensors"),
        "shard": lambda: open_bundle(sharded),
    }
    for what, call in calls.items():
        with deadline(5, f"a FIFO as the {what}"), pytest.raises(InputError, match="FIFO, not a regular file"):
            call()
    with deadline(10, "tolcli verify of a FIFO"):
        one_clean_line(cli("verify", fifo), ExitCode.BAD_INPUT, "x.safetensors", "FIFO")


def test_reference_reader_agrees_on_honest_bundles(tmp_path: Path) -> None:
    """The oracle of tests/test_adversarial.py (a spec-following reader) agrees with tolcli on honest bundles."""
    st, _, _ = honest_bundle(tmp_path / "a.safetensors", [DenseCodec("BF16"), Int4Codec(32, symmetric=True)])
    ids = np.array([0, 36, 5, 5])
    with open_bundle(st) as b:
        for layer in b.layers:
            np.testing.assert_array_equal(
                b.lookup(layer, torch.from_numpy(ids)).numpy(), reference_lookup(st, layer, ids)
            )


def test_unpack_refuses_an_output_that_does_not_fit(tmp_path: Path, monkeypatch) -> None:
    st = honest_bundle(tmp_path / "b.safetensors", [DenseCodec("F32")])[0]
    z = pack(st, tmp_path / "b.zst").path

    class Tiny:
        free = 100

    monkeypatch.setattr("tolcli.transport.shutil.disk_usage", lambda p: Tiny())
    with pytest.raises(OutputError, match="nothing was written"):
        unpack(z, tmp_path / "o.safetensors")
