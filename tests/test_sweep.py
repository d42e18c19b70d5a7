"""sweep: the grid is built, evaluated on one set of windows, and written as JSON, CSV and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require

from tolcli import SweepOptions, eval_ppl, sweep
from tolcli.errors import OutputError, UsageError


def test_sweep_on_a_small_model(make_ckpt, tmp_path: Path, cli) -> None:
    require("matplotlib")
    d = make_ckpt("memoryllm", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3)
    ids = torch.randint(0, 97, (400,), generator=torch.Generator().manual_seed(0)).numpy()
    np.save(tmp_path / "ids.npy", ids)
    opts = SweepOptions(families=("svd", "adaptive-svd", "int4", "drop"), ranks=(8, 16), group_sizes=(32, 64), ctx=64)
    res = sweep(d, [tmp_path / "ids.npy"], tmp_path / "sw", opts)
    names = [r["name"] for r in res.rows]
    assert names == [
        "baseline",
        "dense-fp32",
        "svd-r8",
        "adaptive-svd@r8",
        "svd-r16",
        "adaptive-svd@r16",
        "int4-g32",
        "int4-g64",
        "drop-last-1",
        "drop-last-2",
        "drop-last-3",
    ]
    rows = {r["name"]: r for r in res.rows}
    assert rows["dense-fp32"]["ppl"] == pytest.approx(rows["baseline"]["ppl"], rel=1e-5)
    assert rows["adaptive-svd@r8"]["stored_bytes"] <= rows["svd-r8"]["stored_bytes"]
    assert rows["svd-r8"]["ranks"] == [8, 8, 8] and rows["int4-g64"]["fraction_of_dense_fp16"] == pytest.approx(
        4.5 / 16
    )
    # the same numbers eval-ppl gives for one bundle on its own
    alone = eval_ppl(d, [tmp_path / "ids.npy"], tols=[tmp_path / "sw" / "bundles" / "int4-g64.safetensors"], ctx=64)
    assert alone.variants[1]["ppl"] == pytest.approx(rows["int4-g64"]["ppl"], rel=1e-9)
    doc = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert [r["name"] for r in doc["rows"]] == names and doc["protocol"]["ctx"] == 64
    with open(tmp_path / "sw" / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == names and table[2]["ranks"] == "8 8 8"
    for png in ("rate_distortion.png", "drop_layers.png"):
        assert (tmp_path / "sw" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OutputError, match="not empty"):
        sweep(d, [tmp_path / "ids.npy"], tmp_path / "sw", opts)
    with pytest.raises(UsageError, match="unknown sweep families"):
        sweep(d, [tmp_path / "ids.npy"], tmp_path / "sw2", SweepOptions(families=("zip",)))
    r = cli(
        "sweep",
        d,
        "--data",
        tmp_path / "ids.npy",
        "-o",
        tmp_path / "sw3",
        "--schemes",
        "int8,drop",
        "--ctx",
        "64",
        "--json",
    )
    doc = json.loads(r.out)
    assert r.code == 0 and [x["name"] for x in doc["rows"]][-1] == "drop-last-3"
    assert doc["output"] == doc["directory"] == str(tmp_path / "sw3") and doc["command"] == "sweep"
    assert doc["gate"] == {"max_increase_pct": None, "significant": False, "verdict": None, "failed": []}


def test_inspect_plot(tmp_path: Path, make_ckpt, cli) -> None:
    require("matplotlib")
    from tolcli import CompressOptions, compress, drop_layers, precompute

    d = precompute(make_ckpt(), tmp_path / "d.safetensors", dtype="fp32").path
    a = compress(d, tmp_path / "a.safetensors", CompressOptions("adaptive-svd", budget="0.5")).path
    dropped, _ = drop_layers(a, tmp_path / "x.safetensors", drop_last=1)
    r = cli("inspect", dropped, "--plot", tmp_path / "layers.png")
    assert r.code == 0 and (tmp_path / "layers.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_grid_has_the_sub_4_bit_families() -> None:
    from tolcli.sweep import FAMILIES, SweepOptions, _grid

    assert {"int3", "int2"} <= set(FAMILIES)
    grid = _grid(SweepOptions(families=("int3", "int2")), 64)
    assert [(name, fam, o.scheme, o.group_size) for name, fam, o in grid] == [
        ("int3-g64", "int3", "int3", 64),
        ("int2-g64", "int2", "int2", 64),
    ]


def test_one_grammar_for_sweep_items(tmp_path: Path) -> None:
    from tolcli.sweep import SweepItems, parse_sweep_items, split_items

    assert split_items("a, svd(rank=8,a=int4(group=32)) ,,b") == ["a", "svd(rank=8,a=int4(group=32))", "b"]
    (tmp_path / "mine.h5").write_bytes(b"")
    items = parse_sweep_items(f"fp16,svd+nf4,int4(group=32),{tmp_path / 'mine.h5'},drop")
    assert items == SweepItems(("fp16", "svd+nf4", "drop"), ("int4(group=32)",), (tmp_path / "mine.h5",))
    with pytest.raises(UsageError, match="sweep item 'int5' is not a family or scheme"):
        parse_sweep_items("int4,int5")


def test_sweep_grid_takes_every_compress_scheme() -> None:
    from tolcli.choices import SCHEMES
    from tolcli.sweep import SweepOptions, _grid

    opts = SweepOptions(families=("fp32", "fp16", "svd+nf4", "adaptive-svd+int8"), ranks=(8, 16), int4_budgets=(0.2,))
    grid = [(name, fam, o.scheme, o.rank, o.budget) for name, fam, o in _grid(opts, 64)]
    assert grid == [
        ("fp16", "fp16", "fp16", None, None),
        ("svd+nf4-r8", "svd+nf4", "svd+nf4", 8, None),
        ("svd+nf4-r16", "svd+nf4", "svd+nf4", 16, None),
        ("adaptive-svd+int8-0.2", "adaptive-svd+int8", "adaptive-svd+int8", None, "0.2"),
    ]
    for scheme in SCHEMES:  # none is refused
        _grid(SweepOptions(families=(scheme,), ranks=(8,)), 64)
    # the same bundle named twice (a family and the spec it spells) is built and evaluated once
    names = [name for name, _, _ in _grid(SweepOptions(families=("int8",), codecs=("int8()", "int4(group=64)")), 64)]
    assert names == ["int8", "int4"]


def test_sweep_evaluates_an_existing_bundle_as_it_is(make_ckpt, tmp_path: Path, cli) -> None:
    from tolcli import CompressOptions, compress, precompute

    d = make_ckpt("memoryllm", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(1)).numpy()
    np.save(tmp_path / "ids.npy", ids)
    dense = precompute(d, tmp_path / "dense.safetensors", dtype="fp32").path
    mine = compress(dense, tmp_path / "mine.h5", CompressOptions("int3", group_size=32)).path
    r = cli(
        "sweep", d, "--data", tmp_path / "ids.npy", "-o", tmp_path / "sw", "--ctx", "64", "--json",
        "--schemes", f"fp16,{mine}",
    )  # fmt: skip
    assert r.code == 0, r.err
    rows = {x["name"]: x for x in json.loads(r.out)["rows"]}
    assert list(rows) == ["baseline", "dense-fp32", "fp16", "mine.h5"] and rows["mine.h5"]["family"] == "bundle"
    alone = eval_ppl(d, [tmp_path / "ids.npy"], tols=[mine], ctx=64)
    assert rows["mine.h5"]["ppl"] == pytest.approx(alone.variants[1]["ppl"], rel=1e-9)
    assert rows["mine.h5"]["fraction_of_dense_fp16"] == pytest.approx((3 + 32 / 32) / 16)  # + fp16 scale, min
    assert not (tmp_path / "sw" / "bundles" / "mine.h5.safetensors").exists()  # evaluated in place, not copied
    r = cli("sweep", d, "--data", tmp_path / "ids.npy", "-o", tmp_path / "sw2", "--schemes", "int4,nosuch.h5")
    assert r.code == 2 and "sweep item 'nosuch.h5'" in r.err and not (tmp_path / "sw2").exists()
    other = make_ckpt("memoryllm", seed=1, vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    foreign = precompute(other, tmp_path / "foreign.safetensors", dtype="fp32").path  # same shapes, another model
    r = cli("sweep", d, "--data", tmp_path / "ids.npy", "-o", tmp_path / "sw3", "--schemes", f"int4,{foreign}")
    assert r.code == 4 and "another checkpoint" in r.err and "eval-ppl --allow-source-mismatch" in r.err
    assert not (tmp_path / "sw3").exists()


def test_sweep_grid_has_mixed_and_auto_at_each_bits() -> None:
    from tolcli.sweep import FAMILIES, SweepOptions, _grid

    assert {"mixed", "auto"} <= set(FAMILIES)
    grid = _grid(SweepOptions(families=("mixed", "auto"), bits=(2, 2.5)), 64)
    assert [(n, f, o.scheme, o.budget, None if o.codec is None else str(o.codec)) for n, f, o in grid] == [
        ("mixed-2b", "mixed", None, None, "mixed(bits=2.0)"),
        ("mixed-2.5b", "mixed", None, None, "mixed(bits=2.5)"),
        ("auto-2b", "auto", "auto", "0.125", None),  # 2 bits of 16: an eighth of the fp16 bytes
        ("auto-2.5b", "auto", "auto", "0.15625", None),
    ]
    grid = _grid(SweepOptions(families=("auto",), bits=(3,), calibration="c.txt"), 64)
    assert [(n, f) for n, f, _ in grid] == [("auto-3b-sensitivity", "auto (sensitivity)")]
    for bad in (0, -1, 17):
        with pytest.raises(UsageError, match="sweep bits"):
            _grid(SweepOptions(families=("mixed",), bits=(bad,)), 64)


def word_model(tmp_path: Path, words: int) -> Path:
    """A random 3-layer memoryllm (h = 64) with a word tokenizer, and ``words`` random words of calibration text
    (``calib.txt``) and of evaluation text (``eval.txt``) in ``tmp_path``."""
    import random

    from tolcli.testing import tiny_config, write_random_checkpoint, write_word_tokenizer

    cfg = tiny_config("memoryllm", hidden_size=64, num_hidden_layers=3)
    ckpt = write_random_checkpoint(tmp_path / "ckpt", cfg, tokenizer=write_word_tokenizer(tmp_path / "tok.json"))
    vocab = [f"w{i}" for i in range(100)]
    for seed, name in enumerate(("calib.txt", "eval.txt")):
        (tmp_path / name).write_text(" ".join(random.Random(seed).choices(vocab, k=words)), encoding="utf-8")
    return ckpt


def test_sweep_builds_mixed_and_auto_within_their_bits_weighted_by_sensitivity(tmp_path: Path, cli) -> None:
    from tolcli import open_bundle
    from tolcli.sweep_report import frontier

    ckpt = word_model(tmp_path, words=500)
    r = cli(
        "sweep", ckpt, "--data", tmp_path / "eval.txt", "-o", tmp_path / "sw", "--schemes", "mixed,auto",
        "--bits", "2,4", "--calibration", tmp_path / "calib.txt", "--ctx", "64", "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    rows = {row["name"]: row for row in json.loads(r.out)["rows"]}
    fp16 = 101 * 64 * 2 * 3  # every layer's dense fp16 table
    for bits in (2, 4):
        for fam in ("mixed", "auto"):
            row = rows[f"{fam}-{bits}b-sensitivity"]
            assert row["family"] == f"{fam} (sensitivity)" and row["mean_kl"] > 0
            with open_bundle(tmp_path / "sw" / "bundles" / f"{fam}-{bits}b-sensitivity.safetensors") as b:
                assert b.manifest["history"][-1]["token_weights"]["source"] == "sensitivity"
        assert rows[f"auto-{bits}b-sensitivity"]["stored_bytes"] <= fp16 * bits // 16
    assert rows["auto-4b-sensitivity"]["mean_kl"] < rows["auto-2b-sensitivity"]["mean_kl"]
    md = (tmp_path / "sw" / "results.md").read_text(encoding="utf-8")
    best = [row for row in frontier(list(rows.values()), (0.25,))]
    # the frontier at 4 bits is the bundle of least KL that fits, found here by brute force over the rows
    fits = [row for row in rows.values() if row["stored_bytes"] is not None and row["stored_bytes"] <= fp16 // 4]
    assert best[0]["name"] == min(fits, key=lambda row: row["mean_kl"])["name"]
    assert f"| 0.25 | 4.00 | `{best[0]['name']}` |" in md
    assert all(f"`{name}`" in md for name in rows if name not in ("baseline",))
    r = cli("sweep", ckpt, "--data", tmp_path / "eval.txt", "-o", tmp_path / "x", "--bits", "2,x")
    assert r.code == 2 and "--bits '2,x': expected comma-separated numbers" in r.err, r.err


def test_the_cross_svd_family_is_one_cross_layer_bundle_per_bits_entry() -> None:
    from tolcli.sweep import _grid

    grid = _grid(SweepOptions(families=("cross-svd",), bits=(1.6, 2.5), calibration="c.txt"), 64)
    assert [(name, family) for name, family, _ in grid] == [
        ("cross-svd-1.6b-sensitivity", "cross-svd (sensitivity)"),
        ("cross-svd-2.5b-sensitivity", "cross-svd (sensitivity)"),
    ]
    spec = grid[0][2].codec_spec()
    assert spec.cross_layer and spec.budget == "0.1" and str(spec.b) == "int8" and spec.a.bits == 4.4
    assert str(spec.residual) == "mixed(bits=0.5)"
    at_2_5 = grid[1][2].codec_spec()
    assert at_2_5.budget == "0.15625" and str(at_2_5.residual) == "mixed(bits=1.5)"


def test_sweep_error_feedback_adds_a_twin_of_each_rate_bundle(tmp_path: Path, cli) -> None:
    from tolcli import open_bundle
    from tolcli.sweep import _grid

    grid = _grid(SweepOptions(families=("mixed", "cross-svd"), bits=(2,), error_feedback=True), 64)
    assert [(n, f, o.error_feedback) for n, f, o in grid] == [
        ("mixed-2b", "mixed", False),
        ("cross-svd-2b", "cross-svd", False),
        ("mixed-2b-fb", "mixed + feedback", True),
        ("cross-svd-2b-fb", "cross-svd + feedback", True),
    ]
    ckpt = word_model(tmp_path, words=300)
    r = cli(
        "sweep", ckpt, "--data", tmp_path / "eval.txt", "-o", tmp_path / "sw", "--schemes", "mixed", "--bits", "3",
        "--calibration", tmp_path / "calib.txt", "--ctx", "64", "--error-feedback", "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    rows = {row["name"]: row for row in json.loads(r.out)["rows"]}
    assert rows["mixed-3b-sensitivity-fb"]["family"] == "mixed (sensitivity) + feedback"
    with open_bundle(tmp_path / "sw" / "bundles" / "mixed-3b-sensitivity-fb.safetensors") as b:
        hist = b.manifest["history"][-1]
        assert hist["error_feedback"] is True and hist["token_weights"]["feedback"] is True
    with open_bundle(tmp_path / "sw" / "bundles" / "mixed-3b-sensitivity.safetensors") as b:
        assert "error_feedback" not in b.manifest["history"][-1]
