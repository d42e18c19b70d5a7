"""Cross-layer SVD (``svd(..., cross_layer=true)``): one A factor shared by every layer.

Expected values come from derivations made here: the truncated SVD of the stacked tables (torch.linalg.svd in fp64),
the weighted optimum as the SVD of the stack with rows and columns scaled, bytes from the files' tensors."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.adversarial import tensors_section, write_raw
from tests.test_compress import synthetic_bundle
from tests.test_mixed_codec import reference_decode
from tolcli import CompressOptions, compress, convert_bundle, drop_layers, open_bundle
from tolcli.bundle.codestats import code_statistics
from tolcli.bundle.manifest import attribute_bytes
from tolcli.codecs import SVD, Dense, Int4
from tolcli.codecs.base import TableRows
from tolcli.codecs.svd import randomized_basis, streamed_randomized_basis
from tolcli.crosslayer import StackedRows, fit_stack, stack_bytes, stack_rank, stack_weights
from tolcli.errors import InputError, UsageError
from tolcli.transport import pack, unpack

V, H, L = 300, 16, 3


def embedding_tables(
    v: int, h: int, layers: int, *, dims: int, decay: float, scale: float, noise: float, seed: int = 0
) -> list[torch.Tensor]:
    """Layers that are functions of one embedding, ``scale * E M_l`` (E [v, dims], its columns' norms falling to
    ``10**-decay``), plus noise of their own (``noise`` per value) that no shared rank holds."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(v, dims, generator=g) * torch.logspace(0, -decay, dims)
    own = [(torch.randn(dims, h, generator=g), torch.randn(v, h, generator=g)) for _ in range(layers)]
    return [e @ m * scale + noise * n for m, n in own]


def shared_tables(seed: int = 0) -> list[torch.Tensor]:
    """Layers that are functions of one embedding: ``E M_l`` (E [V, 12]) plus a little noise of their own."""
    return embedding_tables(V, H, L, dims=12, decay=1.5, scale=3, noise=0.01, seed=seed)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return synthetic_bundle(tmp_path_factory.mktemp("xl") / "syn.safetensors", shared_tables())


