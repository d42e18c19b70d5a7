"""The mixed-precision per-row codec: a slow reference decoder written from docs/bundle-format.md, the bytes it
stores, the allocation, streaming, hostile tensors, and round trips through every container and bundle operation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from tolcli import CompressOptions, compress, convert_bundle, drop_layers, open_bundle, precompute
from tolcli.codecs import DictAccess, codec_from_manifest, parse_spec
from tolcli.codecs.base import TableRows
from tolcli.codecs.mixed import Mixed, MixedCodec, fit_group_codes
from tolcli.errors import InputError, UsageError

MENU = {(0, 0)} | {(b, g) for b in (1, 2, 3, 4, 5, 6, 8) for g in (32, 64, 128)}


def _table(rows: int, width: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=g) * 3  # rows of very different norms
    return torch.randn(rows, width, generator=g) * scale + torch.randn(1, width, generator=g)


def reference_decode(params: dict, tensors: dict[str, Tensor], t: int) -> np.ndarray:
    """Row ``t`` decoded one element at a time, as docs/bundle-format.md ("mixed") describes it."""
    raw = tensors["index"][t].numpy()
    pos = sum(int(b) << (8 * j) for j, b in enumerate(raw))
    mean = tensors["mean"][0].numpy().astype(np.float32)
    start = 0
    for k, listed in enumerate(params["classes"]):  # noqa: B007 (k is used after the loop)
        if start <= pos < start + listed[2]:
            break
        start += listed[2]
    else:
        raise AssertionError("position outside every class")
    bits, group = listed[0], listed[1]
    if bits == 0:
        return mean.copy()
    slot = pos - start
    stream = tensors[f"class{k}.codes"][slot].numpy()
    scales = tensors[f"class{k}.scales"][slot].numpy()
    offsets = tensors[f"class{k}.offsets"][slot].numpy()
    out = np.empty(mean.shape[0], dtype=np.float32)
    for j in range(mean.shape[0]):
        q = 0
        for i in range(bits):
            n = j * bits + i
            q |= ((int(stream[n // 8]) >> (n % 8)) & 1) << i
        v = np.float32(q) * np.float32(scales[j // group]) + np.float32(offsets[j // group])
        out[j] = np.float32(v) + mean[j]
    return out


def _encode(
    table: Tensor, bits: float, weights: Tensor | None = None, batch: int = 8192, floor: float = 0.3
) -> tuple[MixedCodec, dict]:
    codec = Mixed(bits=bits, floor=floor).build(table.shape[1], weights=weights)
    enc = codec.encoder(TableRows(table, batch))
    tensors = {}
    for _, rows in TableRows(table, batch).batches():
        for role, t in enc.encode_rows(rows).items():
            tensors.setdefault(role, []).append(t)
    return codec, {**{r: torch.cat(ts) for r, ts in tensors.items()}, **enc.fixed}


def _bits_of_rows(codec: MixedCodec, tensors: dict[str, Tensor]) -> Tensor:
    """Each row's code width, read from ``index`` and the listed classes (independently of the decoder)."""
    raw = tensors["index"].long()
    pos = sum(raw[:, j] << (8 * j) for j in range(raw.shape[1]))
    ends = torch.tensor([c[2] for c in codec.params()["classes"]]).cumsum(0)
    bits = torch.tensor([c[0] for c in codec.params()["classes"]])
    return bits[torch.searchsorted(ends, pos, right=True)]


