"""The run-time lookup path (issue 15 item 3): ``Bundle.lookup_layers`` and ``Bundle.lookup`` against a slow reference.

The reference reads each bundle's stored tensors with other libraries (``safetensors``, ``h5py``), decodes the whole
table with the codec's formula as ``docs/bundle-format.md`` states it, written here in numpy, then indexes it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.adversarial import NF4_DOC
from tolcli import CompressOptions, compress, open_bundle
from tolcli.bundle import h5_format
from tolcli.bundle.entries import TensorEntry
from tolcli.bundle.writer import write_bundle
from tolcli.errors import InputError, UsageError, VerifyError
from tolcli.runtime import HotTokenCache
from tolcli.testing import tiny_manifest

V, H = 300, 64
PRESENT = (0, 2)  # layer 1 is dropped

NF4 = NF4_DOC  # QLoRA's NF4 levels, typed from the paper in tests/adversarial (not imported from tolcli)


def _tables() -> dict[int, np.ndarray]:
    g = np.random.default_rng(7)
    return {i: (g.standard_normal((V, H)) * (1 + i)).astype(np.float32) for i in PRESENT}


def _dense(path: Path, dtype: str = "F32", tables: dict[int, np.ndarray] | None = None) -> Path:
    """A 3-layer dense bundle (layer 1 dropped) written with the library's writer from random tables."""
    np_dtype = {"F32": np.float32, "F16": np.float16}
    entries, layers = [], []
    for i, t in (tables or _tables()).items():
        stored = t.astype(np_dtype[dtype]) if dtype in np_dtype else _bf16_bits(t)
        name = f"layers.{i}.table"
        digest = hashlib.sha256(stored.tobytes()).hexdigest()
        entries.append(TensorEntry(name, dtype, (V, H), digest, lambda s=stored: iter([s])))
        bits = {"F32": 32.0, "F16": 16.0, "BF16": 16.0}[dtype]
        layers.append(
            {
                "index": i,
                "status": "present",
                "codec": "dense",
                "params": {"dtype": dtype},
                "tensors": {"table": name},
                "stored_bytes": stored.nbytes,
                "bits_per_value": bits,
            }
        )
    m = tiny_manifest(V, H)
    m["model"]["num_layers"] = 3
    m["layers"] = [layers[0], {"index": 1, "status": "dropped"}, layers[1]]
    return write_bundle(path, entries, m)


