"""``svd(..., residual=CODEC)``: what the factors leave, ``T - A B``, coded per layer; rows decode as ``A B + R``.

Expected values come from derivations made here: ``A B`` from the stored fp16 factors, the residual's rows from the
slow reference decoder of the ``mixed`` format (tests/test_mixed_codec.py), its mean row as the mean of ``T - A B``,
and the rank under a budget by brute force over the ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.adversarial import write_raw
from tests.test_compress import synthetic_bundle
from tests.test_crosslayer import bundle_arrays, check_round_trips, embedding_tables, interrupted_then_resumed
from tests.test_crosslayer import decoded as decoded_double
from tests.test_mixed_codec import reference_decode
from tolcli import CompressOptions, compress, drop_layers, open_bundle
from tolcli.codecs import parse_spec
from tolcli.crosslayer import stack_bytes
from tolcli.errors import InputError, UsageError

V, H, L = 256, 32, 3


def tables() -> list[torch.Tensor]:
    """Layers that are functions of one embedding plus a part of their own that no shared rank holds."""
    return embedding_tables(V, H, L, dims=10, decay=1, scale=2, noise=0.3)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return synthetic_bundle(tmp_path_factory.mktemp("res") / "syn.safetensors", tables())


def decoded(path: Path) -> dict[int, torch.Tensor]:
    return {i: t.float() for i, t in decoded_double(path).items()}


def factors(b, i: int) -> torch.Tensor:
    """``A B`` of layer ``i`` from the stored fp16 tensors (a dense A, shared or not, and a dense B)."""
    names = b.manifest["layers"][i]["tensors"]
    return b.tensor(names["A.table"]).float() @ b.tensor(names["B"]).float()


def residual_tensors(b, i: int) -> tuple[dict, dict[str, torch.Tensor]]:
    e = b.manifest["layers"][i]
    tensors = {role[2:]: b.tensor(name) for role, name in e["tensors"].items() if role.startswith("R.")}
    return e["params"]["residual"]["params"], tensors


@pytest.mark.parametrize(
    "spec", ["svd(rank=4,residual=mixed(bits=2))", "svd(rank=8,cross_layer=true,residual=mixed(bits=2))"]
)
def test_rows_decode_as_the_factors_plus_the_reference_residual(src: Path, tmp_path: Path, spec: str) -> None:
    out = tmp_path / "r.safetensors"
    compress(src, out, CompressOptions(codec=spec), batch_rows=64)  # the residual's rows fitted in batches
    got = decoded(out)
    with open_bundle(out) as b:
        for i in range(L):
            e = b.manifest["layers"][i]
            assert e["params"]["residual"]["codec"] == "mixed"
            assert e["tensors"]["R.index"] == f"layers.{i}.R.index"  # a residual is the layer's own
            ab = factors(b, i)
            params, res = residual_tensors(b, i)
            # the residual was fitted to what the factors leave: its mean row is the mean of T - A B
            assert torch.allclose(res["mean"][0].float(), (tables()[i] - ab).mean(0), atol=1e-5)
            for t in (0, 1, 77, 255):
                want = ab[t] + torch.from_numpy(reference_decode(params, res, t))
                assert torch.allclose(got[i][t], want, rtol=1e-5, atol=1e-5)
            ids = torch.tensor([3, 255, 3, 0])
            looked = b.lookup_layers(ids)  # the run-time path (decode_into), every layer at once
            assert all(torch.equal(looked[k], got[j][ids]) for k, j in enumerate(b.present_layers))


def test_the_residual_takes_the_error_the_rank_leaves(src: Path, tmp_path: Path) -> None:
    """Rank 8 holds the shared part; the layers' own noise (0.3 per value) stays until a residual codes it."""
    err = {}
    for name, spec in (
        ("base", "svd(rank=8,cross_layer=true)"),
        ("res", "svd(rank=8,cross_layer=true,residual=mixed(bits=8))"),
    ):
        compress(src, tmp_path / f"{name}.safetensors", CompressOptions(codec=spec))
        got = decoded(tmp_path / f"{name}.safetensors")
        err[name] = sum(float((got[i] - t).pow(2).sum()) for i, t in enumerate(tables())) / sum(
            float(t.pow(2).sum()) for t in tables()
        )
    stack = torch.cat([t.double() for t in tables()], dim=1)
    tail = float(torch.linalg.svdvals(stack)[8:].pow(2).sum() / stack.pow(2).sum())
    assert err["base"] == pytest.approx(tail, rel=1e-2)  # the stack's truncated SVD (B's fp16 rounding aside)
    assert err["res"] < 1e-3 * err["base"]  # an 8-bit residual leaves only its rounding