def test_decode_matches_a_reference_decoder_written_from_the_format(decoder: tuple[str, list[int]]) -> None:
    table = _table(300, 64)  # 300 rows: two index bytes per row
    w = torch.rand(300, generator=torch.Generator().manual_seed(1)) * 10
    codec, tensors = _encode(table, 2.5, w)
    params = codec.params()
    assert tensors["index"].shape == (300, 2) and len(params["classes"]) >= 3
    ids = torch.tensor([0, 299, 17, 17, 150, 3, 298, 42])
    expected = torch.from_numpy(np.stack([reference_decode(params, tensors, int(t)) for t in ids]))
    fresh = codec_from_manifest("mixed", params)  # as a reader builds it
    assert torch.equal(fresh.decode_rows(DictAccess(tensors), ids), expected)
    out = torch.empty(len(ids), 64)
    fresh.decode_into(DictAccess(tensors), ids, out)
    assert torch.equal(out, expected)
    full = torch.from_numpy(np.stack([reference_decode(params, tensors, t) for t in range(300)]))
    assert torch.equal(codec.decode_rows(DictAccess(tensors), torch.arange(300)), full)
    # each row costs at most its error as the mean row (what the allocation trades against), most rows far less
    err = (full - table).double().pow(2).sum(1)
    as_mean = (table - table.double().mean(0).float()).double().pow(2).sum(1)
    assert bool((err <= as_mean * (1 + 1e-4) + 1e-9).all()) and float(err.sum()) < 0.2 * float(as_mean.sum())


