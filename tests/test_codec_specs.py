"""Codec specs: the spec-string parser, the schemes as sugar for specs, and a new codec added in one place."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

from tolcli import CompressOptions, compress, open_bundle, precompute
from tolcli.codecs import (
    NF4,
    SVD,
    Codec,
    CodecSpec,
    Dense,
    DictAccess,
    Int4,
    Int8,
    SVDCodec,
    TensorAccess,
    parse_spec,
    spec_names,
)
from tolcli.compress import SCHEMES
from tolcli.errors import UsageError
from tolcli.info import TOL_STORAGE_BYTES_PER_VALUE


# ---- (a) spec strings -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "spec", "canonical"),
    [
        ("int4", Int4(), "int4"),
        ("int4()", Int4(), "int4"),
        ("int4(group=32,symmetric=true)", Int4(32, True), "int4(group=32,symmetric=true)"),
        (" int4 ( symmetric = TRUE , group = 64 ) ", Int4(64, True), "int4(symmetric=true)"),
        ("nf4(group=128)", NF4(128), "nf4(group=128)"),
        ("int8", Int8(), "int8"),
        ("int8(group=16)", Int8(16), "int8(group=16)"),
        ("dense(dtype=bf16)", Dense("bf16"), "dense(dtype=bf16)"),
        ("dense(dtype=F16)", Dense("fp16"), "dense(dtype=fp16)"),
        ("svd(rank=64)", SVD(rank=64), "svd(rank=64)"),
        ("svd(rank=64,a=dense(dtype=fp16))", SVD(rank=64), "svd(rank=64)"),
        ("svd(rank=64,a=int4(group=32))", SVD(rank=64, a=Int4(32)), "svd(rank=64,a=int4(group=32))"),
        ("svd(ratio=.25,a=int8)", SVD(ratio=0.25, a=Int8()), "svd(ratio=0.25,a=int8)"),
        ("svd(budget=12MB,min_rank=16)", SVD(budget="12MB", min_rank=16), "svd(budget=12MB,min_rank=16)"),
        (
            "svd(energy=0.9,a=nf4(group=32),method=randomized,seed=3,rank_multiple=16)",
            SVD(energy=0.9, a=NF4(32), method="randomized", seed=3, rank_multiple=16),
            "svd(energy=0.9,rank_multiple=16,a=nf4(group=32),method=randomized,seed=3)",
        ),
    ],
)
def test_spec_strings_parse_and_round_trip(text: str, spec: CodecSpec, canonical: str) -> None:
    parsed = parse_spec(text)
    assert parsed == spec
    assert str(parsed) == canonical
    assert parse_spec(canonical) == spec


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("", "character 1: expected a codec name, found the end"),
        ("zip", "unknown codec 'zip'; choose one of dense, int2, int3, int4, int8, "),
        ("svd(rank=8,a=zip)", "character 14: unknown codec 'zip'"),
        ("int4(grp=32)", "character 6: int4 has no option 'grp' \\(it has group, symmetric, fit, center\\)"),
        ("int4(group=32,group=64)", "group given twice"),
        ("int4(group=x)", "int4 group takes an integer, got 'x'"),
        ("int4(group=32.0)", "int4 group takes an integer, got '32.0'"),
        ("int4(symmetric=yes)", "int4 symmetric takes true or false, got 'yes'"),
        ("svd(ratio=nan)", "svd ratio takes a number, got 'nan'"),
        ("svd(ratio=1_0)", "svd ratio takes a number"),
        ("int4(group=48)", "int4 group size must be one of \\(32, 64, 128\\), got 48"),
        ("dense(dtype=fp8)", "dense dtype must be fp32, fp16 or bf16"),
        ("svd", "svd needs exactly one of rank, ratio, budget and energy, got none"),
        ("svd(rank=8,ratio=0.1)", "got rank and ratio"),
        ("svd(ratio=5)", "svd ratio must be in \\(0, 4\\]"),
        ("svd(rank=-1)", "svd rank must be >= 1, got -1"),
        ("svd(rank=8,method=qr)", "svd method must be one of exact, randomized"),
        ("int4(group=32))", "character 15: unexpected '\\)' after the spec"),
        ("int4 int8", "unexpected 'int8' after the spec"),
        ("int4(group=32", "expected ',' or '\\)', found the end"),
        ("int4(group=32,)", "expected an option name, found '\\)'"),
        ("int4(group)", "expected '=' after group"),
        ("int4(group=(32))", "expected a value, found '\\('"),
        ("int4(group=32;symmetric=true)", "found ';'"),
        ("__import__('os')", 'found "\'"'),
        # nesting: a spec where a plain value goes, a value where a spec goes, and a spec that cannot nest
        ("int4(group=int4(group=32))", "int4 group takes an integer, not a codec spec"),
        ("svd(rank=8,a=32)", "unknown codec '32'"),
        (
            "svd(rank=8,a=svd(rank=4))",
            "the svd A factor needs a row-wise codec \\(dense, int2, int3, int4, .*\\), not svd",
        ),
        ("svd(rank=8,a=" * 10 + "int4" + ")" * 10, "nested more than 8 deep"),
    ],
)
def test_spec_strings_are_strict(text: str, msg: str) -> None:
    with pytest.raises(UsageError, match=msg):
        parse_spec(text)


def test_every_spec_builds_a_codec_that_rebuilds_from_its_manifest_params() -> None:
    assert {"dense", "int2", "int3", "int4", "int8", "nf4", "svd"} <= set(spec_names())
    for spec in (Dense(), Int4(), NF4(32), Int8(), SVD(rank=32, a=Int4(32), method="randomized")):
        codec = spec.build(128)
        assert codec.name == spec.name and type(codec).spec is type(spec)
        assert type(codec).from_params(codec.params()).params() == codec.params()


def test_info_bytes_per_value_come_from_the_codecs() -> None:
    assert TOL_STORAGE_BYTES_PER_VALUE == {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int4-g64": 0.5 + 4 / 64}
    assert Int8(group=32).bytes_per_value() == 1 + 2 / 32


# ---- (b) schemes are sugar for specs, with the codec params tolcli always wrote ----------------------------------
DENSE_F16 = {"codec": "dense", "params": {"dtype": "F16"}}
# (scheme, options, the spec it stands for, a rank to build a layer at, that layer's manifest params at h = 128).
SCHEME_CASES: list[tuple[str, dict[str, Any], str, int | None, dict[str, Any]]] = [
    ("fp32", {}, "dense", None, {"dtype": "F32"}),
    ("fp16", {}, "dense(dtype=fp16)", None, {"dtype": "F16"}),
    ("bf16", {}, "dense(dtype=bf16)", None, {"dtype": "BF16"}),
    ("int4", {}, "int4", None, {"bits": 4, "group_size": 64, "symmetric": False, "fit": "mse"}),
    (
        "int4",
        {"group_size": 32, "symmetric": True},
        "int4(group=32,symmetric=true)",
        None,
        {"bits": 4, "group_size": 32, "symmetric": True, "fit": "mse"},
    ),
    ("nf4", {}, "nf4", None, {"bits": 4, "group_size": 64, "fit": "mse"}),
    ("nf4", {"group_size": 128}, "nf4(group=128)", None, {"bits": 4, "group_size": 128, "fit": "mse"}),
    ("int8", {}, "int8", None, {"bits": 8, "group_size": 128, "fit": "mse"}),
    ("int8", {"group_size": 32}, "int8(group=32)", None, {"bits": 8, "group_size": 32, "fit": "mse"}),
    (
        "svd",
        {"rank": 32},
        "svd(rank=32)",
        32,
        {"rank": 32, "a": DENSE_F16, "b_dtype": "F16", "method": "exact", "weighted": False},
    ),
    (
        "svd",
        {"ratio": 0.25, "factor_dtype": "bf16"},
        "svd(ratio=0.25,a=dense(dtype=bf16))",
        48,
        {"rank": 48, "a": {"codec": "dense", "params": {"dtype": "BF16"}}, "b_dtype": "F16", "method": "exact",
         "weighted": False},
    ),
    (
        "svd",
        {"rank": 24, "svd_method": "randomized", "seed": 3},
        "svd(rank=24,method=randomized,seed=3)",
        24,
        {"rank": 24, "a": DENSE_F16, "b_dtype": "F16", "method": "randomized", "weighted": False, "oversample": 10,
         "power_iters": 2, "seed": 3},
    ),
    (
        "svd+int4",
        {"rank": 64},
        "svd(rank=64,a=int4(group=32))",
        64,
        {"rank": 64, "a": {"codec": "int4", "params": {"bits": 4, "group_size": 32, "symmetric": False, "fit": "mse"}},
         "b_dtype": "F16", "method": "exact", "weighted": False, "normalize": True},
    ),
    (
        "svd+nf4",
        {"rank": 32, "group_size": 64},
        "svd(rank=32,a=nf4)",
        32,
        {"rank": 32, "a": {"codec": "nf4", "params": {"bits": 4, "group_size": 64, "fit": "mse"}}, "b_dtype": "F16",
         "method": "exact", "weighted": False, "normalize": True},
    ),
    (
        "svd+int8",
        {"rank": 16},
        "svd(rank=16,a=int8)",
        16,
        {"rank": 16, "a": {"codec": "int8", "params": {"bits": 8, "group_size": 16, "fit": "mse"}}, "b_dtype": "F16",
         "method": "exact", "weighted": False, "normalize": True},
    ),
    (
        "adaptive-svd",
        {"budget": "0.2", "min_rank": 16, "max_rank": 96},
        "svd(budget=0.2,min_rank=16,max_rank=96)",
        40,
        {"rank": 40, "a": DENSE_F16, "b_dtype": "F16", "method": "exact", "weighted": False},
    ),
    (
        "adaptive-svd+int4",
        {"budget": "12MB", "symmetric": True},
        "svd(budget=12MB,a=int4(group=32,symmetric=true))",
        96,
        {"rank": 96, "a": {"codec": "int4", "params": {"bits": 4, "group_size": 32, "symmetric": True, "fit": "mse"}},
         "b_dtype": "F16", "method": "exact", "weighted": False, "normalize": True},
    ),
    (
        "adaptive-svd+nf4",
        {"energy": 0.9, "rank_multiple": 16},
        "svd(energy=0.9,rank_multiple=16,a=nf4(group=32))",
        32,
        {"rank": 32, "a": {"codec": "nf4", "params": {"bits": 4, "group_size": 32, "fit": "mse"}}, "b_dtype": "F16",
         "method": "exact", "weighted": False, "normalize": True},
    ),
    (
        "adaptive-svd+int8",
        {"budget": "400kB"},
        "svd(budget=400kB,a=int8)",
        8,
        {"rank": 8, "a": {"codec": "int8", "params": {"bits": 8, "group_size": 8, "fit": "mse"}}, "b_dtype": "F16",
         "method": "exact", "weighted": False, "normalize": True},
    ),
]  # fmt: skip


SCHEME_CASES += [
    ("int3", {}, "int3", None, {"bits": 3, "group_size": 64, "fit": "mse"}),
    ("int2", {"group_size": 32, "fit": "minmax"}, "int2(group=32,fit=minmax)", None, {"bits": 2, "group_size": 32}),
    (
        "svd+int3",
        {"rank": 32},
        "svd(rank=32,a=int3(group=32))",
        32,
        {"rank": 32, "a": {"codec": "int3", "params": {"bits": 3, "group_size": 32, "fit": "mse"}}, "b_dtype": "F16",
         "method": "exact", "weighted": False, "normalize": True},
    ),
    (
        "adaptive-svd+int2",
        {"budget": "0.2", "fit": "minmax"},
        "svd(budget=0.2,a=int2(group=32,fit=minmax))",
        64,
        {"rank": 64, "a": {"codec": "int2", "params": {"bits": 2, "group_size": 32}}, "b_dtype": "F16",
         "method": "exact", "weighted": False, "normalize": True},
    ),
    (
        "svd+int2",
        {"rank": 32, "fit": "minmax"},
        "svd(rank=32,a=int2(group=32,fit=minmax))",
        32,
        {"rank": 32, "a": {"codec": "int2", "params": {"bits": 2, "group_size": 32}}, "b_dtype": "F16",
         "method": "exact", "weighted": False, "normalize": True},
    ),
    (
        "adaptive-svd+int3",
        {"energy": 0.9},
        "svd(energy=0.9,a=int3(group=32))",
        32,
        {"rank": 32, "a": {"codec": "int3", "params": {"bits": 3, "group_size": 32, "fit": "mse"}}, "b_dtype": "F16",
         "method": "exact", "weighted": False, "normalize": True},
    ),
]  # fmt: skip


def test_every_scheme_is_covered() -> None:
    assert {case[0] for case in SCHEME_CASES} == set(SCHEMES)


@pytest.mark.parametrize(("scheme", "options", "spec", "rank", "params"), SCHEME_CASES)
def test_scheme_maps_to_the_spec_and_the_params_it_always_wrote(
    scheme: str, options: dict[str, Any], spec: str, rank: int | None, params: dict[str, Any]
) -> None:
    got = CompressOptions(scheme, **options).codec_spec()
    assert got == parse_spec(spec) and str(got) == spec
    layer_spec = got if rank is None else got.with_rank(rank)  # type: ignore[attr-defined]
    assert layer_spec.build(128).params() == params


def test_scheme_and_spec_write_the_same_layers(tmp_path: Path, make_ckpt) -> None:
    dense = precompute(make_ckpt(hidden_size=64), tmp_path / "d.safetensors", dtype="fp32").path
    a = compress(dense, tmp_path / "a.safetensors", CompressOptions("adaptive-svd+int4", budget="0.5"))
    b = compress(dense, tmp_path / "b.safetensors", CompressOptions(codec="svd(budget=0.5,a=int4(group=32))"))
    assert a.ranks == b.ranks and a.manifest["layers"] == b.manifest["layers"]
    assert {n: t["sha256"] for n, t in a.manifest["tensors"].items()} == {
        n: t["sha256"] for n, t in b.manifest["tensors"].items()
    }
    assert a.manifest["history"][-1]["scheme"] == "adaptive-svd+int4"
    assert b.manifest["history"][-1] == {
        "command": "compress",
        "codec": "svd(budget=0.5,a=int4(group=32))",
        "weight_floor": 1.0,
        "ranks": list(b.ranks.values()),
    }


@pytest.mark.parametrize(
    ("options", "msg"),
    [
        (CompressOptions(), "give a scheme or a codec spec"),
        (CompressOptions("int4", codec="int4"), "give scheme or codec, not both"),
        (CompressOptions(codec="svd(rank=8)", rank=8, symmetric=True), "rank, symmetric: only with scheme"),
        (CompressOptions(codec="svd(rank=8"), "expected ',' or"),
    ],
)
def test_scheme_or_codec(options: CompressOptions, msg: str) -> None:
    with pytest.raises(UsageError, match=msg):
        options.codec_spec()


def test_cli_codec_option_and_errors_naming_flags(tmp_path: Path, make_ckpt, cli) -> None:
    dense = precompute(make_ckpt(), tmp_path / "d.safetensors", dtype="fp32").path
    r = cli("compress", dense, "-o", tmp_path / "c.safetensors", "--codec", "int4(group=32,symmetric=true)", "--json")
    assert r.code == 0, r.err
    layer = json.loads(r.out)["manifest"]["layers"][0]
    assert layer["codec"] == "int4" and layer["params"] == {
        "bits": 4,
        "group_size": 32,
        "symmetric": True,
        "fit": "mse",
    }
    r = cli("compress", dense, "-o", tmp_path / "x.safetensors", "--codec", "svd(rank=8)", "--rank", "8")
    assert r.code == 2 and r.err.startswith("tolcli: error: --rank: only with --scheme; a --codec spec carries")
    r = cli("compress", dense, "-o", tmp_path / "x.safetensors", "--scheme", "nf4", "--symmetric")
    assert r.code == 2 and "--symmetric applies to int4 only" in r.err
    r = cli("compress", dense, "-o", tmp_path / "x.safetensors", "--codec", "int4(group=7)")
    assert r.code == 2 and "codec spec 'int4(group=7)': int4 group size must be one of" in r.err
    assert not (tmp_path / "x.safetensors").exists()


# ---- (c) a new codec is one class pair, defined here and nowhere else ------------------------------------------
@pytest.fixture
def sign_codec() -> Iterator[tuple[type[Codec], type[CodecSpec]]]:
    """A toy 1-bit codec: each value's sign, times an fp16 per-row scale (``gain`` x the mean |value|)."""

    class SignCodec(Codec):
        name = "sign"
        row_wise = True

        def __init__(self, gain: float = 1.0):
            self.gain = gain

        def params(self) -> dict[str, Any]:
            return {"gain": self.gain}

        @classmethod
        def from_params(cls, params: dict[str, Any]) -> SignCodec:
            return cls(float(params["gain"]))

        def tensor_specs(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], str]]:
            return {"signs": ((rows, width), "U8"), "scale": ((rows, 1), "F16")}

        def encode(self, table: Tensor) -> dict[str, Tensor]:
            scale = (table.abs().mean(1, keepdim=True) * self.gain).to(torch.float16)
            return {"signs": (table >= 0).to(torch.uint8), "scale": scale}

        def decode_rows(self, access: TensorAccess, ids: Tensor) -> Tensor:
            return (access.rows("signs", ids).float() * 2 - 1) * access.rows("scale", ids).float()

    @dataclass(frozen=True)
    class Sign(CodecSpec):
        codec: ClassVar[type[Codec]] = SignCodec
        gain: float = 1.0

        def build(self, width: int, *, weights: Tensor | None = None) -> SignCodec:
            return SignCodec(self.gain)

    try:
        yield SignCodec, Sign
    finally:
        del Codec.registry["sign"]


