"""The container registry: the built-ins, sniffing by content, and a new format as one module plus one line."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tolcli import convert_bundle, demo_checkpoint_path, open_bundle, precompute
from tolcli.bundle import container as registry
from tolcli.bundle.entries import TensorEntry
from tolcli.bundle.st_format import not_safetensors_reason
from tolcli.bundle.writer import WriteOptions, container_for
from tolcli.dtypes import DTYPES
from tolcli.errors import InputError, UsageError

# ---- a toy container: magic, u64 header length, JSON header, the tensors' bytes back to back ----------------
TOY_MAGIC = b"TOYTOL1\n"


class ToyReader:
    container = "toy"

    def __init__(self, path: Path):
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[8:16])
        header = json.loads(raw[16 : 16 + n])
        self.manifest_text: str = header["manifest"] or ""
        self.tensors: dict[str, list] = header["tensors"]  # name -> [dtype, shape, begin, end]
        self.data = np.frombuffer(raw, dtype=np.uint8, offset=16 + n)

    def stored(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {name: (dtype, tuple(shape)) for name, (dtype, shape, _, _) in self.tensors.items()}

    def array(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.tensors[name]
        return self.data[begin:end].view(DTYPES[dtype].numpy).reshape(shape)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        return self.array(name)[ids]

    def blocks(self, name: str, rows: int) -> Iterator[np.ndarray]:
        yield self.array(name)  # one block is a valid split

    def close(self) -> None:
        pass


class Toy:
    name = "toy"
    label = "toy"
    suffixes = (".toytol",)
    compressions = ()

    def sniff(self, head: bytes) -> bool:
        return head.startswith(TOY_MAGIC)

    def open(self, path: Path, *, shard: bool = False) -> ToyReader:
        return ToyReader(path)

    def write(self, path: Path, entries: list[TensorEntry], manifest_json: str | None, compression: str | None) -> None:
        tensors, data = {}, b""
        for e in entries:
            raw = b"".join(np.ascontiguousarray(b, dtype=DTYPES[e.dtype].numpy).tobytes() for b in e.blocks())
            tensors[e.name] = [e.dtype, list(e.shape), len(data), len(data) + len(raw)]
            data += raw
        header = json.dumps({"manifest": manifest_json, "tensors": tensors}).encode()
        path.write_bytes(TOY_MAGIC + struct.pack("<Q", len(header)) + header + data)


@pytest.fixture
def toy() -> Iterator[None]:
    registry.register(Toy())  # the one line a new format needs
    try:
        yield
    finally:
        registry.unregister("toy")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("containers")
    st = precompute(demo_checkpoint_path(), d / "demo.safetensors", dtype="bf16").path
    return {"safetensors": st, "hdf5": convert_bundle(st, d / "demo.h5")}


def _same_lookups(a: Path, b: Path) -> None:
    ids = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    with open_bundle(a) as x, open_bundle(b, verify=True) as y:
        assert x.manifest == y.manifest and x.tokenizer_bytes() == y.tokenizer_bytes()
        for layer in x.layers:
            assert torch.equal(x.lookup(layer, ids), y.lookup(layer, ids))


# ---- the built-ins ---------------------------------------------------------------------------------------------
def test_the_registry_holds_exactly_safetensors_and_hdf5() -> None:
    assert registry.names() == ("safetensors", "hdf5") and registry.DEFAULT == "safetensors"
    found = [getattr(registry.by_suffix(s), "name", None) for s in (".safetensors", ".h5", ".hdf5", ".toytol")]
    assert found == ["safetensors", "hdf5", "hdf5", None]


def test_sniffing_reads_by_content_and_refuses_a_contradicting_suffix(bundles: dict[str, Path], tmp_path: Path) -> None:
    """A bundle is opened by its content; a known suffix that names another container is refused, naming both (a
    runtime choosing its reader by the suffix would read other data). An unknown suffix leaves it to the content."""
    for kind, src in bundles.items():
        head = src.read_bytes()[: registry.SNIFF_BYTES]
        assert getattr(registry.sniff(head), "name", None) == kind
        other = tmp_path / ("x.h5" if kind == "safetensors" else "x.safetensors")
        other.write_bytes(src.read_bytes())
        named, label = ("HDF5", "safetensors") if kind == "safetensors" else ("safetensors", "HDF5")
        with pytest.raises(InputError, match=rf"named {other.suffix} \({named}\) but the content is {label}"):
            open_bundle(other)
        neutral = tmp_path / f"{kind}.bundle"
        neutral.write_bytes(src.read_bytes())
        with open_bundle(neutral, verify=True) as b:
            assert b.container == kind
    h5_head = bundles["hdf5"].read_bytes()[:64]
    assert not_safetensors_reason(h5_head) == "this is an HDF5 file; name it .h5"
    assert not_safetensors_reason(bundles["safetensors"].read_bytes()[:64]) is None


def test_unrecognised_content_is_read_as_the_default(tmp_path: Path) -> None:
    p = tmp_path / "x.h5"
    p.write_text("<!DOCTYPE html><html>")
    assert registry.sniff(p.read_bytes()) is None and registry.container_of(p).name == registry.DEFAULT
    with pytest.raises(InputError, match="HTML"):
        open_bundle(p)


def test_output_containers_come_from_the_registry() -> None:
    assert container_for(Path("a.hdf5")) == "hdf5" and container_for(Path("dir"), sharded=True) == "safetensors"
    with pytest.raises(UsageError, match="safetensors or hdf5, got 'toy'"):
        container_for(Path("a.h5"), "toy")
    with pytest.raises(UsageError) as e:
        container_for(Path("a.bin"))
    assert e.value.hint == "name it .safetensors or .h5, or pass --format"
    with pytest.raises(UsageError, match="compression applies to HDF5 bundles only"):
        WriteOptions.make(Path("a.safetensors"), compression="gzip")


def test_names_and_suffixes_are_unique(toy: None) -> None:
    with pytest.raises(ValueError, match="registered"):
        registry.register(Toy())
    clash = Toy()
    clash.name, clash.suffixes = "toy2", (".h5",)
    with pytest.raises(ValueError, match="registered"):
        registry.register(clash)


# ---- a new container ------------------------------------------------------------------------------------------
def test_a_toy_container_writes_and_reads_bundles(toy: None, bundles: dict[str, Path], tmp_path: Path) -> None:
    src = bundles["safetensors"]
    out = convert_bundle(src, tmp_path / "t.toytol")  # write_bundle, the container chosen by suffix
    assert out.read_bytes().startswith(TOY_MAGIC)
    with open_bundle(out) as b:
        assert b.container == "toy"
    _same_lookups(src, out)
    assert convert_bundle(out, tmp_path / "back.safetensors").read_bytes() == src.read_bytes()  # lossless

    named = convert_bundle(src, tmp_path / "t.bin", container="toy")  # --format names it (a known suffix must agree)
    assert named.read_bytes() == out.read_bytes()

    sharded = convert_bundle(bundles["hdf5"], tmp_path / "dir", container="toy", max_shard_size="2MB")
    assert {p.suffix for p in sharded.iterdir()} == {".toytol", ".json"} and len(list(sharded.iterdir())) > 2
    with open_bundle(sharded) as b:
        assert b.container == "toy"
    _same_lookups(src, sharded)


def test_an_unregistered_container_is_not_read(bundles: dict[str, Path], tmp_path: Path) -> None:
    registry.register(Toy())
    try:
        out = convert_bundle(bundles["safetensors"], tmp_path / "t.toytol")
    finally:
        registry.unregister("toy")
    with pytest.raises(InputError, match="not a safetensors file"):
        open_bundle(out)
    with pytest.raises(UsageError, match="cannot tell the format"):
        convert_bundle(bundles["safetensors"], tmp_path / "u.toytol")


def test_format_contradicting_the_output_suffix_is_refused(tmp_path: Path, cli) -> None:
    """A file whose suffix names another container is refused by every reader, so no writer makes one."""
    from tolcli import demo_checkpoint_path, precompute
    from tolcli.errors import UsageError

    with pytest.raises(UsageError, match=r"--format hdf5 contradicts the suffix of 'x\.safetensors'"):
        precompute(demo_checkpoint_path(), tmp_path / "x.safetensors", container="hdf5", layers="0", dtype="fp32")
    assert not list(tmp_path.iterdir())
    r = cli("precompute", "demo", "-o", tmp_path / "y.h5", "--format", "hdf5", "--layers", "0")
    assert r.code == 0, r.err