def _random_layer(rows: int, width: int, classes: list[tuple[int, int]], seed: int) -> tuple[dict, dict[str, Tensor]]:
    """A valid layer with random codes, scales, offsets and row order, every listed class holding rows."""
    g = np.random.default_rng(seed)
    counts = np.full(len(classes), rows // len(classes))
    counts[0] += rows - counts.sum()
    pos = g.permutation(rows)
    nb = 1 if rows <= 256 else 2
    tensors = {
        "index": torch.from_numpy(((pos[:, None] >> (8 * np.arange(nb))) & 0xFF).astype(np.uint8)),
        "mean": torch.from_numpy(g.standard_normal((1, width), dtype=np.float32)),
    }
    for k, ((b, grp), n) in enumerate(zip(classes, counts, strict=True)):
        if b:
            tensors[f"class{k}.codes"] = torch.from_numpy(g.integers(0, 256, (n, width * b // 8), dtype=np.uint8))
            for role, sign in (("scales", 1), ("offsets", -1)):
                v = (sign * g.random((n, width // grp), dtype=np.float32)).astype(np.float16)
                tensors[f"class{k}.{role}"] = torch.from_numpy(v)
    listed = [[b, grp, int(n)] for (b, grp), n in zip(classes, counts, strict=True)]
    return {"target_bits": 4.0, "classes": listed}, tensors


@pytest.fixture(params=["compiled", "numpy"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[int]]:
    """Which decoder a contiguous fp32 ``out`` gets: the numba kernels (tolcli.codecs.mixed_kernel) or the numpy
    fast path (``TOLCLI_NUMBA=0``); the list counts the calls that the kernels answered."""
    import os

    from tolcli.codecs import mixed_kernel

    if request.param == "compiled":
        if not mixed_kernel.available():
            assert not os.environ.get("CI"), "CI installs numba (the dev extra): the compiled decoder must be tested"
            pytest.skip("numba is not installed")
        monkeypatch.setenv("TOLCLI_NUMBA", "1")
    else:
        monkeypatch.setenv("TOLCLI_NUMBA", "0")
    answered: list[int] = []
    real = mixed_kernel.decode

    def spy(*args: object) -> bool:
        done = real(*args)  # type: ignore[arg-type]
        answered.append(int(done))
        return done

    monkeypatch.setattr(mixed_kernel, "decode", spy)
    return request.param, answered


@pytest.mark.parametrize("width", [128, 384])
def test_every_code_width_and_group_decodes_like_the_reference_on_both_paths(
    width: int, monkeypatch: pytest.MonkeyPatch, decoder: tuple[str, list[int]]
) -> None:
    """Every class of the menu, one layer: the compiled and numpy fast paths (a contiguous fp32 ``out``; numpy
    unpacks by whole-word shifts), the general path (a strided ``out``) and the bit-by-bit reference agree exactly,
    also across the numpy path's blocks (made tiny here) and with repeated ids."""
    from tolcli.codecs import mixed

    classes = sorted(MENU)
    params, tensors = _random_layer(400, width, classes, seed=width)
    codec = codec_from_manifest("mixed", params)
    ids = torch.cat([torch.arange(400), torch.tensor([5, 5, 399, 0])])
    expected = torch.from_numpy(np.stack([reference_decode(params, tensors, int(t)) for t in ids]))
    fast = torch.empty(len(ids), width)
    codec.decode_into(DictAccess(tensors), ids, fast)
    assert torch.equal(fast, expected)
    strided = torch.empty(width, len(ids)).t()  # not contiguous: the general path
    codec.decode_into(DictAccess(tensors), ids, strided)
    assert torch.equal(strided, expected)
    monkeypatch.setattr(mixed, "FAST_BLOCK_VALUES", 37 * width)  # blocks of 37 rows: the scratch is reused
    again = torch.full((len(ids), width), float("nan"))
    codec.decode_into(DictAccess(tensors), ids, again)
    assert torch.equal(again, expected)
    kind, answered = decoder
    assert answered == ([1, 1] if kind == "compiled" else [])  # the two contiguous outs, never the strided one


def test_the_compiled_decoder_reads_bundles_and_refuses_positions_beyond_the_layer(
    tmp_path: Path, decoder: tuple[str, list[int]]
) -> None:
    """A layer holding every class, written by the library's writer and read back from both containers: lookups
    equal the reference decoder (from the memory map's views, for the compiled path); an ``index`` whose position
    lies beyond the layer's rows is an InputError naming it, on either path."""
    from tolcli.testing import write_layer_bundle

    params, tensors = _random_layer(300, 128, sorted(MENU), seed=21)
    ids = torch.tensor([299, 0, 7, 7, 150, 42])
    expected = torch.from_numpy(np.stack([reference_decode(params, tensors, int(t)) for t in ids]))
    for name, index in (("ok", tensors["index"]), ("bad", tensors["index"].clone())):
        if name == "bad":
            index[7] = torch.tensor([0x2C, 0x01], dtype=torch.uint8)  # position 300 of a 300-row layer
        arrays = {r: t.numpy() for r, t in {**tensors, "index": index}.items()}
        for suffix in ("safetensors", "h5"):
            with open_bundle(write_layer_bundle(tmp_path / f"{name}.{suffix}", "mixed", params, arrays, 300, 128)) as b:
                if name == "ok":
                    assert torch.equal(b.lookup_layers(ids)[0], expected)
                    assert torch.equal(b.lookup_layers(ids)[0], expected)  # again: the layer's kept views
                else:
                    with pytest.raises(InputError, match="position 300"):
                        b.lookup_layers(ids)
    kind, answered = decoder
    if kind == "compiled":  # the safetensors memory map has views; lookups of the bad index raised from the kernel
        assert answered.count(1) >= 2
    else:
        assert answered == []


def test_corrupt_positions_and_class_shapes_are_refused_on_both_paths(decoder: tuple[str, list[int]]) -> None:
    """An ``index`` that reads as a negative position, or a class tensor of the wrong width, is an InputError on the
    fast path (contiguous ``out``) as on the general one, never stale scratch or a broadcast row."""
    params, tensors = _random_layer(300, 128, sorted(MENU), seed=13)
    codec = codec_from_manifest("mixed", params)
    ids = torch.arange(300)
    bad_index = {**tensors, "index": torch.full((300, 8), 0xFF, dtype=torch.uint8)}  # position -1
    k = next(k for k, c in enumerate(params["classes"]) if c[0] == 8)
    narrow = {**tensors, f"class{k}.codes": tensors[f"class{k}.codes"][:, :1].contiguous()}
    for bad, message in ((bad_index, "position -1"), (narrow, f"class{k}.codes` has shape")):
        for out in (torch.empty(300, 128), torch.empty(128, 300).t()):
            with pytest.raises(InputError, match=message):
                codec.decode_into(DictAccess(bad), ids, out)


def test_threads_decoding_at_once_each_get_their_own_rows(decoder: tuple[str, list[int]]) -> None:
    """The fast path's scratch buffers are per thread: four threads decoding different ids at once each get the
    rows a lone decode gives."""
    import threading

    params, tensors = _random_layer(500, 128, sorted(MENU), seed=11)
    codec = codec_from_manifest("mixed", params)
    g = torch.Generator().manual_seed(12)
    batches = [torch.randint(0, 500, (300,), generator=g) for _ in range(4)]
    expected = [codec.decode_rows(DictAccess(tensors), ids) for ids in batches]
    wrong: list[int] = []

    def work(k: int) -> None:
        out = torch.empty(300, 128)
        for _ in range(40):
            codec.decode_into(DictAccess(tensors), batches[k], out)
            if not torch.equal(out, expected[k]):
                wrong.append(k)

    import warnings

    before = list(warnings.filters)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
    # no blanket "ignore" left behind by decodes racing on the process-wide filters (numba's own may be added)
    added = [f for f in warnings.filters if f not in before]
    assert all(f[0] == "ignore" and f[2].__module__.startswith("numba") for f in added), added


class _ArrayAccess:
    """A TensorAccess over numpy arrays that hands out its arrays as views, aligned or not (a crafted file's)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def rows(self, role: str, ids: Tensor) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.arrays[role][ids.numpy()]))

    def full(self, role: str) -> Tensor:
        return torch.from_numpy(np.array(self.arrays[role]))

    def view(self, role: str) -> np.ndarray:
        return self.arrays[role]


def _misaligned(a: np.ndarray) -> np.ndarray:
    buf = np.zeros(a.nbytes + 1, dtype=np.uint8)
    out = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    out[...] = a
    return out


def test_misaligned_views_and_missing_unused_classes_decode_on_both_paths(decoder: tuple[str, list[int]]) -> None:
    """Views that are not naturally aligned (a crafted file may misalign its tensors; numba would assume them
    aligned) are left to the numpy path; a class that no requested id uses may lack its tensors in memory."""
    params, tensors = _random_layer(300, 128, sorted(MENU), seed=17)
    codec = codec_from_manifest("mixed", params)
    ids = torch.tensor([0, 5, 299, 5])
    expected = torch.from_numpy(np.stack([reference_decode(params, tensors, int(t)) for t in ids]))
    coded = next(k for k, c in enumerate(params["classes"]) if c[0])
    _, answered = decoder
    out = torch.empty(len(ids), 128)
    for role in ("mean", f"class{coded}.scales"):  # the layer's arrays, and a class's
        arrays = {r: t.numpy() for r, t in tensors.items()}
        arrays[role] = _misaligned(arrays[role])
        assert not arrays[role].flags.aligned
        codec.decode_into(_ArrayAccess(arrays), ids, out)
        assert torch.equal(out, expected)
        assert answered == []  # the kernels never read a misaligned view
    raw = tensors["index"].long()
    pos = sum(raw[:, j] << (8 * j) for j in range(raw.shape[1]))
    used = {int(p) for p in pos[ids]}
    starts = np.cumsum([0] + [c[2] for c in params["classes"]])
    unused = [k for k in range(len(params["classes"])) if not used & set(range(starts[k], starts[k + 1]))]
    k = next(k for k in unused if params["classes"][k][0])
    partial = {r: t for r, t in tensors.items() if not r.startswith(f"class{k}.")}
    codec.decode_into(DictAccess(partial), ids, out)
    assert torch.equal(out, expected)
    assert answered == []  # a role without a view: the compiled path leaves the layer to the numpy path


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_the_fast_unpacker_reads_every_code_of_the_bit_stream(bits: int, monkeypatch) -> None:
    """``unpack_codes_np`` against the stream read bit by bit (docs/bundle-format.md: code j in stream bits
    j*bits .. j*bits+bits-1, stream bit i is bit i % 8 of byte i // 8), in one chunk of words and in many."""
    from tolcli.codecs import mixed

    g = np.random.default_rng(bits)
    packed = g.integers(0, 256, (3, 1024 * bits), dtype=np.uint8)  # 8,192 codes a row
    streams = [int.from_bytes(row.tobytes(), "little") for row in packed]  # each row's stream as one integer
    expected = np.array([[(s >> (j * bits)) & ((1 << bits) - 1) for j in range(8192)] for s in streams])
    for scratch in (None, mixed._Scratch()):
        assert np.array_equal(mixed.unpack_codes_np(packed, bits, scratch), expected)
    monkeypatch.setattr(mixed, "SPREAD_CHUNK", 77)
    assert np.array_equal(mixed.unpack_codes_np(packed, bits, mixed._Scratch()), expected)


@pytest.mark.parametrize("bits", [1.5, 2.0, 3.0, 4.0])
def test_stored_bytes_count_the_side_information_and_stay_within_the_budget(bits: float) -> None:
    R, C = 512, 128
    codec, tensors = _encode(_table(R, C, seed=2), bits)
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    by_formula = R * 2 + 4 * C + sum(n * (C * b // 8 + 4 * (C // g)) for b, g, n in codec.params()["classes"] if b)
    assert codec.stored_bytes(R, C) == held == by_formula
    assert set(codec.tensor_specs(R, C)) == set(tensors)
    assert held <= bits * R * C / 8  # side information included
    assert held >= bits * R * C / 8 - 2 * (C + 16)  # and the budget is used (within about two rows)


def test_rows_with_the_weight_get_the_bits() -> None:
    R, C = 256, 64
    table = _table(R, C, seed=3)
    heavy = torch.arange(0, R, 16)  # 16 rows
    w = torch.ones(R)
    w[heavy] = 1000.0
    codec, tensors = _encode(table, 3.0, w, floor=0.0)  # the weights as given
    bits = _bits_of_rows(codec, tensors).float()
    light = torch.ones(R, dtype=torch.bool)
    light[heavy] = False
    assert bits[heavy].mean() > bits[light].mean() + 1
    assert bits[heavy].min() >= bits[light].median()
    _, uniform = _encode(table, 3.0)
    assert (_bits_of_rows(codec, tensors)[heavy].float().mean()) > _bits_of_rows(codec, uniform)[heavy].float().mean()


def test_a_budget_above_eight_bits_everywhere_gives_every_row_eight_bits() -> None:
    R, C = 128, 64  # 8 bits at group 32 plus fp16 scale and offset: 9 bits; index and mean: 0.14 more
    codec, tensors = _encode(_table(R, C, seed=4), 10.0)
    assert bool((_bits_of_rows(codec, tensors) == 8).all())


def test_streaming_in_row_batches_gives_the_same_bytes() -> None:
    table = _table(300, 64, seed=5)
    w = torch.rand(300, generator=torch.Generator().manual_seed(6))
    a_codec, a = _encode(table, 2.0, w, batch=8192)
    b_codec, b = _encode(table, 2.0, w, batch=7)
    assert a_codec.params() == b_codec.params() and list(a) == list(b)
    assert all(torch.equal(a[r], b[r]) for r in a)
    whole = Mixed(bits=2.0).build(64, weights=w).encode(table)
    assert all(torch.equal(whole[r], a[r]) for r in a)


def test_hostile_tensors_are_refused_with_an_input_error(decoder: tuple[str, list[int]]) -> None:
    table = _table(200, 64, seed=7)
    codec, tensors = _encode(table, 3.0)
    bad = dict(tensors)
    bad["index"] = tensors["index"].clone()
    bad["index"][5] = 200  # position 200 of a 200-row layer: one past the last
    with pytest.raises(InputError, match="position 200, beyond the layer's 200 rows"):
        codec.decode_rows(DictAccess(bad), torch.tensor([1, 5]))
    bad["index"][5] = 255
    with pytest.raises(InputError, match="beyond"):
        codec.decode_into(DictAccess(bad), torch.tensor([5]), torch.empty(1, 64))
    assert codec.decode_rows(DictAccess(bad), torch.tensor([1])).shape == (1, 64)  # other rows still decode


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"target_bits": 3.0, "classes": [[7, 32, 10]]}, "not in the menu"),
        ({"target_bits": 3.0, "classes": [[4, 48, 10]]}, "not in the menu"),
        ({"target_bits": 3.0, "classes": [[0, 32, 10]]}, "not in the menu"),
        ({"target_bits": 3.0, "classes": [[4, 32, 0]]}, "at least 1"),
        ({"target_bits": 3.0, "classes": [[4, 32, 5], [4, 32, 5]]}, "twice"),
        ({"target_bits": 3.0, "classes": [[0, 0, 2**64], [4, 32, 5]]}, "more than 72,057,594,037,927,935"),
        ({"target_bits": 3.0, "classes": [[4, 32, 5.0]]}, "integers"),
        ({"target_bits": 3.0, "classes": "all"}, "triples"),
        ({"target_bits": -1.0, "classes": [[4, 32, 5]]}, "bits"),
        ({"classes": [[4, 32, 5]]}, "KeyError"),
    ],
)
def test_manifest_params_are_validated(params: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        codec_from_manifest("mixed", params)


def test_classes_must_hold_the_table_rows_and_width() -> None:
    codec = codec_from_manifest("mixed", {"target_bits": 3.0, "classes": [[0, 0, 3], [4, 64, 7]]})
    assert set(codec.tensor_specs(10, 128)) == {"index", "mean", "class1.codes", "class1.scales", "class1.offsets"}
    with pytest.raises(UsageError, match="hold 10 rows"):
        codec.tensor_specs(11, 128)
    with pytest.raises(UsageError, match="not a multiple of class group 64"):
        codec.tensor_specs(10, 96)


def test_the_fit_beats_min_max_and_zero_bits_decode_to_the_mean() -> None:
    x = _table(64, 128, seed=8).reshape(64, 4, 32)
    for bits in (1, 2, 3, 4, 6, 8):
        top = (1 << bits) - 1
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        s, o = ((hi - lo) / top).half().float(), lo.half().float()
        mm = (torch.round((x - o) / s).clamp(0, top) * s + o - x).pow(2).sum()
        q, scale, offset, err = fit_group_codes(x, bits)
        assert q is not None
        rec = q * scale.float().unsqueeze(-1) + offset.float().unsqueeze(-1)
        assert torch.allclose(err, (rec - x).pow(2).sum(-1), rtol=1e-4)
        assert float(err.sum()) < float(mm)
        assert int(q.max()) <= top and int(q.min()) >= 0
    table = _table(100, 64, seed=9)
    codec, tensors = _encode(table, 0.45)  # 4 bytes beyond the side information: every row is the mean row
    assert codec.params()["classes"] == [[0, 0, 100]] and set(tensors) == {"index", "mean"}
    mean = table.double().mean(0).float()
    assert torch.equal(codec.decode_rows(DictAccess(tensors), torch.tensor([0, 99])), mean.expand(2, 64))


def test_the_fit_is_near_a_brute_force_grid_search_at_one_and_two_bits() -> None:
    g = torch.Generator().manual_seed(10)
    x = torch.randn(12, 1, 32, generator=g) * torch.randn(12, 1, 32, generator=g).exp()  # heavy tails: clipping pays
    for bits in (2, 1):
        top = (1 << bits) - 1
        lo, width = x.amin(-1).view(12, 1, 1, 1), (x.amax(-1) - x.amin(-1)).view(12, 1, 1, 1)
        s = width / top * torch.linspace(0.02, 1.0, 120).view(1, 1, -1, 1)  # [12, 1, S, 1]
        o = lo + width * torch.linspace(-0.2, 1.0, 121).view(1, -1, 1, 1)  # [12, O, 1, 1]
        xs = x.view(12, 1, 1, 32)
        q = torch.round((xs - o) / s).clamp(0, top)
        brute = (q * s + o - xs).pow(2).sum(-1).flatten(1).amin(1)  # [12]: the best grid point per group
        err = fit_group_codes(x, bits)[3].squeeze(1)
        assert float(err.sum()) <= 1.05 * float(brute.sum()), bits  # measured: 1.037 (2 bits), 1.028 (1 bit)


def test_spec_strings_and_budgets() -> None:
    assert parse_spec("mixed(bits=2.5)") == Mixed(bits=2.5) and str(Mixed(bits=3)) == "mixed"
    with pytest.raises(UsageError, match="floor"):
        parse_spec("mixed(floor=2)")
    assert Mixed(bits=2.5).build(64).stored_bytes(100, 64) == 2000  # before fitting: the budget, an upper bound
    with pytest.raises(UsageError, match="side information"):
        Mixed(bits=0.01).build(64).encode(_table(100, 64))
    with pytest.raises(UsageError, match="multiple of 32"):
        Mixed().build(48).encode(_table(10, 48))


def test_round_trips_through_containers_sharding_convert_drop_and_verify(
    tmp_path: Path, make_ckpt: Callable[..., Path]
) -> None:
    dense = precompute(make_ckpt(hidden_size=64), tmp_path / "d.safetensors", dtype="fp32").path
    ids = torch.tensor([0, 100, 5, 5, 57])
    st = compress(dense, tmp_path / "m.safetensors", CompressOptions(codec="mixed(bits=2.5)"))
    h5 = compress(dense, tmp_path / "m.h5", CompressOptions(codec="mixed(bits=2.5)"))
    many = compress(dense, tmp_path / "many", CompressOptions(codec="mixed(bits=2.5)"), max_shard_size="20kB")
    assert st.manifest["layers"] == h5.manifest["layers"] == many.manifest["layers"]
    with open_bundle(dense) as d:
        expected = {}
        for i in d.layers:
            codec = Mixed(bits=2.5).build(64)
            tensors = codec.encode(d.dense_layer(i))
            expected[i] = codec.decode_rows(DictAccess(tensors), ids)
            e = st.manifest["layers"][i]
            assert e["codec"] == "mixed" and e["params"] == codec.params()
            assert e["stored_bytes"] <= 2.5 * 101 * 64 / 8
            rows = torch.arange(101)
            err = (codec.decode_rows(DictAccess(tensors), rows) - d.dense_layer(i)).double().pow(2).sum()
            assert e["rel_error"] == pytest.approx(float((err / d.dense_layer(i).double().pow(2).sum()).sqrt()))
    back = convert_bundle(convert_bundle(st.path, tmp_path / "c.h5"), tmp_path / "back.safetensors")
    assert back.read_bytes() == st.path.read_bytes()
    dropped, _ = drop_layers(h5.path, tmp_path / "dropped.h5", drop_last=1)
    for path in (st.path, h5.path, many.path, back, Path(dropped)):
        with open_bundle(path, verify=True) as b:
            for i in b.layers:
                assert torch.equal(b.lookup(i, ids), expected[i]), (path, i)
                out = b.lookup_layers(ids)
                assert out.shape[0] >= 1
    with open_bundle(Path(dropped)) as b:
        assert sorted(b.layers) == [0, 1]


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_constant_groups_fit_with_scale_zero_code_zero_and_no_error(bits: int) -> None:
    # A constant group: no spread to scale, so scale 0, every code 0 (bundle-format.md: a zero scale decodes to
    # the offset), the offset the value itself (exact in fp16 here) and no error; a spread group beside it is fitted.
    x = torch.full((2, 2, 32), 0.375)
    x[1, 1] = torch.linspace(-1.0, 1.0, 32)
    q, scale, offset, err = fit_group_codes(x, bits)
    assert q is not None
    assert (q[0] == 0).all() and (q[1, 0] == 0).all()
    assert (scale[0] == 0).all() and scale[1, 0] == 0 and scale[1, 1] != 0
    assert (offset[0].float() == 0.375).all() and offset[1, 0].float() == 0.375
    assert (err[0] == 0).all() and err[1, 0] == 0
    assert fit_group_codes(x, bits, codes=False)[0] is None