def stacked_svd_reference(tables: list[torch.Tensor], rank: int) -> tuple[list[torch.Tensor], float]:
    """Each layer's block of the rank-``rank`` truncated SVD of ``[T_0 | T_1 | ...]``, and the squared error it
    leaves (the sum of the discarded squared singular values)."""
    x = torch.cat([t.double() for t in tables], dim=1)
    u, s, vt = torch.linalg.svd(x, full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return list(approx.split(H, dim=1)), float(s[rank:].pow(2).sum())


def decoded(path: Path) -> dict[int, torch.Tensor]:
    with open_bundle(path) as b:
        return {i: b.dense_layer(i).double() for i in b.present_layers}


def test_a_dense_factor_gives_the_truncated_svd_of_the_stack(src: Path, tmp_path: Path) -> None:
    tables = shared_tables()
    out = tmp_path / "x.safetensors"
    res = compress(src, out, CompressOptions(codec="svd(rank=8,cross_layer=true,a=dense(dtype=fp32))"))
    ref, tail = stacked_svd_reference(tables, 8)
    got = decoded(out)
    err = sum(float((got[i] - tables[i].double()).pow(2).sum()) for i in range(L))
    assert err == pytest.approx(tail, rel=2e-3)  # B is stored in fp16: its rounding adds a little
    for i in range(L):  # the same approximation, block by block, to fp16 rounding of B
        assert float((got[i] - ref[i]).abs().max()) < 2e-3 * float(ref[i].abs().max())
    # the shared rank beats per-layer SVDs of the same bytes: 8 shared vs 8*(V+L*H)/(L*(V+H)) = 2.8 per layer
    assert res.ranks == dict.fromkeys(range(L), 8)
    per_layer_tail = sum(float(torch.linalg.svdvals(t.double())[3:].pow(2).sum()) for t in tables)
    assert err < 0.5 * per_layer_tail


def test_layers_share_one_a_and_its_bytes_count_once(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    res = compress(src, out, CompressOptions(codec="svd(rank=32,cross_layer=true,a=int4(group=32))"))
    with open_bundle(out) as b:
        tensors = b.manifest["tensors"]
        shared = {n for n in tensors if n.startswith("shared.0.A.")}
        assert shared == {"shared.0.A.codes", "shared.0.A.scales", "shared.0.A.offsets"}
        for e in b.manifest["layers"]:
            assert {r: n for r, n in e["tensors"].items() if r.startswith("A.")} == {n[9:]: n for n in shared}
            assert e["tensors"]["B"] == f"layers.{e['index']}.B" and e["params"]["shared"] == 0
        a_bytes = sum(tensors[n]["bytes"] for n in shared)
        b_bytes = [tensors[f"layers.{i}.B"]["bytes"] for i in range(L)]
        assert b_bytes == [32 * H * 2] * L and a_bytes == V * 16 + 2 * V * 2  # codes: 32 nibbles a row; 1 group
        assert [e["stored_bytes"] for e in b.manifest["layers"]] == [a_bytes + b_bytes[0], *b_bytes[1:]]
        assert res.stored_bytes == sum(t["bytes"] for t in tensors.values())
        assert b.manifest["layers"][1]["bits_per_value"] == 8 * b_bytes[1] / (V * H)
        stats = code_statistics(b)  # inspect --entropy: the shared tensors once, in layer 0
        assert [s.stored_bytes for s in stats] == [e["stored_bytes"] for e in b.manifest["layers"]]
        assert stats[0].codes == V * 32 and stats[1].codes == 0
    assert stack_bytes(SVD(rank=32, a=Int4(group=32), cross_layer=True), 32, V, H, L) == res.stored_bytes


def test_drop_keeps_a_while_a_layer_reads_it_and_moves_its_bytes(src: Path, tmp_path: Path) -> None:
    x = tmp_path / "x.safetensors"
    compress(src, x, CompressOptions(codec="svd(rank=32,cross_layer=true,a=int4(group=32))"))
    before = decoded(x)
    _, m = drop_layers(x, tmp_path / "d.safetensors", keep_layers="1,2")
    with open_bundle(x) as b:
        total = b.manifest["layers"][0]["stored_bytes"]
        b_bytes = b.manifest["layers"][1]["stored_bytes"]
    assert [e.get("stored_bytes") for e in m["layers"]] == [None, total, b_bytes]  # A moved to layer 1
    after = decoded(tmp_path / "d.safetensors")
    assert all(torch.equal(after[i], before[i]) for i in (1, 2))
    _, m2 = drop_layers(tmp_path / "d.safetensors", tmp_path / "d2.h5", keep_layers="2")
    assert set(m2["tensors"]) == {"shared.0.A.codes", "shared.0.A.scales", "shared.0.A.offsets", "layers.2.B"}
    assert torch.equal(decoded(tmp_path / "d2.h5")[2], before[2])


def check_round_trips(x: Path, tmp_path: Path, shard_size: int) -> None:
    """``x`` packed and unpacked to the same bytes, and converted to HDF5 and to shards of ``shard_size`` bytes, each
    verifying and decoding (whole layers, and ids of every present layer at once) to the same values."""
    ref = decoded(x)
    pack(x, tmp_path / "x.zst")
    unpack(tmp_path / "x.zst", tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == x.read_bytes()
    for out, kw in ((tmp_path / "x.h5", {}), (tmp_path / "sharded", {"max_shard_size": shard_size})):
        convert_bundle(x, out, **kw)
        with open_bundle(out) as b:
            b.verify()
            assert all(torch.equal(b.dense_layer(i).double(), ref[i]) for i in b.present_layers)
            ids = torch.tensor([5, 0, b.vocab_size - 1, 5])
            got = b.lookup_layers(ids)  # every present layer at once
            assert all(torch.equal(got[k].double(), ref[i][ids]) for k, i in enumerate(b.present_layers))


def test_every_container_sharding_and_pack_read_the_same(src: Path, tmp_path: Path) -> None:
    x = tmp_path / "x.safetensors"
    compress(src, x, CompressOptions(codec="svd(rank=32,cross_layer=true,a=int4(group=32))"))
    check_round_trips(x, tmp_path, 2000)


def test_compress_is_deterministic(src: Path, tmp_path: Path) -> None:
    opts = CompressOptions(codec="svd(budget=0.3,cross_layer=true)")
    a = compress(src, tmp_path / "a.safetensors", opts)
    compress(src, tmp_path / "b.safetensors", opts)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a.stored_bytes <= 0.3 * L * V * H * 2
    assert a.ranks[0] == 8  # 8 * (V + L * H) * 2 = 5,568 bytes fit 0.3 * 28,800; rank 16 (11,136) does not
    assert stack_bytes(SVD(rank=8, cross_layer=True), 16, V, H, L) > 0.3 * L * V * H * 2


def test_weighted_fit_is_the_weighted_optimum_when_weights_factor() -> None:
    """With ``w_lt = w_t c_l`` the stack's fit minimises ``sum w_lt ||T_lt - A_t B_l||^2``: its error equals the
    tail of the SVD of ``diag(sqrt w) [sqrt(c_0) T_0 | ...]``."""
    tables = shared_tables(3)
    g = torch.Generator().manual_seed(5)
    w_t = torch.rand(V, generator=g, dtype=torch.float64) * 10 + 0.1
    c = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    weights = {i: (w_t * c[i]).float() for i in range(L)}
    row_w, scales = stack_weights(weights, list(range(L)))
    source = StackedRows([TableRows(t, 64) for t in tables], scales)  # type: ignore[list-item]
    spec = SVD(rank=6, a=Dense("fp32"), cross_layer=True, gram="fp64")
    basis, b_all = fit_stack(spec, source, 6, row_w)
    x = source.stack(tables)
    a = x @ basis
    err = 0.0
    for k, t in enumerate(tables):
        approx = (a @ b_all[:, k * H : (k + 1) * H]).double() / float(scales[k])
        err += float((weights[k].double() * (t.double() - approx).pow(2).sum(1)).sum())
    y = w_t.sqrt().unsqueeze(1) * torch.cat([c[k].sqrt() * t.double() for k, t in enumerate(tables)], dim=1)
    tail = float(torch.linalg.svdvals(y)[6:].pow(2).sum())
    assert err == pytest.approx(tail, rel=1e-4)


def test_compress_weights_layers_by_their_share(src: Path, tmp_path: Path, monkeypatch) -> None:
    """Per-layer token weights that factor (``w_t c_l``) reach the written bundle: its decoded tables leave the
    weighted optimum's error (the tail of the scaled stack's SVD), and plain fits leave more."""
    tables = shared_tables()
    w_t = torch.linspace(0.1, 5.0, V, dtype=torch.float64)
    c = torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    weights = {i: (w_t * c[i]).float() for i in range(L)}
    module = importlib.import_module("tolcli.compress")  # `tolcli.compress` is also the function's name
    monkeypatch.setattr(module, "load_weights", lambda *a, **k: (weights, {"source": "test"}))
    out = tmp_path / "w.safetensors"
    res = compress(src, out, CompressOptions(codec="svd(rank=6,cross_layer=true,a=dense(dtype=fp32),gram=fp64)"))
    assert res.manifest["layers"][0]["params"]["weighted"] is True

    def weighted_error(path: Path) -> float:
        got = decoded(path)
        return sum(float((weights[i].double() * (got[i] - tables[i].double()).pow(2).sum(1)).sum()) for i in range(L))

    y = w_t.sqrt().unsqueeze(1) * torch.cat([c[k].sqrt() * t.double() for k, t in enumerate(tables)], dim=1)
    tail = float(torch.linalg.svdvals(y)[6:].pow(2).sum())
    assert weighted_error(out) == pytest.approx(tail, rel=2e-3)  # B in fp16
    monkeypatch.undo()
    plain = tmp_path / "p.safetensors"
    compress(src, plain, CompressOptions(codec="svd(rank=6,cross_layer=true,a=dense(dtype=fp32),gram=fp64)"))
    assert weighted_error(plain) > 1.2 * tail


def test_a_mixed_a_factor_decodes_like_the_reference_and_follows_the_weights(src: Path, tmp_path: Path) -> None:
    """A cross-layer A coded by ``mixed`` (fitted to the whole factor with the stack's row weights): each row decodes
    as the slow reference decoder of the format gives A's row, times the layer's B; heavy rows get the bits."""
    counts = np.ones(V, dtype=np.int64)
    counts[:30] = 10_000
    np.save(tmp_path / "w.npy", counts)
    out = tmp_path / "m.safetensors"
    spec = "svd(rank=32,cross_layer=true,normalize=false,a=mixed(bits=2))"
    compress(src, out, CompressOptions(codec=spec, token_weights=str(tmp_path / "w.npy"), weight_floor=0.0))
    got = decoded(out)
    with open_bundle(out) as b:
        e = b.manifest["layers"][2]
        assert e["params"]["a"]["codec"] == "mixed" and e["tensors"]["A.index"] == "shared.0.A.index"
        a_params = e["params"]["a"]["params"]
        a_tensors = {n[len("shared.0.A.") :]: b.tensor(n) for n in b.manifest["tensors"] if n.startswith("shared.")}
        bs = {i: b.tensor(f"layers.{i}.B").float() for i in range(L)}
    for t in (0, 7, 29, 30, 150, 299):
        a_row = torch.from_numpy(reference_decode(a_params, a_tensors, t))
        for i in range(L):
            assert torch.allclose(got[i][t].float(), a_row @ bs[i], rtol=1e-5, atol=1e-5)
    tables = shared_tables()
    err = torch.stack([(got[i] - tables[i].double()).pow(2).sum(1) for i in range(L)]).sum(0)
    assert float(err[:30].mean()) < 0.05 * float(err[30:].mean())  # the weighted rows are coded finely


def test_streamed_range_finder_matches_the_whole_table_one() -> None:
    table = torch.cat(shared_tables(1), dim=1)
    kw = {"weights": None, "oversample": 6, "power_iters": 2, "seed": 3}
    whole = randomized_basis(table, 6, **kw).double()
    streamed, energy = streamed_randomized_basis(TableRows(table, 37), 6, **kw)
    assert torch.allclose(streamed @ streamed.T, whole @ whole.T, atol=1e-4)  # the same subspace
    exact = torch.linalg.svdvals(table.double())[:6].pow(2)
    assert torch.allclose(energy, exact, rtol=1e-4)


def test_randomized_method_reads_in_batches_and_is_close_to_exact(src: Path, tmp_path: Path) -> None:
    ex = compress(src, tmp_path / "e.safetensors", CompressOptions(codec="svd(rank=8,cross_layer=true)"))
    rnd = compress(
        src, tmp_path / "r.safetensors", CompressOptions(codec="svd(rank=8,cross_layer=true,method=randomized)"),
        batch_rows=50,
    )  # fmt: skip
    assert rnd.manifest["layers"][0]["params"]["method"] == "randomized"
    tables = shared_tables()
    errs = [
        sum(float((d[i] - tables[i].double()).pow(2).sum()) for i in range(L))
        for d in (decoded(tmp_path / "e.safetensors"), decoded(tmp_path / "r.safetensors"))
    ]
    assert errs[1] == pytest.approx(errs[0], rel=0.02)
    assert ex.ranks == rnd.ranks


@pytest.mark.parametrize(
    ("codec", "match"),
    [
        ("svd(energy=0.9,cross_layer=true)", "not energy"),
        ("svd(rank=100,cross_layer=true)", r"outside 1\.\.48"),
        ("svd(budget=1kB,cross_layer=true)", "below the smallest cross-layer rank"),
    ],
)
def test_bad_cross_layer_options(src: Path, tmp_path: Path, codec: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        compress(src, tmp_path / "x.safetensors", CompressOptions(codec=codec))
    assert not (tmp_path / "x.safetensors").exists()


def test_exact_refuses_a_stack_too_wide_for_its_gram(src: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("tolcli.crosslayer.MAX_EXACT_WIDTH", 40)
    with pytest.raises(UsageError, match="method=randomized"):
        compress(src, tmp_path / "x.safetensors", CompressOptions(codec="svd(rank=8,cross_layer=true)"))
    assert stack_rank(SVD(ratio=0.25, cross_layer=True), V, H, L) == 8  # 8 * (300 + 48) * 2 <= 0.25 * 28,800 bytes


def bundle_arrays(path: Path) -> tuple[dict[str, tuple[str, np.ndarray]], dict]:
    """A bundle's tensors (name -> (dtype, stored array)) and a copy of its manifest: what ``write_raw`` rewrites."""
    with open_bundle(path) as b:
        arrays = {n: (t["dtype"], np.concatenate(list(b.entry(n).blocks()))) for n, t in b.manifest["tensors"].items()}
        return arrays, json.loads(json.dumps(b.manifest))


def _lie(good: Path, out: Path, edit) -> Path:
    """``good`` rewritten with an edited manifest, every hash and byte count consistent with the tensors."""
    arrays, m = bundle_arrays(good)
    if edit is _two_a_factors_in_one_group:
        arrays["shared.0.A.table"] = ("F16", np.zeros((V, 32), np.float16))
    edit(m)
    if edit is _two_a_factors_in_one_group:
        m["layers"] = attribute_bytes(m["layers"], tensors_section(arrays), V * H)
    return write_raw(out, arrays, m)


def _relabel_layer1_fit(m) -> None:
    m["layers"][1]["params"]["a"]["params"]["fit"] = "minmax"  # same shapes; the layers disagree on the shared A


def _count_a_twice(m) -> None:
    e = m["layers"][1]
    e["stored_bytes"] = m["layers"][0]["stored_bytes"]
    e["bits_per_value"] = 8 * e["stored_bytes"] / (V * H)


def _own_a(m) -> None:
    m["layers"][1]["tensors"]["A.codes"] = "layers.1.A.codes"


def _unshare(m) -> None:
    del m["layers"][1]["params"]["shared"]  # then its A roles must be its own tensors


def _two_a_factors_in_one_group(m) -> None:
    """Layer 2 reads another A (dense, its own tensor name) in group 0: the group would hold two factors."""
    e = m["layers"][2]
    e["params"]["a"] = {"codec": "dense", "params": {"dtype": "F16"}}
    e["params"].pop("normalize", None)
    e["tensors"] = {"A.table": "shared.0.A.table", "B": "layers.2.B"}


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_relabel_layer1_fit, "is read by layer 0 with other parameters"),
        (_two_a_factors_in_one_group, "'shared.0.A.table' is read by layer 0 with other parameters"),
        (_count_a_twice, "counts in the first present layer"),
        (_own_a, "role A.codes must be tensor 'shared.0.A.codes'"),
        (_unshare, "role A.codes must be tensor 'layers.1.A.codes'"),
    ],
)
def test_manifest_lies_about_sharing_are_refused(src: Path, tmp_path: Path, edit, match: str) -> None:
    good = tmp_path / "x.safetensors"
    compress(src, good, CompressOptions(codec="svd(rank=32,cross_layer=true,a=int4(group=32))"))
    with pytest.raises(InputError, match=match):
        open_bundle(_lie(good, tmp_path / "lie.safetensors", edit))


def test_auto_refuses_a_cross_layer_candidate(src: Path, tmp_path: Path) -> None:
    opts = CompressOptions("auto", budget="0.25", candidates="int4(group=32),svd(rank=8,cross_layer=true)")
    with pytest.raises(UsageError, match="cannot be one layer's choice"):
        compress(src, tmp_path / "x.safetensors", opts)


def interrupted_then_resumed(src: Path, out: Path, opts: CompressOptions, monkeypatch, **kw) -> bytes:
    """``compress`` interrupted (Ctrl-C) after committing two layers, then resumed: the bytes written."""
    from tolcli.bundle.writer import Staging

    commit, calls = Staging.commit_layer, []

    def crash_after_two(self, index, entry):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(index)
        commit(self, index, entry)

    monkeypatch.setattr(Staging, "commit_layer", crash_after_two)
    out.unlink(missing_ok=True)
    with pytest.raises(KeyboardInterrupt):
        compress(src, out, opts, **kw)
    monkeypatch.undo()
    compress(src, out, opts, resume=True, **kw)
    return out.read_bytes()


def test_an_interrupted_run_resumes_to_the_same_bytes(src: Path, tmp_path: Path, monkeypatch) -> None:
    opts = CompressOptions(codec="svd(rank=32,cross_layer=true,a=int4(group=32))")
    whole = tmp_path / "whole.safetensors"
    compress(src, whole, opts)
    assert interrupted_then_resumed(src, tmp_path / "x.safetensors", opts, monkeypatch) == whole.read_bytes()


def test_a_b_codec_stores_b_quantised_and_decodes_from_it(src: Path, tmp_path: Path) -> None:
    """``b=int8``: each layer's B is int8 codes with a per-row fp16 scale; rows decode as A's row times
    ``codes * scale`` (computed here from the stored tensors), for a cross-layer and a per-layer SVD."""
    for spec in ("svd(rank=32,cross_layer=true,a=int4(group=32),b=int8)", "svd(rank=8,a=int8,b=int8)"):
        out = tmp_path / "b.safetensors"
        res = compress(src, out, CompressOptions(codec=spec), force=True)
        got = decoded(out)
        with open_bundle(out) as b:
            e = b.manifest["layers"][1]
            assert e["params"]["b"] == {"codec": "int8", "params": {"bits": 8, "group_size": H, "fit": "mse"}}
            assert "b_dtype" not in e["params"] and e["tensors"]["B.codes"] == "layers.1.B.codes"
            r = e["params"]["rank"]
            assert b.manifest["tensors"]["layers.1.B.codes"]["shape"] == [r, H]
            for i in range(L):
                codes = b.tensor(f"layers.{i}.B.codes").float()
                scales = b.tensor(f"layers.{i}.B.scales").float()
                b_ref = codes * scales  # [r, H] * [r, 1]
                a_rows = b.layers[i].codec.a_codec.decode_rows(_prefixed(b, i), torch.arange(V))
                assert torch.allclose(got[i].float(), a_rows @ b_ref, rtol=1e-5, atol=1e-4)
        tables = shared_tables()
        rel = sum(float((got[i] - tables[i].double()).norm()) for i in range(L)) / sum(
            float(t.double().norm()) for t in tables
        )
        assert rel < 0.2 and res.stored_bytes < L * V * H * 2 * 0.4


def _prefixed(b, i):
    from tolcli.codecs.base import PrefixedAccess

    return PrefixedAccess(b._accesses[i], "A.")


def test_a_mixed_a_fills_the_budget_its_bits_choose_the_rank(tmp_path: Path) -> None:
    """``budget`` with a ``mixed`` A: the rank is the largest multiple of 32 whose A at the given bits (plus the
    int8 B's) fits, found here by brute force over the ranks, and A's bits then rise to spend the rest."""
    g = torch.Generator().manual_seed(9)
    v, h, layers = 400, 32, 4
    e = torch.randn(v, 40, generator=g) * torch.logspace(0, -1, 40)
    tables = [e @ torch.randn(40, h, generator=g) for _ in range(layers)]
    src = synthetic_bundle(tmp_path / "syn.safetensors", tables)
    budget = int(0.2 * layers * v * h * 2)

    def nominal_bytes(r: int, bits: float) -> int:  # A: bits per value, side information included; B: int8 + scale
        return int(bits * v * r) // 8 + layers * r * (h + 2)

    for bits in (3.0, 4.4, 6.0):
        want = max(r for r in range(32, layers * h + 1, 32) if nominal_bytes(r, bits) <= budget)
        spec = f"svd(budget={budget},cross_layer=true,normalize=false,a=mixed(bits={bits}),b=int8)"
        res = compress(src, tmp_path / f"m{bits}.safetensors", CompressOptions(codec=spec))
        assert res.ranks[0] == want
        filled = res.manifest["layers"][0]["params"]["a"]["params"]["target_bits"]
        left = budget - layers * want * (h + 2)
        assert filled == min(8.0, int(1000 * 8 * left / (v * want)) / 1000)  # at most 8 bits a value
        assert res.stored_bytes <= budget
        assert res.stored_bytes >= 0.99 * nominal_bytes(want, filled)  # the bytes A was given are spent


def test_a_layer_without_weight_is_refused_and_a_rank_above_fp16_is_warned(src: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"layer\(s\) 1 carry no token weight"):
        stack_weights({0: torch.ones(V), 1: torch.zeros(V), 2: torch.ones(V)}, [0, 1, 2])
    notes: list[str] = []
    big = CompressOptions(codec="svd(rank=48,cross_layer=true)")
    compress(src, tmp_path / "big.safetensors", big, note=notes.append)
    # rank 48: 48 * (300 + 3 * 16) * 2 = 33,408 bytes against 3 * 300 * 16 * 2 = 28,800 of fp16
    assert any("1.16x the dense fp16 bytes" in n for n in notes)


def test_the_sweep_uses_the_range_finder_for_stacks_too_wide_for_the_gram() -> None:
    from tolcli.sweep import SweepOptions, _grid

    narrow = _grid(SweepOptions(families=("cross-svd",), bits=(2,)), 128, 6)[0][2].codec_spec()
    wide = _grid(SweepOptions(families=("cross-svd",), bits=(2,)), 2048, 24)[0][2].codec_spec()
    assert (narrow.method, wide.method) == ("exact", "randomized")