def _bf16_bits(t: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns, rounding to nearest even (finite values)."""
    u = t.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


# ---- the slow reference ------------------------------------------------------------------------------------------
def _stored(path: Path) -> dict[str, np.ndarray]:
    """Every stored tensor, read by another library; BF16 as uint16 bits."""
    if path.is_dir():
        out: dict[str, np.ndarray] = {}
        for f in sorted(path.iterdir()):
            if f.name != "tol.index.json":
                out.update(_stored(f))
        return out
    if path.suffix == ".h5":
        found: dict[str, np.ndarray] = {}
        with h5py.File(path, "r") as f:
            f.visititems(
                lambda n, o: found.__setitem__(n.replace("/", "."), o[()]) if isinstance(o, h5py.Dataset) else None
            )
        return found
    return {k: (v.view(torch.int16).numpy().view(np.uint16) if v.dtype == torch.bfloat16 else v.numpy()) for k, v in
            load_file(path).items()}  # fmt: skip


def _f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32) if a.dtype == np.uint16 else a.astype(np.float32)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """Byte k of a row: element 2k in bits 0-3, element 2k+1 in bits 4-7."""
    out = np.empty((codes.shape[0], codes.shape[1] * 2), dtype=np.float32)
    out[:, 0::2] = codes & 0x0F
    out[:, 1::2] = codes >> 4
    return out


def _per_value(scales: np.ndarray, width: int) -> np.ndarray:
    return np.repeat(_f32(scales), width // scales.shape[1], axis=1)


def _decode(codec: str, params: dict, t: dict[str, np.ndarray]) -> np.ndarray:
    """A whole table from its stored tensors (roles), by the formulas of docs/bundle-format.md."""
    if codec == "dense":
        return _f32(t["table"])
    if codec == "svd":
        a = _decode(params["a"]["codec"], params["a"]["params"], {k[2:]: v for k, v in t.items() if k[:2] == "A."})
        return (a.astype(np.float64) @ _f32(t["B"]).astype(np.float64)).astype(np.float32)
    if params.get("center"):  # the rows were coded minus the mean row: decode, then add it (one fp32 rounding)
        plain = {k: v for k, v in params.items() if k != "center"}
        return _decode(codec, plain, {k: v for k, v in t.items() if k != "mean"}) + t["mean"].astype(np.float32)
    width = t["codes"].shape[1] * (2 if codec in ("int4", "nf4") else 1)
    s = _per_value(t["scales"], width)
    if codec == "int8":
        return t["codes"].astype(np.float32) * s
    q = _nibbles(t["codes"])
    if codec == "nf4":
        return NF4[q.astype(np.int64)] * s
    if params["symmetric"]:
        return (q - np.float32(8)) * s
    return q * s + _per_value(t["offsets"], width)


def _reference(path: Path) -> dict[int, np.ndarray]:
    """Layer -> whole decoded table, from the manifest (read as JSON here) and the stored tensors."""
    b = open_bundle(path)
    manifest = b.manifest
    b.close()
    stored = _stored(path)
    return {
        e["index"]: _decode(e["codec"], e["params"], {role: stored[n] for role, n in e["tensors"].items()})
        for e in manifest["layers"]
        if e["status"] == "present"
    }


# ---- bundles ------------------------------------------------------------------------------------------------------
CODECS = {
    "fp32": None,
    "fp16": "dense(dtype=fp16)",
    "bf16": "dense(dtype=bf16)",
    "int4": "int4(group=32)",
    "int4-sym": "int4(group=64,symmetric=true)",
    "nf4": "nf4(group=32)",
    "int8": "int8",
    "int8-groups": "int8(group=16)",
    "int4-center": "int4(group=32,center=true)",
    "nf4-center": "nf4(group=64,center=true)",
    "svd": "svd(rank=24)",
    "svd-int4": "svd(rank=32,a=int4(group=32))",
}
CONTAINERS = {
    "safetensors": {"suffix": ".safetensors"},
    "hdf5": {"suffix": ".h5"},
    "hdf5-gzip": {"suffix": ".h5", "compression": "gzip"},
    "sharded": {"suffix": "", "container": "safetensors", "max_shard_size": 4096},
}


def _make(tmp: Path, codec: str, container: str) -> Path:
    src = _dense(tmp / "dense.safetensors")
    opts = dict(CONTAINERS[container])
    out = tmp / f"b{opts.pop('suffix')}"
    if CODECS[codec] is None and container == "safetensors":
        return src
    compress(src, out, CompressOptions(codec=CODECS[codec] or "dense"), **opts)
    return out


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """HDF5 chunks of 4 KiB, so that every tensor of these small bundles spans several chunks."""
    monkeypatch.setattr(h5_format, "CHUNK_TARGET_BYTES", 4096)


def _ids() -> dict[str, list[int] | torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "one": [17],
        "first": [0],
        "last": [V - 1],
        "edges": [V - 1, 0, V - 1],
        "repeated": [5, 5, 5, 2, 5],
        "random 4096": torch.randint(0, V, (4096,), generator=g),
        "2-d unsorted": torch.tensor([[299, 3, 150], [1, 298, 0]]),
        "empty": torch.zeros(0, dtype=torch.long),
    }


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("codec", list(CODECS))
def test_all_layers_equal_per_layer_lookup_and_the_slow_reference(
    tmp_path: Path, codec: str, container: str, small_chunks: None
) -> None:
    path = _make(tmp_path, codec, container)
    ref = _reference(path)
    exact = not codec.startswith("svd")
    with open_bundle(path) as b:
        assert b.present_layers == PRESENT
        for label, ids in _ids().items():
            got = b.lookup_layers(ids)
            idx = torch.as_tensor(ids).numpy()
            assert got.shape == (len(PRESENT), *idx.shape, H), label
            for k, layer in enumerate(PRESENT):
                assert torch.equal(got[k], b.lookup(layer, ids)), (label, layer)
                want = ref[layer][idx]
                if exact:
                    np.testing.assert_array_equal(got[k].numpy(), want, err_msg=f"{label} layer {layer}")
                else:
                    np.testing.assert_allclose(got[k].numpy(), want, rtol=1e-4, atol=1e-5, err_msg=label)


def test_dense_reference_is_the_written_table(tmp_path: Path) -> None:
    """The reference itself: a dense fp32 bundle decodes to exactly the tables written."""
    path = _dense(tmp_path / "d.safetensors")
    ref = _reference(path)
    for i, t in _tables().items():
        np.testing.assert_array_equal(ref[i], t)


@pytest.mark.parametrize("codec", ["int4", "fp16"])  # fp16: the fast dense path's own checks
def test_out_buffer_is_written_in_place_and_checked(tmp_path: Path, codec: str) -> None:
    path = _make(tmp_path, codec, "safetensors")
    ref = _reference(path)
    with open_bundle(path) as b:
        buf = torch.full((2, 3, H), float("nan"))
        assert b.lookup_layers([4, 0, V - 1], out=buf) is buf
        for k, layer in enumerate(PRESENT):
            np.testing.assert_array_equal(buf[k].numpy(), ref[layer][[4, 0, V - 1]])
        for bad in (torch.empty(2, 4, H), torch.empty(2, 3, H, dtype=torch.float64), torch.empty(2, H, 3).mT):
            with pytest.raises(UsageError, match="out must be a contiguous fp32 tensor"):
                b.lookup_layers([4, 0, V - 1], out=bad)
        buf.set_(torch.full((2, 3, H), float("nan")))  # the same tensor object, new memory: written there
        assert b.lookup_layers([4, 0, V - 1], out=buf) is buf
        for k, layer in enumerate(PRESENT):
            np.testing.assert_array_equal(buf[k].numpy(), ref[layer][[4, 0, V - 1]])


# Values where a widening cast goes wrong first: signed zeros, the smallest subnormals, the largest finite values.
SPECIAL = {
    "F16": [0.0, -0.0, 2.0**-24, -(2.0**-24), 2.0**-14 - 2.0**-24, 65504.0, -65504.0, 1.0 + 2.0**-10],
    "BF16": [0.0, -0.0, 2.0**-133, -(2.0**-126), 3.3895313892515355e38, -1.0 - 2.0**-7],
    "F32": [0.0, -0.0, 2.0**-149, 3.4028234663852886e38, -(2.0**-126), 1.0 + 2.0**-23],
}


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
def test_fast_dense_path_gives_the_stored_values(tmp_path: Path, dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few ids over dense layers take the fast path (the general path is made to fail here, so it must not run):
    every value equals the stored element widened by the reference (another library's read, then numpy), for ids
    as a list, a 1-d, 0-d and 2-d tensor, numpy arrays, with a fresh result, a reused ``out`` and a second ``out``."""
    tables = _tables()
    for t in tables.values():
        t[7, : len(SPECIAL[dtype])] = SPECIAL[dtype]
        t[V - 1, -len(SPECIAL[dtype]) :] = SPECIAL[dtype][::-1]
    path = _dense(tmp_path / "d.safetensors", dtype, tables)
    ref = _reference(path)
    assert ref[2][7, 1].tobytes() == np.float32(-0.0).tobytes() and ref[0][7, 2] > 0  # the reference keeps them
    g = np.random.default_rng(4)
    cases: list[list[int] | torch.Tensor | np.ndarray] = [[7], [V - 1, 7, 0], torch.tensor([V - 1]), torch.tensor(7)]
    cases += [torch.tensor([[7, 3], [V - 1, 7]]), torch.from_numpy(g.integers(0, V, 64)), list(range(V - 64, V))]
    cases += [np.array([[7], [V - 1]], dtype=np.uint16), np.array([0, 7], dtype=np.int32)]
    with open_bundle(path) as b:
        monkeypatch.setattr(b, "_checked_ids", lambda *a: pytest.fail("the general path ran"))
        for ids in cases:
            idx = torch.as_tensor(ids).numpy()
            want = np.stack([ref[layer][idx] for layer in PRESENT])
            fresh = b.lookup_layers(ids)
            for out in (torch.full(want.shape, float("nan")), torch.full(want.shape, float("nan"))):
                for _ in range(2):  # the cached views of the same buffer, then of another one
                    assert b.lookup_layers(ids, out=out) is out
                    assert out.numpy().tobytes() == want.tobytes(), ids
            assert fresh.shape == want.shape and fresh.numpy().tobytes() == want.tobytes(), ids


@pytest.mark.parametrize("codec", ["int4", "int4-sym", "nf4"])
@pytest.mark.parametrize("container", ["safetensors", "sharded"])
def test_fast_4bit_path_gives_the_reference_values(
    tmp_path: Path, codec: str, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few ids over 4-bit layers take the pair-table fast path (the general path is made to fail, so it must not
    run): every value equals the slow reference's decode (numpy, from the format's formula), bit for bit, for ids
    as a list, tensors of 0 to 2 dimensions and numpy arrays, with a fresh result and a reused ``out``."""
    path = _make(tmp_path, codec, container)
    ref = _reference(path)
    g = np.random.default_rng(5)
    cases: list[list[int] | torch.Tensor | np.ndarray] = [[7], [V - 1, 7, 0], torch.tensor(7), torch.tensor([[7, 3]])]
    cases += [torch.from_numpy(g.integers(0, V, 64)), np.array([0, V - 1], dtype=np.int32)]
    with open_bundle(path) as b:
        monkeypatch.setattr(b, "_checked_ids", lambda *a: pytest.fail("the general path ran"))
        for ids in cases:
            idx = torch.as_tensor(ids).numpy()
            want = np.stack([ref[layer][idx] for layer in PRESENT])
            out = torch.full(want.shape, float("nan"))
            for _ in range(2):
                assert b.lookup_layers(ids, out=out) is out
                assert out.numpy().tobytes() == want.tobytes(), ids
            assert b.lookup_layers(ids).numpy().tobytes() == want.tobytes(), ids
        monkeypatch.undo()
        with pytest.raises(InputError, match="outside the vocabulary"):  # refusals: the general path's
            b.lookup_layers([3, V])
        assert torch.equal(
            b.lookup_layers(torch.arange(65)), torch.stack([b.lookup(i, torch.arange(65)) for i in PRESENT])
        )


@pytest.mark.parametrize("codec", ["int4", "fp32"])
def test_fast_paths_refuse_what_the_general_path_refuses(tmp_path: Path, codec: str) -> None:
    """An ``out`` that needs a gradient and uint64 ids are refused by every path alike, few ids or many."""
    with open_bundle(_make(tmp_path, codec, "safetensors")) as b:
        for n in (3, 100):
            grad = torch.zeros(len(PRESENT), n, H, requires_grad=True)
            with pytest.raises(UsageError, match="not requiring grad"):
                b.lookup_layers(list(range(n)), out=grad)
            with pytest.raises(InputError, match="int64"):
                b.lookup_layers(np.arange(n, dtype=np.uint64))


def test_lookups_from_threads_get_their_own_ids(tmp_path: Path) -> None:
    """Threads sharing a bundle: every ``lookup`` returns the rows of its own ids (the ids were once read back
    from a shared attribute, and another thread's could come back)."""
    from concurrent.futures import ThreadPoolExecutor

    path = _make(tmp_path, "int8", "safetensors")
    ref = _reference(path)

    with open_bundle(path) as b:

        def one(seed: int) -> bool:
            ids = torch.from_numpy(np.random.default_rng(seed).integers(0, V, 80))
            return all(np.array_equal(b.lookup(0, ids).numpy(), ref[0][ids.numpy()]) for _ in range(60))

        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(one, range(32)))


@pytest.mark.parametrize("bad", [[V], [-1], [0, V + 5], [2**40]])
def test_out_of_range_ids_are_refused(tmp_path: Path, bad: list[int]) -> None:
    with open_bundle(_make(tmp_path, "fp16", "safetensors")) as b:
        with pytest.raises(InputError, match="outside the vocabulary"):
            b.lookup_layers(bad)
        with pytest.raises(InputError, match="outside the vocabulary"):
            b.lookup(0, torch.tensor(bad))
        with pytest.raises(InputError, match="integers"):
            b.lookup_layers([1.5])
        with pytest.raises(InputError, match="integers"):
            b.lookup_layers([True])
        many = torch.arange(100) % V
        many[57] = bad[-1]  # past the few ids checked in Python: the vectorised check
        with pytest.raises(InputError, match="outside the vocabulary"):
            b.lookup_layers(many)


def _contiguous_copy(src: Path, dst: Path, reverse_chunks: bool = False) -> Path:
    """The same HDF5 bundle with contiguous datasets (or, with ``reverse_chunks``, chunked datasets whose chunks
    of 64 rows are written last first, so that they lie in the file in reverse row order)."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for k, v in f.attrs.items():
            g.attrs[k] = v

        def copy(name: str, obj: object) -> None:
            if not isinstance(obj, h5py.Dataset):
                return
            data = obj[()]
            if reverse_chunks and data.ndim == 2:
                per = 64
                ds = g.create_dataset(name, shape=data.shape, dtype=data.dtype, chunks=(per, *data.shape[1:]))
                for s in reversed(range(0, data.shape[0], per)):
                    ds[s : s + per] = data[s : s + per]
            else:
                ds = g.create_dataset(name, data=data)
            for k, v in obj.attrs.items():
                ds.attrs[k] = v

        f.visititems(copy)
    return dst


@pytest.mark.parametrize("layout", ["contiguous", "chunked", "scattered chunks", "gzip"])
def test_hdf5_layouts_read_through_the_file_offsets_where_they_allow(
    tmp_path: Path, layout: str, small_chunks: None
) -> None:
    """Contiguous and in-order unfiltered chunked datasets are zero-copy views of a memory map; scattered unfiltered
    chunks are gathered from the map through their chunk offsets; compressed ones are read through h5py. All give
    the reference's rows."""
    src = _make(tmp_path, "int4", "hdf5-gzip" if layout == "gzip" else "hdf5")
    path = src
    if layout in ("contiguous", "scattered chunks"):
        path = _contiguous_copy(src, tmp_path / "copy.h5", reverse_chunks=layout == "scattered chunks")
    ref = _reference(path)
    ids = _ids()["random 4096"]
    with open_bundle(path) as b:
        mapped = {n: b._reader.view(n) is not None for n in b.tensor_names}
        assert all(mapped.values()) == (layout in ("contiguous", "chunked")), mapped
        assert any(mapped.values()) == (layout in ("contiguous", "chunked")), mapped
        if layout != "contiguous":  # gathered from the file's chunk offsets unless compressed
            chunked = {n: b._reader._chunk_map(n) is not None for n in b.tensor_names}
            assert all(chunked.values()) == (layout != "gzip") and any(chunked.values()) == (layout != "gzip")
        got = b.lookup_layers(ids)
    for k, layer in enumerate(PRESENT):
        np.testing.assert_array_equal(got[k].numpy(), ref[layer][ids.numpy()])


def test_hdf5_run_outside_the_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dataset whose bytes would lie past the end of the file (a hostile offset) is never mapped."""
    path = _make(tmp_path, "fp16", "hdf5")
    size = path.stat().st_size
    with open_bundle(path) as b:
        monkeypatch.setattr(h5_format, "_run_start", lambda ds: size - 8)
        with pytest.raises(VerifyError, match="outside the file"):
            b.lookup_layers([0])
        monkeypatch.setattr(h5_format, "_run_start", lambda ds: -1)
        b._views.clear()
        with pytest.raises(VerifyError, match="outside the file"):
            b.lookup(0, [0])


def test_hot_token_cache_all_layers_equals_the_bundle(tmp_path: Path) -> None:
    path = _make(tmp_path, "int4", "safetensors")
    ref = _reference(path)
    with open_bundle(path) as b:
        cache = HotTokenCache(b, torch.tensor([5, 0, V - 1]))
        cases = {"mixed": [5, 7, 0, 5, 9], "all hits": [V - 1, 5], "all misses": [1, 2, 3], "2-d": [[5, 1], [0, 2]]}
        for label, ids in cases.items():
            before = cache.stats.lookups, cache.stats.hits
            got = cache.lookup_layers(torch.tensor(ids))
            idx = np.array(ids)
            hits = int(np.isin(idx, [5, 0, V - 1]).sum())
            assert (cache.stats.lookups - before[0], cache.stats.hits - before[1]) == (idx.size, hits), label
            for k, layer in enumerate(PRESENT):
                np.testing.assert_array_equal(got[k].numpy(), ref[layer][idx], err_msg=label)
                assert torch.equal(cache.lookup(layer, torch.tensor(ids)), got[k]), label
        buf = torch.empty(2, 2, H)
        assert cache.lookup_layers(torch.tensor([1, 5]), out=buf) is buf
        with pytest.raises(InputError, match="outside the vocabulary"):
            cache.lookup_layers(torch.tensor([V]))