def test_a_new_codec_is_one_class_pair(
    sign_codec: tuple[type[Codec], type[CodecSpec]], tmp_path: Path, make_ckpt: Callable[..., Path]
) -> None:
    SignCodec, Sign = sign_codec
    assert "sign" in spec_names() and parse_spec("sign(gain=0.5)") == Sign(gain=0.5)  # type: ignore[call-arg]
    dense = precompute(make_ckpt(), tmp_path / "d.safetensors", dtype="fp32").path
    ids = torch.tensor([0, 5, 100, 5])

    res = compress(dense, tmp_path / "s.h5", CompressOptions(codec="sign(gain=0.5)"))
    assert res.manifest["layers"][0]["codec"] == "sign" and res.manifest["layers"][0]["params"] == {"gain": 0.5}
    assert res.manifest["layers"][0]["bits_per_value"] == 8 + 16 / 32
    with open_bundle(dense) as d, open_bundle(res.path, verify=True) as b:
        for i in b.layers:
            codec = SignCodec(0.5)  # type: ignore[call-arg]
            expected = codec.decode_rows(DictAccess(codec.encode(d.dense_layer(i))), ids)
            assert torch.equal(b.lookup(i, ids), expected)

    # ... and it composes: the A factor of an SVD, ranks chosen by compress
    res = compress(dense, tmp_path / "svd.safetensors", CompressOptions(codec="svd(budget=0.5,a=sign)"))
    a = res.manifest["layers"][0]["params"]["a"]
    assert a == {"codec": "sign", "params": {"gain": 1.0}}
    with open_bundle(dense) as d, open_bundle(res.path, verify=True) as b:
        for i in b.layers:
            codec = SVDCodec(res.ranks[i], SignCodec(), normalize=True)  # a quantised A: columns scaled
            expected = codec.decode_rows(DictAccess(codec.encode(d.dense_layer(i))), ids)
            assert torch.allclose(b.lookup(i, ids), expected, atol=1e-6)