def test_a_budget_counts_the_residual_and_the_rank_takes_the_rest(src: Path, tmp_path: Path) -> None:
    """The rank is the largest multiple of 8 whose dense fp16 factors fit the budget beside ``bits`` per value of
    residual in every layer (found here by brute force); the bundle stays within the budget."""
    budget = int(0.3 * L * V * H * 2)
    for bits in (0.5, 1.0, 2.0):
        want = max(r for r in range(8, L * H + 1, 8) if r * (V + L * H) * 2 + L * int(bits * V * H) // 8 <= budget)
        spec = f"svd(budget={budget},cross_layer=true,residual=mixed(bits={bits}))"
        res = compress(src, tmp_path / f"b{bits}.safetensors", CompressOptions(codec=spec))
        assert res.ranks[0] == want
        assert res.stored_bytes <= budget
        assert stack_bytes(parse_spec(spec), want, V, H, L) <= budget < stack_bytes(parse_spec(spec), want + 8, V, H, L)
    per_layer = compress(
        src, tmp_path / "pl.safetensors", CompressOptions(codec=f"svd(budget={2 * budget},residual=mixed(bits=1))")
    )
    assert per_layer.stored_bytes <= 2 * budget
    assert all(e["params"]["residual"]["params"]["target_bits"] == 1.0 for e in per_layer.manifest["layers"])


def test_containers_sharding_pack_drop_and_verify_read_the_same(src: Path, tmp_path: Path) -> None:
    x = tmp_path / "x.safetensors"
    compress(src, x, CompressOptions(codec="svd(rank=8,cross_layer=true,a=int8,residual=mixed(bits=1))"))
    check_round_trips(x, tmp_path, 3000)
    ref = decoded(x)
    _, m = drop_layers(x, tmp_path / "d.safetensors", keep_layers="2")
    assert {n for n in m["tensors"] if ".R." in n} == {n for n in m["tensors"] if n.startswith("layers.2.R.")} != set()
    assert torch.equal(decoded(tmp_path / "d.safetensors")[2], ref[2])


def test_compress_is_deterministic_and_resumes_to_the_same_bytes(src: Path, tmp_path: Path, monkeypatch) -> None:

    for spec in ("svd(budget=0.6,residual=mixed(bits=1))", "svd(rank=8,cross_layer=true,residual=mixed(bits=1))"):
        opts = CompressOptions(codec=spec)
        whole, again = tmp_path / "whole.safetensors", tmp_path / "again.safetensors"
        compress(src, whole, opts, batch_rows=50, force=True)  # the residual's fit streams in row batches
        compress(src, again, opts, batch_rows=50, force=True)
        assert again.read_bytes() == whole.read_bytes()
        resumed = interrupted_then_resumed(src, tmp_path / "x.safetensors", opts, monkeypatch, batch_rows=50)
        assert resumed == whole.read_bytes()


@pytest.mark.parametrize(
    "spec, match",
    [
        ("svd(rank=4,residual=svd(rank=2))", "residual cannot be an svd"),
        ("svd(rank=4,residual=mixed(bits=0.01))", "below its side information"),
    ],
)
def test_bad_residual_options(src: Path, tmp_path: Path, spec: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        compress(src, tmp_path / "x.safetensors", CompressOptions(codec=spec))


def _lie(good: Path, out: Path, edit) -> Path:
    """``good`` rewritten with an edited manifest, every hash and byte count consistent with the tensors."""
    arrays, m = bundle_arrays(good)
    edit(m)
    return write_raw(out, arrays, m)


def _nest_an_svd(m) -> None:
    m["layers"][0]["params"]["residual"] = {"codec": "svd", "params": {**m["layers"][1]["params"]}}


def _drop_the_residual(m) -> None:  # its tensors are still listed: roles the codec does not store
    del m["layers"][0]["params"]["residual"]


def _move_a_class_row(m) -> None:  # the classes then hold the layer's rows in other shapes than stored
    classes = m["layers"][0]["params"]["residual"]["params"]["classes"]
    classes[0][2] += 1
    classes[-1][2] -= 1


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_nest_an_svd, "residual cannot be an svd"),
        (_drop_the_residual, "R.index"),
        (_move_a_class_row, r"R.class2.codes' is U8\[32, 8\].*expects U8\[31, 8\]"),
    ],
)
def test_manifest_lies_about_the_residual_are_refused(src: Path, tmp_path: Path, edit, match: str) -> None:
    good = tmp_path / "g.safetensors"
    compress(src, good, CompressOptions(codec="svd(rank=4,residual=mixed(bits=1))"))
    with pytest.raises(InputError, match=match):
        open_bundle(_lie(good, tmp_path / "lie.safetensors", edit))


def _junk_in_the_residual(m) -> None:
    m["layers"][0]["params"]["residual"]["params"]["junk"] = [1, 2, 3]


def _integer_target_bits(m) -> None:
    m["layers"][0]["params"]["residual"]["params"]["target_bits"] = 1  # written as 1.0: one bundle, one manifest


@pytest.mark.parametrize("edit", [_junk_in_the_residual, _integer_target_bits])
def test_nested_parameters_must_be_in_their_canonical_form(src: Path, tmp_path: Path, edit) -> None:
    good = tmp_path / "g.safetensors"
    compress(src, good, CompressOptions(codec="svd(rank=4,residual=mixed(bits=1))"))
    with pytest.raises(InputError, match=r"codec mixed parameters .* are not in their canonical form"):
        open_bundle(_lie(good, tmp_path / "lie.safetensors", edit))


