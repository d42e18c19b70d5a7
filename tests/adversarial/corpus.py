"""A bounded, deterministic corpus of adversarial inputs (``tests/test_adversarial.py``).

Each generator takes a seeded :class:`random.Random` and a scratch directory and returns :class:`Case` objects: a
name, a family, and ``run()``, which builds the hostile input and reads it through the library's entry point the
way the commands do, returning "ok" after checking the data it read against an independent oracle. ``run`` raises
a :class:`~tolcli.errors.TolcliError` when tolcli refuses the input; anything else escaping is a bug.

Families:

- ``json``: JSON hazards (NaN, Infinity, overflowing floats, 21- to 5,000-digit integers, deep nesting, repeated
  keys, wrong types, huge strings, truncation, bad UTF-8, ...) spliced at a random leaf of a manifest (in either
  container), a safetensors header, a shard index, a ``config.json``, a checkpoint index, a tensor map or a
  ``.jsonl`` line;
- ``hdf5``: hard-link DAGs and cycles, aliased datasets, dotted names, soft and external links, committed types,
  sparse and over-declared datasets, compression bombs, and benign rewrites (other layouts, compression, empty
  groups) that must read back the same data;
- ``lies``: manifests that lie with consistent hashes: relabelled codecs, retyped params, aliased, swapped, renamed,
  dropped or unreferenced tensors, edited sizes and statistics, and table values (NaN, Inf, 3e38) with or without
  the statistics that would license them, in safetensors, HDF5 and sharded bundles.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tokenizers import Tokenizer

from tests.adversarial import (
    Arrays,
    honest_bundle,
    read_header,
    reference_lookup,
    safetensors_with_header,
    tensor_entries,
    tensors_section,
    write_raw,
)
from tolcli import demo_checkpoint_path, open_bundle, open_checkpoint
from tolcli.bundle import sharded
from tolcli.bundle.sharded import INDEX_NAME
from tolcli.checkpoint import ST_INDEX
from tolcli.codecs import Codec, DenseCodec, Int4Codec, Int8Codec, NF4Codec, SVDCodec
from tolcli.layout import EMBED
from tolcli.text import read_tokens

V, H = 37, 64
IDS = np.array([0, 1, 5, 17, 36, 5, 0])


@dataclass
class Case:
    name: str
    family: str
    run: Callable[[], str]


# ---- reading, and the oracle ------------------------------------------------------------------------------------
def read_bundle(path: Path) -> str:
    """Open, verify and look rows up (as every command reads bundles); when all that passes, every present layer's
    rows must equal what a spec-following runtime reads from the same file (:func:`reference_lookup`)."""
    with open_bundle(path) as b:
        b.verify()
        for layer in sorted(b.layers):
            got = b.lookup(layer, torch.from_numpy(IDS)).numpy()
            want = reference_lookup(path, layer, IDS)
            if not np.allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=False):
                raise WrongAnswer(f"{path.name}: layer {layer}: tolcli reads other rows than the spec says")
        b.tokenizer_bytes()
    return "ok"


class WrongAnswer(AssertionError):
    """verify passed but the lookups differ from the data (the one outcome that must never happen)."""


# ---- JSON hazards ------------------------------------------------------------------------------------------------
PLACEHOLDER = "\x00HAZARD\x00"


def _leaves(doc: Any, path: tuple = ()) -> list[tuple]:
    out: list[tuple] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _leaves(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:8]):
            out += _leaves(v, (*path, i))
    else:
        out.append(path)
    return out


def _objects(doc: Any, path: tuple = ()) -> list[tuple]:
    out: list[tuple] = []
    if isinstance(doc, dict):
        out.append(path)
        for k, v in doc.items():
            out += _objects(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:8]):
            out += _objects(v, (*path, i))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _set(doc: Any, path: tuple, value: Any) -> None:
    _get(doc, path[:-1])[path[-1]] = value


def value_hazards(leaf: Any) -> list[str]:
    """JSON texts to put where ``leaf`` was: non-JSON constants, huge or overflowing numbers, deep nesting, and
    plausible type confusions (some of which are legal where they land: those must then read correctly)."""
    out = [
        "NaN",
        "Infinity",
        "-Infinity",
        "1e999",
        "-1e400",
        "1e-400",
        "9" * 21,
        "-" + "9" * 30,
        "9" * 4301,
        "18446744073709551616",
        "[" * 65 + "]" * 65,
        "[" * 3000 + "]" * 3000,
        '{"a":' * 70 + "1" + "}" * 70,
        "null",
        "true",
        "[]",
        "{}",
        '"' + "x" * 1_000_000 + '"',
        '"\\ud800"',
    ]
    if isinstance(leaf, bool):
        out += ['"false"', '"true"', "0", "1"]
    elif isinstance(leaf, int):
        out += [f"{leaf}.0", f'"{leaf}"', str(-leaf - 1), str(leaf * 1000 + 7), "0.5"]
    elif isinstance(leaf, float):
        out += [str(int(leaf)), "3e38", "-0.0", '"1.0"']
    elif isinstance(leaf, str):
        out += ['"' + leaf[::-1] + '"', "12", '"' + leaf + '\\u0000"']
    return out


def splice(doc: Any, rng: random.Random) -> tuple[str, str]:
    """(JSON text of ``doc`` with one hazard, what the hazard was)."""
    doc = copy.deepcopy(doc)
    kind = rng.random()
    if kind < 0.12:  # a repeated key
        objs = [p for p in _objects(doc) if _get(doc, p)]
        p = rng.choice(objs)
        key = rng.choice(sorted(_get(doc, p)))
        _get(doc, p)[PLACEHOLDER] = 0
        text = json.dumps(doc)
        return text.replace(json.dumps(PLACEHOLDER) + ": 0", json.dumps(key) + ": 1"), f"repeated key {key!r}"
    text = json.dumps(doc)
    if kind < 0.2:  # damage to the text itself
        how = rng.choice(["truncate", "flip", "bom", "append", "utf8"])
        if how == "truncate":
            return text[: rng.randrange(1, len(text))], "truncated"
        if how == "flip":
            i = rng.randrange(len(text))
            return text[:i] + chr(rng.choice(b'{}[]",:0a\\ ')) + text[i + 1 :], "one character replaced"
        if how == "bom":
            return "\ufeff" + text, "a BOM"
        if how == "append":
            return text + rng.choice([" x", "{}", ",", "\x00"]), "trailing garbage"
        return text.replace('"', '"\udcff', 1), "a lone surrogate"
    leaves = _leaves(doc)
    p = rng.choice(leaves)
    value = rng.choice(value_hazards(_get(doc, p)))
    _set(doc, p, PLACEHOLDER)
    return json.dumps(doc).replace(json.dumps(PLACEHOLDER), value, 1), f"{'/'.join(map(str, p))} = {value[:24]}"


class JsonFamily:
    """Targets for JSON hazards, built once."""

    def __init__(self, root: Path, make_ckpt: Callable[..., Path]):
        self.root = root
        self.st = honest_bundle(root / "j.safetensors", [DenseCodec("F32"), Int4Codec(32)], tokenizer=b"{}")[0]
        self.h5 = honest_bundle(root / "j.h5", [DenseCodec("BF16"), NF4Codec(32)])[0]
        self.sharded = honest_bundle(root / "jdir", [DenseCodec("F32")] * 3, max_shard_size=10_000)[0]
        self.ckpt = make_ckpt("memoryllm", layout="sharded")
        self.embed = open_checkpoint(self.ckpt).load(EMBED)
        self.tok = Tokenizer.from_file(str(demo_checkpoint_path() / "tokenizer.json"))

    def cases(self, rng: random.Random, n: int) -> list[Case]:
        targets = [
            self.manifest_st,
            self.manifest_h5,
            self.st_header,
            self.shard_index,
            self.config,
            self.ckpt_index,
            self.tensor_map,
            self.jsonl,
        ]
        out = []
        for k in range(n):
            target = targets[k % len(targets)]
            seed = rng.randrange(1 << 30)
            out.append(
                Case(f"json/{target.__name__}/{k}", "json", lambda t=target, s=seed, k=k: t(random.Random(s), k))
            )
        return out

    def _dir(self, k: int) -> Path:
        d = self.root / f"case{k}"
        d.mkdir(exist_ok=True)
        return d

    def manifest_st(self, rng: random.Random, k: int) -> str:
        n, header = read_header(self.st)
        text, _ = splice(json.loads(header["__metadata__"]["tol.manifest"]), rng)
        header["__metadata__"]["tol.manifest"] = text
        raw = self.st.read_bytes()
        try:
            header_text = json.dumps(header)
        except ValueError:
            header_text = json.dumps(header, ensure_ascii=False)
        bad = safetensors_with_header(
            self._dir(k) / "m.safetensors", header_text.encode("utf-8", "replace"), raw[8 + n :]
        )
        return read_bundle(bad)

    def manifest_h5(self, rng: random.Random, k: int) -> str:
        bad = self._dir(k) / "m.h5"
        shutil.copyfile(self.h5, bad)
        with h5py.File(self.h5, "r") as f:
            doc = json.loads(f.attrs["tol.manifest"])
        text, _ = splice(doc, rng)
        with h5py.File(bad, "a") as f:
            f.attrs.create("tol.manifest", text.encode("utf-8", "replace"), dtype=h5py.string_dtype("utf-8"))
        return read_bundle(bad)

    def st_header(self, rng: random.Random, k: int) -> str:
        n, header = read_header(self.st)
        manifest = header["__metadata__"].pop("tol.manifest")
        text, _ = splice(header, rng)
        # the manifest goes back in, unchanged, so that the hazard is in the header's own fields
        doc_text = text.replace(
            '"__metadata__": {', '"__metadata__": {"tol.manifest": ' + json.dumps(manifest) + ", ", 1
        )
        raw = self.st.read_bytes()
        bad = safetensors_with_header(self._dir(k) / "h.safetensors", doc_text.encode("utf-8", "replace"), raw[8 + n :])
        return read_bundle(bad)

    def shard_index(self, rng: random.Random, k: int) -> str:
        bad = self._dir(k) / "sharded"
        shutil.copytree(self.sharded, bad)
        text, _ = splice(json.loads((bad / INDEX_NAME).read_text()), rng)
        (bad / INDEX_NAME).write_bytes(text.encode("utf-8", "replace"))
        return read_bundle(bad)

    def _ckpt_copy(self, k: int) -> Path:
        ck = self._dir(k) / "ck"
        shutil.copytree(self.ckpt, ck)
        return ck

    def _check_ckpt(self, ck: Path, **kw: Any) -> str:
        with open_checkpoint(ck, **kw) as c:
            if c.config.vocab_size == self.embed.shape[0] and not torch.equal(c.load(EMBED), self.embed):
                raise WrongAnswer(f"{ck}: the embedding read back differs")
        return "ok"

    def config(self, rng: random.Random, k: int) -> str:
        ck = self._ckpt_copy(k)
        text, _ = splice(json.loads((ck / "config.json").read_text()), rng)
        (ck / "config.json").write_bytes(text.encode("utf-8", "replace"))
        return self._check_ckpt(ck)

    def ckpt_index(self, rng: random.Random, k: int) -> str:
        ck = self._ckpt_copy(k)
        text, _ = splice(json.loads((ck / ST_INDEX).read_text()), rng)
        (ck / ST_INDEX).write_bytes(text.encode("utf-8", "replace"))
        return self._check_ckpt(ck)

    def tensor_map(self, rng: random.Random, k: int) -> str:
        ck = self._ckpt_copy(k)
        tm = {"names": {"x.weight": "model.norm.weight"}, "patterns": [{"match": "^a$", "replace": "b"}], "ignore": []}
        text, _ = splice(tm, rng)
        (ck / "map.json").write_bytes(text.encode("utf-8", "replace"))
        return self._check_ckpt(ck, tensor_map=ck / "map.json")

    def jsonl(self, rng: random.Random, k: int) -> str:
        record = {"text": "the quick brown fox", "meta": {"n": 3, "score": 0.5, "ok": True}}
        text, _ = splice(record, rng)
        data = self._dir(k) / "d.jsonl"
        data.write_bytes(('{"text": "hello"}\n' + text + "\n").encode("utf-8", "replace"))
        ids = read_tokens(data, self.tok, 1 << 20)
        try:
            texts = [json.loads(line)["text"] for line in data.read_text().splitlines() if line.strip()]
        except (ValueError, KeyError, TypeError) as e:
            raise WrongAnswer(f"{data}: tolcli read a .jsonl that the stdlib cannot ({e})") from None
        if ids.tolist() != self.tok.encode("\n\n".join(texts)).ids:
            raise WrongAnswer(f"{data}: other tokens than the text holds")
        return "ok"


# ---- HDF5 link graphs and sizes ------------------------------------------------------------------------------
class H5Family:
    def __init__(self, root: Path):
        self.root = root
        self.base = honest_bundle(root / "base.h5", [DenseCodec("F32"), Int4Codec(32)])[0]
        with h5py.File(self.base, "r") as f:
            self.table = f["layers/0/table"][()]

    def cases(self, rng: random.Random, n: int) -> list[Case]:
        ops = [
            self.dag,
            self.cycle,
            self.alias,
            self.empty_groups,
            self.dotted,
            self.links,
            self.committed_type,
            self.sparse_table,
            self.sparse_extra,
            self.relayout,
            self.bomb,
            self.huge_chunks,
        ]
        out = []
        for k in range(n):
            picked = [ops[k % len(ops)], *rng.sample(ops, rng.choice([0, 0, 1]))]
            seed = rng.randrange(1 << 30)
            label = "+".join(op.__name__ for op in picked)
            out.append(Case(f"hdf5/{label}/{k}", "hdf5", lambda p=picked, s=seed, k=k: self._run(p, s, k)))
        return out

    def _run(self, ops: list[Callable[..., None]], seed: int, k: int) -> str:
        rng = random.Random(seed)
        path = self.root / f"h{k}.h5"
        shutil.copyfile(self.base, path)
        with h5py.File(path, "a") as f:
            for op in ops:
                op(f, rng)
        return read_bundle(path)

    @staticmethod
    def _name(rng: random.Random) -> str:
        return "g" + "".join(rng.choice("abcdefgh") for _ in range(6))

    def dag(self, f: h5py.File, rng: random.Random) -> None:
        cur = f.create_group(self._name(rng))
        for level in range(rng.randint(2, 30)):
            nxt = f.create_group(f"tmp{level}")
            for j in range(rng.randint(2, 3)):
                cur[f"l{j}"] = nxt
            del f[f"tmp{level}"]
            cur = nxt

    def cycle(self, f: h5py.File, rng: random.Random) -> None:
        target = rng.choice(["/", "/layers", "/layers/0", "/layers/1"])
        holder = rng.choice(["layers", "layers/1", "layers/0"])
        f[f"{holder}/{self._name(rng)}"] = f[target]

    def alias(self, f: h5py.File, rng: random.Random) -> None:
        src = rng.choice(["layers/0/table", "layers/1/codes", "layers/1/scales"])
        where = rng.choice(["layers/1/extra", "aliased", "layers/0/more"])
        f[where] = f[src]

    def empty_groups(self, f: h5py.File, rng: random.Random) -> None:
        for _ in range(rng.randint(1, 5)):
            f.create_group(f"{rng.choice(['', 'layers/'])}{self._name(rng)}")

    def dotted(self, f: h5py.File, rng: random.Random) -> None:
        name = rng.choice(["layers.0.table", "layers/0.table", "layers.1/codes", "x.y"])
        if name in f:
            return
        if rng.random() < 0.5:
            f.create_dataset(name, data=np.zeros((V, H), "<f4"))
        else:
            f.create_group(name)

    def links(self, f: h5py.File, rng: random.Random) -> None:
        name = self._name(rng)
        if rng.random() < 0.5:
            f[name] = h5py.SoftLink("/layers/0/table")
        else:
            f[name] = h5py.ExternalLink(str(self.base), "/layers/0/table")

    def committed_type(self, f: h5py.File, rng: random.Random) -> None:
        f[self._name(rng)] = np.dtype("<f4")

    def _recreate(self, f: h5py.File, name: str, **kw: Any) -> h5py.Dataset:
        attrs = dict(f[name].attrs)
        del f[name]
        ds = f.create_dataset(name, **kw)
        for a, v in attrs.items():
            ds.attrs[a] = v
        return ds

    def sparse_table(self, f: h5py.File, rng: random.Random) -> None:
        """``/layers/0/table`` again, chunked, with only some chunks written (the rest read as fill values)."""
        rows = rng.choice([1, 4, 8, 16])
        ds = self._recreate(f, "layers/0/table", shape=(V, H), dtype="<f4", chunks=(rows, H))
        for r in range(0, V, rows):
            if rng.random() < 0.7:
                ds[r : r + rows] = self.table[r : r + rows]

    def sparse_extra(self, f: h5py.File, rng: random.Random) -> None:
        shape = (rng.choice([1 << 20, 1 << 24, 1 << 30]), rng.choice([1, 64, 4096]))
        chunked = rng.random() < 0.7
        name = rng.choice(["layers/9/table", "extra"])
        if name in f:
            return
        f.create_dataset(
            name,
            shape=shape,
            dtype="<f4",
            chunks=(rng.choice([1, 64, 1024]), shape[1]) if chunked else None,
        )

    def relayout(self, f: h5py.File, rng: random.Random) -> None:
        """Benign: the same data contiguous, in other chunks, or compressed: must read back identically."""
        how = rng.choice(["contiguous", "chunks", "gzip", "lzf", "shuffle"])
        kw: dict[str, Any] = {"data": self.table}
        if how == "chunks":
            kw["chunks"] = (rng.choice([1, 3, 37]), rng.choice([16, 64]))
        elif how in ("gzip", "lzf"):
            kw.update(chunks=(8, H), compression=how)
        elif how == "shuffle":
            kw.update(chunks=(8, H), compression="gzip", shuffle=True)
        self._recreate(f, "layers/0/table", **kw)

    def bomb(self, f: h5py.File, rng: random.Random) -> None:
        rows = rng.choice([1 << 16, 1 << 18])
        name = rng.choice(["layers/9/table", "bomb"])
        if name in f:
            return
        ds = f.create_dataset(name, shape=(rows, 1024), dtype="<f4", chunks=(256, 1024), compression="gzip")
        chunk = zlib.compress(bytes(256 * 1024 * 4), 9)
        for r in range(0, rows, 256):
            ds.id.write_direct_chunk((r, 0), chunk)

    def huge_chunks(self, f: h5py.File, rng: random.Random) -> None:
        if "wide" in f:
            return
        f.create_dataset("wide", shape=(1 << 20, 1 << 10), dtype="<f4", chunks=(1 << 15, 1 << 10))


# ---- manifests that lie with consistent hashes -------------------------------------------------------------------
BASES: list[list[Codec | None]] = [
    [DenseCodec("F32"), DenseCodec("F16"), DenseCodec("BF16")],
    [Int4Codec(32), Int4Codec(64, symmetric=True), NF4Codec(32)],
    [Int8Codec(64), Int8Codec(32), None],
    [SVDCodec(32, Int4Codec(32)), SVDCodec(16), DenseCodec("F32")],
]


def _params_for(codec: str, rng: random.Random) -> dict[str, Any]:
    return {
        "dense": {"dtype": rng.choice(["F32", "F16", "BF16"])},
        "int4": {"bits": 4, "group_size": rng.choice([32, 64]), "symmetric": rng.random() < 0.5},
        "nf4": {"bits": 4, "group_size": rng.choice([32, 64])},
        "int8": {"bits": 8, "group_size": rng.choice([32, 64])},
        "svd": {
            "rank": 32,
            "a": {"codec": "int4", "params": {"bits": 4, "group_size": 32, "symmetric": False}},
            "b_dtype": "F16",
            "method": "exact",
            "weighted": False,
        },
    }[codec]


class LieFamily:
    def __init__(self, root: Path):
        self.root = root
        self.bases = []
        self.written: list[dict[int, np.ndarray]] = []  # base -> layer -> the rows written (IDS)
        for k, codecs in enumerate(BASES):
            path, m, arrays = honest_bundle(
                root / f"base{k}.safetensors", codecs, tokenizer=b'{"x": 1}' if k == 1 else None
            )
            self.bases.append((m, arrays))
            present = [e["index"] for e in m["layers"] if e["status"] == "present"]
            self.written.append({i: reference_lookup(path, i, IDS) for i in present})

    def cases(self, rng: random.Random, n: int) -> list[Case]:
        out = []
        for k in range(n):
            form = ["safetensors", "hdf5", "sharded"][k % 3]
            base = rng.randrange(len(self.bases))
            ops = rng.sample(LIES, rng.choice([1, 1, 2]))
            seed = rng.randrange(1 << 30)
            label = "+".join(op.__name__.lstrip("_") for op in ops)
            out.append(
                Case(
                    f"lies/{form}/{label}/{k}",
                    "lies",
                    lambda b=base, o=ops, s=seed, k=k, form=form: self._run(b, o, s, k, form),
                )
            )
        return out

    def _run(self, base: int, ops: list[Callable[..., None]], seed: int, k: int, form: str) -> str:
        rng = random.Random(seed)
        m, arrays = self.bases[base]
        m = copy.deepcopy(m)
        arrays = dict(arrays)
        for op in ops:
            op(m, arrays, rng)
        if not any(op in (_resize, _edit_tensor_entry) for op in ops):
            m["tensors"] = tensors_section(arrays)  # the hashes stay consistent with the bytes
        path = self._write(m, arrays, f"lie{k}", form)
        outcome = read_bundle(path)  # raises unless verify passes and tolcli agrees with the spec reader
        with open_bundle(path) as b:
            changed = [
                i
                for i, rows in self.written[base].items()
                if i in b.layers and not np.allclose(b.lookup(i, torch.from_numpy(IDS)).numpy(), rows, atol=1e-5)
            ]
        if not changed:
            return outcome
        # Another valid bundle than the one written (a codec relabelled to one with the same roles, int4 symmetric
        # as nf4): only a digest published with the honest bundle tells them apart. Check that it does.
        honest = copy.deepcopy(self.bases[base][0])
        if _digest(self._write(honest, self.bases[base][1], f"honest{k}", form)) == _digest(path):
            raise WrongAnswer(f"{path.name}: layers {changed} read other data, and the published digest matches")
        return "ok: another valid bundle (only the published sha256 differs)"

    def _write(self, m: dict[str, Any], arrays: Arrays, stem: str, form: str) -> Path:
        if form == "sharded":
            return self._sharded(m, arrays, stem)
        suffix = ".h5" if form == "hdf5" else ".safetensors"
        return write_raw(self.root / f"{stem}{suffix}", arrays, m, fill_tensors=False)

    def _sharded(self, m: dict[str, Any], arrays: Arrays, stem: str) -> Path:
        """The tensors as honest shards (real shard writer, hashes in the index right), the lying manifest in the
        index."""
        d = self.root / stem
        d.mkdir()
        entries = tensor_entries(arrays)
        groups = sharded.partition(entries, 6000)
        names = [sharded.shard_name(i, len(groups), "safetensors") for i in range(len(groups))]
        records = sharded.write_shards(d, groups, names, "safetensors", None)
        weight_map = {e.name: name for g, name in zip(groups, names, strict=True) for e in g}
        (d / INDEX_NAME).write_text(json.dumps(sharded.index_document(m, records, weight_map)))
        return d


def _digest(path: Path) -> str:
    """The digest a publisher would list: the file's sha256, or the index's for a sharded bundle (it holds the
    manifest and every shard's sha256, which verify checks)."""
    import hashlib

    return hashlib.sha256((path / INDEX_NAME if path.is_dir() else path).read_bytes()).hexdigest()


def _layer(m: dict[str, Any], rng: random.Random, present: bool = True) -> dict[str, Any]:
    layers = [e for e in m["layers"] if (e["status"] == "present") == present] or m["layers"]
    return rng.choice(layers)


def _relabel(m, arrays, rng) -> None:
    e = _layer(m, rng)
    codec = rng.choice(["dense", "int4", "nf4", "int8", "svd"])
    e["codec"] = codec
    if rng.random() < 0.7:
        e["params"] = _params_for(codec, rng)
    if rng.random() < 0.5 and "offsets" in e.get("tensors", {}) and codec == "nf4":
        del e["tensors"]["offsets"]


def _relabel_twin(m, arrays, rng) -> None:
    """int4 symmetric as nf4, or nf4 as int4 symmetric: the same tensors, so the result is a valid bundle."""
    for e in m["layers"]:
        if e.get("codec") == "nf4":
            e.update(codec="int4", params={**e["params"], "symmetric": True})
            return
        if e.get("codec") == "int4" and e["params"]["symmetric"]:
            e.update(codec="nf4", params={"bits": 4, "group_size": e["params"]["group_size"]})
            return


def _retype_param(m, arrays, rng) -> None:
    e = _layer(m, rng)
    params = e.get("params")
    if not params:
        return
    key = rng.choice(sorted(params))
    v = params[key]
    params[key] = rng.choice([str(v).lower(), 1.0 * v if isinstance(v, int) else v, not v, None, [v], {"v": v}, 0, 1])


def _alias(m, arrays, rng) -> None:
    e = _layer(m, rng)
    others = [n for n in m["tensors"] if n not in e.get("tensors", {}).values()]
    if e.get("tensors") and others:
        role = rng.choice(sorted(e["tensors"]))
        e["tensors"][role] = rng.choice(others)


def _swap_layers(m, arrays, rng) -> None:
    present = [e for e in m["layers"] if e["status"] == "present"]
    if len(present) >= 2:
        a, b = rng.sample(present, 2)
        a["tensors"], b["tensors"] = b["tensors"], a["tensors"]


def _rename(m, arrays, rng) -> None:
    """A tensor renamed consistently in the file and the manifest, to a name off its layer or role."""
    e = _layer(m, rng)
    if not e.get("tensors"):
        return
    role = rng.choice(sorted(e["tensors"]))
    old = e["tensors"][role]
    new = rng.choice([f"layers.{e['index'] + 7}.{role}", f"layers.{e['index']}.x{role}", "tokenizer", "weights"])
    if new in arrays:
        return
    arrays[new] = arrays.pop(old)
    e["tensors"][role] = new


def _drop_role(m, arrays, rng) -> None:
    e = _layer(m, rng)
    if e.get("tensors") and len(e["tensors"]) > 1:
        role = rng.choice(sorted(e["tensors"]))
        name = e["tensors"].pop(role)
        if rng.random() < 0.5:
            arrays.pop(name)


def _unreferenced(m, arrays, rng) -> None:
    name = rng.choice(["layers.9.table", "extra", "layers.0.extra"])
    arrays[name] = ("U8", np.zeros(rng.randint(1, 8), np.uint8))


def _status(m, arrays, rng) -> None:
    e = _layer(m, rng)
    if e["status"] == "present":
        names = list(e["tensors"].values())
        index = e["index"]
        e.clear()
        e.update(index=index, status="dropped")
        if rng.random() < 0.6:  # an honest drop: the tensors go too
            for n in names:
                arrays.pop(n, None)
    else:
        e["status"] = "present"


def _model_sizes(m, arrays, rng) -> None:
    key = rng.choice(["vocab_size", "hidden_size", "num_layers"])
    m["model"][key] = max(1, m["model"][key] + rng.choice([-1, 1, 32]))
    if rng.random() < 0.5 and key == "vocab_size":
        m["vocabulary"]["size"] = m["model"]["vocab_size"]


def _stats(m, arrays, rng) -> None:
    e = _layer(m, rng)
    key = rng.choice(["stored_bytes", "bits_per_value", "fp16_overflow", "max_abs", "rel_error"])
    if key in e or key in ("fp16_overflow", "max_abs"):
        e[key] = rng.choice([0, 1, 7, V * H, V * H + 1, 0.5, 1e9])
        if key in ("stored_bytes", "fp16_overflow") and isinstance(e[key], float):
            e[key] = int(e[key])


def _values(m, arrays, rng) -> None:
    """Table values a runtime would trip on, hashed consistently; sometimes with statistics that license them."""
    dense = [e for e in m["layers"] if e.get("codec") == "dense" and e["status"] == "present"]
    if not dense:
        return
    e = rng.choice(dense)
    name = e["tensors"]["table"]
    dtype, arr = arrays[name]
    arr = arr.copy()
    value = rng.choice([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e5, 65504.0 * 2])
    r, c = rng.randrange(V), rng.randrange(H)
    with np.errstate(over="ignore"):  # 3e38 in an F16 table is Inf: that is the point
        if dtype == "BF16":
            arr[r, c] = (np.array([value], "<f4").view("<u4") >> 16).astype("<u2")[0]
        else:
            arr[r, c] = value
    arrays[name] = (dtype, arr)
    if rng.random() < 0.5:
        e["fp16_overflow"] = e.get("fp16_overflow", 0) + rng.choice([0, 1, 2])
    if rng.random() < 0.5 and np.isfinite(value):
        e["max_abs"] = max(e.get("max_abs") or 0.0, abs(float(value)))


def _vocabulary(m, arrays, rng) -> None:
    how = rng.choice(["embedded", "sha", "size"])
    if how == "embedded":
        m["vocabulary"]["embedded"] = not m["vocabulary"]["embedded"]
    elif how == "sha":
        m["vocabulary"]["tokenizer_sha256"] = "ab" * 32
    else:
        m["vocabulary"]["size"] += 1


def _resize(m, arrays, rng) -> None:
    """The manifest's tensor entries edited after the hashes were taken (so they are not consistent)."""
    m["tensors"] = tensors_section(arrays)
    name = rng.choice(sorted(m["tensors"]))
    m["tensors"][name]["shape"] = [max(1, s + rng.choice([-1, 1])) for s in m["tensors"][name]["shape"]]


def _edit_tensor_entry(m, arrays, rng) -> None:
    m["tensors"] = tensors_section(arrays)
    name = rng.choice(sorted(m["tensors"]))
    key = rng.choice(["dtype", "bytes", "sha256"])
    m["tensors"][name][key] = {"dtype": "F16", "bytes": 3, "sha256": "0" * 64}[key]


LIES = [
    _relabel,
    _relabel_twin,
    _retype_param,
    _alias,
    _swap_layers,
    _rename,
    _drop_role,
    _unreferenced,
    _status,
    _model_sizes,
    _stats,
    _values,
    _values,
    _vocabulary,
    _resize,
    _edit_tensor_entry,
]