def test_the_toy_codec_is_gone_after_its_test() -> None:
    assert "sign" not in Codec.registry and "sign" not in spec_names()


def test_sweep_takes_codec_specs_too() -> None:
    from tolcli.sweep import SweepOptions, _grid

    grid = _grid(SweepOptions(families=("int8",), codecs=("int4( group=32 )",)), 64)
    assert grid == [
        ("int8", "int8", CompressOptions("int8")),
        ("int4(group=32)", "int4", CompressOptions(codec=Int4(32))),
    ]
    with pytest.raises(UsageError, match="unknown codec 'vq'"):
        _grid(SweepOptions(families=(), codecs=("vq(bits=2)",)), 64)


def test_a_huge_integer_in_a_spec_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="an integer"):
        parse_spec("svd(rank=" + "9" * 5000 + ")")


def test_cli_fit_option(tmp_path: Path, make_ckpt, cli) -> None:
    dense = precompute(make_ckpt(), tmp_path / "d.safetensors", dtype="fp32").path
    r = cli("compress", dense, "-o", tmp_path / "c.h5", "-s", "int3", "--fit", "minmax", "--group-size", "32", "--json")
    assert r.code == 0, r.err
    layer = json.loads(r.out)["manifest"]["layers"][0]
    assert layer["codec"] == "int3" and layer["params"] == {"bits": 3, "group_size": 32}
    r = cli("compress", dense, "-o", tmp_path / "x.safetensors", "-s", "int4", "--fit", "lsq")
    assert r.code == 2 and "--fit must be one of mse, minmax, got 'lsq'" in r.err
    r = cli("compress", dense, "-o", tmp_path / "x.safetensors", "--codec", "int2", "--fit", "mse")
    assert r.code == 2 and "--fit" in r.err and "only with --scheme" in r.err
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_center_option(tmp_path: Path, make_ckpt, cli) -> None:
    dense = precompute(make_ckpt(), tmp_path / "d.safetensors", dtype="fp32").path
    r = cli("compress", dense, "-o", tmp_path / "c.h5", "-s", "nf4", "--center", "--group-size", "32", "--json")
    assert r.code == 0, r.err
    layer = json.loads(r.out)["manifest"]["layers"][0]
    assert layer["params"] == {"bits": 4, "group_size": 32, "fit": "mse", "center": True}
    assert set(layer["tensors"]) == {"codes", "scales", "mean"}
    assert parse_spec("int4(center=true)") == Int4(center=True) and str(Int4(center=True)) == "int4(center=true)"
    for scheme in (["svd+int4", "--rank", "8"], ["fp16"]):
        r = cli("compress", dense, "-o", tmp_path / "x.safetensors", "-s", *scheme, "--center")
        assert r.code == 2 and "--center applies to int4, nf4, int8, int3 and int2" in r.err, r.err
    with pytest.raises(UsageError, match=r"row-wise codec .*, not int4 with center=true"):  # one mean row for all
        parse_spec("svd(rank=64,a=int4(group=32,center=true))").build(128)
    assert not (tmp_path / "x.safetensors").exists()