def test_a_ratio_or_budget_too_small_for_the_residual_is_refused(src: Path, tmp_path: Path) -> None:
    """Rank 8's fp16 factors (8 x (256 + 32) x 2 = 4,608 bytes a layer) and a 1-bit residual (1,024) need 5,632 bytes
    of a layer's 16,384: a ratio of 0.35 holds them; 0.3 (4,915) does not hold a 4-bit residual (4,096) and rank 8."""
    ok = compress(src, tmp_path / "ok.safetensors", CompressOptions(codec="svd(ratio=0.35,residual=mixed(bits=1))"))
    assert ok.ranks[0] == 8 and ok.stored_bytes <= 0.35 * L * V * H * 2
    for codec, fixed in (("ratio=0.3", "4,096 bytes"), ("budget=0.3", "12,288 bytes")):  # a layer; all 3 layers
        with pytest.raises(UsageError, match=f"cannot hold the {fixed} stored whatever the rank"):
            compress(src, tmp_path / "x.safetensors", CompressOptions(codec=f"svd({codec},residual=mixed(bits=4))"))


def test_auto_takes_an_svd_with_a_mixed_residual_as_a_candidate() -> None:
    from tolcli.autoplan import candidate_specs

    got = candidate_specs(["int4", "svd(rank=8,residual=mixed(bits=1))", "svd(rank=8,residual=int4)"], 128)
    assert [s.name for s in got] == ["int4", "svd", "svd"]


def test_a_bundles_nested_codecs_see_one_access_per_prefix(src: Path, tmp_path: Path) -> None:
    """Lookups hand a nested codec the same access object each time, so its per-access caches (a mixed codec's
    checked views) hold from one lookup to the next."""
    out = tmp_path / "r.safetensors"
    compress(src, out, CompressOptions(codec="svd(rank=32,cross_layer=true,a=mixed(bits=4),residual=mixed(bits=1))"))
    with open_bundle(out) as b:
        codec, access = b.layers[1].codec, b._accesses[1]
        first = {p: codec.sub_access(access, p) for p in ("A.", "R.")}
        b.lookup_layers(torch.tensor([1, 2]))
        assert all(codec.sub_access(access, p) is v and v.stable_views for p, v in first.items())


def test_inspect_shows_nested_codecs_in_short(src: Path, tmp_path: Path) -> None:
    from tolcli.cli.bundles import _layer_params

    out = tmp_path / "r.safetensors"
    compress(src, out, CompressOptions(codec="svd(rank=8,residual=mixed(bits=1))"))
    with open_bundle(out) as b:
        e = b.manifest["layers"][0]
    n = len(e["params"]["residual"]["params"]["classes"])
    assert _layer_params(e) == (
        "a=dense(dtype=F16), b_dtype=F16, method=exact, rank=8, "
        f"residual=mixed(classes=[{n} classes], target_bits=1.0), weighted=False"
    )


def _leaves(doc, path=()):
    """Every (path, value) under ``doc`` (JSON): what the manifest fuzz below may replace."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _leaves(v, (*path, i))
    yield path, doc


def _has(node, key) -> bool:
    return key in node if isinstance(node, dict) else isinstance(key, int) and 0 <= key < len(node)


HOSTILE = [-1, 0, 1, 3, 2**31, 2**62, 1e308, -0.5, "x", "svd", "mixed", None, [], {}, True, [[0, 0, 1]]]


def test_fuzzed_residual_manifests_end_in_tolcli_errors(src: Path, tmp_path: Path) -> None:
    """Any value of a cross-layer svd's params or tensor map (a mixed A, an int8 B, a mixed residual) replaced by a
    hostile one, hashes consistent: reading, verifying and looking rows up end well or in tolcli's own error."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.fuzz.harness import read_everything

    good = tmp_path / "g.safetensors"
    codec = "svd(rank=32,cross_layer=true,normalize=false,a=mixed(bits=4),b=int8,residual=mixed(bits=1))"
    compress(src, good, CompressOptions(codec=codec))
    arrays, manifest = bundle_arrays(good)
    spots = [path for path, _ in _leaves(manifest["layers"]) if len(path) >= 2 and path[1] in ("params", "tensors")]
    target, outcomes = tmp_path / "f.safetensors", {}

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(spots), st.sampled_from(HOSTILE)), min_size=1, max_size=2))
    def check(edits) -> None:
        m = json.loads(json.dumps(manifest))
        for path, value in edits:
            node = m["layers"]
            for key in path[:-1]:  # an earlier edit may have replaced a container on the way: then no edit
                node = node[key] if isinstance(node, (dict, list)) and _has(node, key) else None
            if isinstance(node, (dict, list)) and _has(node, path[-1]):
                node[path[-1]] = value
        write_raw(target, arrays, m)
        result = read_everything(target)  # raises on anything but success or a TolcliError
        outcomes[result] = outcomes.get(result, 0) + 1

    check()
    assert outcomes.get("InputError", 0) >= 100, outcomes  # most lies are caught
