"""Source fingerprints tie bundles to the checkpoint they were computed from (issue 14, item 6).

The expected fingerprints are recomputed here from the serialisation documented in docs/bundle-format.md ("Source
fingerprint"), reading the tensors' bytes straight out of the safetensors file (header parsed by hand), never through
tolcli's checkpoint reader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tolcli import CompressOptions, compress, convert_bundle, drop_layers, open_bundle, open_checkpoint, precompute
from tolcli.bundle.manifest import canonical_json, parse_manifest
from tolcli.bundle.writer import write_bundle
from tolcli.config import ModelConfig
from tolcli.errors import CheckpointError, ExitCode, InputError
from tolcli.pairing import check_pairing, source_fingerprint
from tolcli.strip import strip_checkpoint
from tolcli.testing import random_state_dict, tiny_config, write_checkpoint, write_word_tokenizer

REPO = Path(__file__).resolve().parents[1]
TENSOR_MAP = REPO / "docs" / "examples" / "tensor-map.json"


# ---- the independent reference --------------------------------------------------------------------------------
def _f64(x: float) -> str:
    return f"f64:{int(np.array(x, dtype=np.float64).view(np.uint64)):016x}"


def reference_serialisation(directory: Path) -> bytes:
    """docs/bundle-format.md's serialisation, from ``config.json`` and the raw bytes of ``model.safetensors``."""
    cfg = json.loads((directory / "config.json").read_text())
    raw = (directory / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    out = [b"tolcli.source-fingerprint.v1\n"]
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
        out.append(f"{key}={cfg[key]}\n".encode())
    out.append(f"memory_norm_type={cfg['memory_norm_type']}\n".encode())
    out.append(f"memory_norm_eps={_f64(cfg['memory_norm_eps'])}\nffn_alpha={_f64(cfg['ffn_alpha'])}\n".encode())
    names = ["model.embed_tokens.weight"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [p + "memory_layernorm.weight", p + "memory_layernorm.bias"]
        names += [p + f"mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
    for name in names:
        if name not in header:
            continue  # the optional LayerNorm bias
        t = header[name]
        begin, end = t["data_offsets"]
        out.append(f"tensor {name} {t['dtype']} {','.join(map(str, t['shape']))} {end - begin}\n".encode())
        out.append(data[begin:end])
    return b"".join(out)


def reference_fingerprint(directory: Path) -> str:
    return "sha256:" + hashlib.sha256(reference_serialisation(directory)).hexdigest()


# ---- fixtures ---------------------------------------------------------------------------------------------------
WORDS = [f"w{i}" for i in range(100)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    """A word-level tokenizer of the tiny vocabulary (101 ids), so calibration text can be read."""
    return write_word_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer: Path) -> dict[str, Path]:
    """The user's case: checkpoints A and B (same shapes, same tokenizer, other weights) and a bundle from A."""
    d = tmp_path_factory.mktemp("pair")
    cfg = tiny_config("memoryllm")
    a = write_checkpoint(d / "A", cfg, random_state_dict(cfg, seed=1), tokenizer=tokenizer)
    b = write_checkpoint(d / "B", cfg, random_state_dict(cfg, seed=2), tokenizer=tokenizer)
    bundle = precompute(a, d / "tol-A.safetensors", dtype="fp32").path
    calib = d / "calib.txt"
    calib.write_text(" ".join(random.Random(0).choices(WORDS, k=400)))
    return {"A": a, "B": b, "bundle": bundle, "calib": calib, "dir": d}


def foreign_copy(src: Path, dst: Path) -> Path:
    """``src`` with its tensors renamed as docs/examples/tensor-map.json expects (a foreign naming scheme)."""
    ckpt = open_checkpoint(src)
    renames = (
        ("model.layers.", "blocks."),
        ("model.embed_tokens.", "tok_embeddings."),
        ("self_attn.", "attn."),
        ("memory_layernorm.", "mem_norm."),
        ("model.norm.", "final_norm."),
        ("lm_head.", "output."),
    )
    state = {}
    for name in ckpt.tensors:
        foreign = name
        for a, b in renames:
            foreign = foreign.replace(a, b)
        state[foreign] = ckpt.load(name, dtype=None)
    return write_checkpoint(dst, ckpt.config, state, tokenizer=ckpt.tokenizer_path)


RMS_OVERRIDES = {"memory_norm_type": "rmsnorm", "memory_norm_eps": 1e-6, "ffn_alpha": 0.5}


# ---- the fingerprint --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_type", "dtype", "bias", "overrides"),
    [
        ("memoryllm", torch.float32, True, {}),
        (
            "memoryllm",
            torch.bfloat16,
            False,
            RMS_OVERRIDES,
        ),
        ("flex_memoryllm", torch.float16, True, {"ffn_alpha": 2}),
    ],
)
def test_fingerprint_is_the_documented_serialisation(
    tmp_path: Path, model_type: str, dtype: torch.dtype, bias: bool, overrides: dict[str, Any]
) -> None:
    cfg = tiny_config(model_type, **overrides)
    d = write_checkpoint(tmp_path / "c", cfg, random_state_dict(cfg, seed=3, dtype=dtype, memory_norm_bias=bias))
    expected = reference_fingerprint(d)
    assert source_fingerprint(open_checkpoint(d)) == expected
    assert precompute(d, tmp_path / "t.h5", dtype="fp32").manifest["source"]["fingerprint"] == expected


def test_fingerprint_of_the_demo_starts_as_documented() -> None:
    """The lines docs/bundle-format.md shows for the demo model, and the embedding's 1,048,576 bytes after them."""
    from tolcli import demo_checkpoint_path

    d = demo_checkpoint_path()
    doc = (REPO / "docs" / "bundle-format.md").read_text()
    shown = doc.split("hashed for the demo model are:\n\n```\n", 1)[1].split("```", 1)[0]
    assert shown.endswith("tensor model.embed_tokens.weight F16 4096,128 1048576\n")
    serialised = reference_serialisation(d)
    assert serialised.startswith(shown.encode())
    after = serialised[len(shown) + 1_048_576 :]
    assert after.startswith(b"tensor model.layers.0.memory_layernorm.weight F16 128 256\n")
    assert source_fingerprint(open_checkpoint(d)) == reference_fingerprint(d)


def test_fingerprint_ignores_files_sharding_order_container_and_names(tmp_path: Path) -> None:
    cfg = tiny_config("memoryllm")
    state = random_state_dict(cfg, seed=4)
    base = write_checkpoint(tmp_path / "base", cfg, state)
    want = reference_fingerprint(base)
    reversed_state = dict(reversed(list(state.items())))
    variants = {
        "sharded safetensors": write_checkpoint(tmp_path / "sh", cfg, state, layout="sharded", shards=3),
        "torch .bin": write_checkpoint(tmp_path / "bin", cfg, reversed_state, layout="bin"),
        "sharded .bin": write_checkpoint(tmp_path / "shbin", cfg, reversed_state, layout="sharded-bin", shards=2),
    }
    renamed = shutil.copytree(base, tmp_path / "renamed")
    (renamed / "model.safetensors").rename(renamed / "weights-v2.safetensors")
    variants["renamed file"] = renamed
    got = {k: source_fingerprint(open_checkpoint(v)) for k, v in variants.items()}
    got["foreign names"] = source_fingerprint(
        open_checkpoint(foreign_copy(base, tmp_path / "foreign"), tensor_map=TENSOR_MAP)
    )
    assert got == dict.fromkeys(got, want)


def _variant(tmp_path: Path, name: str, cfg: ModelConfig, state: dict[str, torch.Tensor], tensor: str) -> str:
    """The fingerprint of ``state`` with one element of ``tensor`` moved by one ulp (towards +inf)."""
    changed = {k: v.clone() for k, v in state.items()}
    flat = changed[tensor].view(-1)
    flat[7] = torch.nextafter(flat[7], torch.tensor(float("inf")))
    assert changed[tensor].view(-1)[7] != state[tensor].view(-1)[7]
    return source_fingerprint(open_checkpoint(write_checkpoint(tmp_path / name, cfg, changed)))  # type: ignore[return-value]


def test_fingerprint_follows_exactly_what_the_tols_read(tmp_path: Path) -> None:
    cfg = tiny_config("flex_memoryllm")
    state = random_state_dict(cfg, seed=5)
    base = source_fingerprint(open_checkpoint(write_checkpoint(tmp_path / "base", cfg, state)))
    read = [
        "model.embed_tokens.weight",
        "model.layers.2.mlp.down_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.memory_layernorm.weight",
        "model.layers.1.memory_layernorm.bias",
    ]
    unread = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.2.context_mlp.up_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    changed = {t: _variant(tmp_path, f"r{k}", cfg, state, t) for k, t in enumerate(read)}
    assert base not in changed.values() and len(set(changed.values())) == len(read)
    assert {t: _variant(tmp_path, f"u{k}", cfg, state, t) for k, t in enumerate(unread)} == dict.fromkeys(unread, base)
    eps = dataclasses.replace(cfg, memory_norm_eps=float(np.nextafter(1e-5, 1.0)))  # one ulp
    assert source_fingerprint(open_checkpoint(write_checkpoint(tmp_path / "eps", eps, state))) != base
    ctx = dataclasses.replace(cfg, rope_theta=500000.0, rms_norm_eps=1e-3)  # context-aware path only
    assert source_fingerprint(open_checkpoint(write_checkpoint(tmp_path / "ctx", ctx, state))) == base


def test_fingerprint_is_computed_once_per_checkpoint_and_none_without_memory(make_ckpt) -> None:
    ckpt = open_checkpoint(make_ckpt())
    first = source_fingerprint(ckpt)
    reads = len(ckpt.loaded)
    assert reads == 1 + 3 * 5 and source_fingerprint(ckpt) == first and len(ckpt.loaded) == reads
    assert source_fingerprint(open_checkpoint(make_ckpt("llama"))) is None


# ---- recording it -----------------------------------------------------------------------------------------------
def test_compress_drop_and_convert_keep_the_source(pair: dict[str, Path]) -> None:
    d, want = pair["dir"], reference_fingerprint(pair["A"])
    with open_bundle(pair["bundle"]) as b:
        assert b.manifest["source"]["fingerprint"] == want
    outs = [
        compress(pair["bundle"], d / "int4.safetensors", CompressOptions("int4", group_size=32)).path,
        drop_layers(pair["bundle"], d / "drop.safetensors", drop_last=1)[0],
        convert_bundle(pair["bundle"], d / "conv.h5"),
    ]
    for out in outs:
        with open_bundle(out) as b:
            assert b.manifest["source"]["fingerprint"] == want, out


def test_manifest_and_config_refuse_a_malformed_fingerprint(pair: dict[str, Path], tmp_path: Path) -> None:
    with open_bundle(pair["bundle"]) as b:
        manifest = dict(b.manifest)
    good = manifest["source"]["fingerprint"]
    parse_manifest(canonical_json(manifest), where="m")
    for bad in (good.upper(), good[7:], good + "\n", good[:-1], "sha1:" + good[7:47], 12):
        doc = {**manifest, "source": {**manifest["source"], "fingerprint": bad}}
        with pytest.raises(InputError, match="source/fingerprint"):
            parse_manifest(canonical_json(doc), where="m")
    cfg = json.loads((pair["A"] / "config.json").read_text())
    assert ModelConfig.from_dict({**cfg, "tolcli_source_fingerprint": good}).source_fingerprint == good
    for bad in (good.upper(), good + "\n", "", 7):
        with pytest.raises(CheckpointError, match="tolcli_source_fingerprint"):
            ModelConfig.from_dict({**cfg, "tolcli_source_fingerprint": bad})


# ---- checking it: strip ---------------------------------------------------------------------------------------
def test_strip_records_the_source_and_the_stripped_checkpoint_pairs(pair: dict[str, Path], cli) -> None:
    out = pair["dir"] / "stripped-A"
    r = cli("strip", pair["A"], "-o", out, "--tol", pair["bundle"], "--json")
    assert r.code == 0 and r.err == ""
    want = reference_fingerprint(pair["A"])
    assert json.loads(r.out)["source_fingerprint"] == want
    assert json.loads((out / "config.json").read_text())["tolcli_source_fingerprint"] == want
    stripped = open_checkpoint(out)
    assert stripped.config.stripped and source_fingerprint(stripped) == want
    notes: list[str] = []
    with open_bundle(pair["bundle"]) as b:
        check_pairing(stripped, b, allow_mismatch=False, note=notes.append)
        check_pairing(open_checkpoint(pair["A"]), b, allow_mismatch=False, note=notes.append)
        with pytest.raises(InputError, match="another checkpoint"):
            check_pairing(open_checkpoint(pair["B"]), b, allow_mismatch=False, note=notes.append)
    assert notes == []


def test_strip_tol_refuses_a_bundle_of_another_checkpoint(pair: dict[str, Path], cli) -> None:
    out = pair["dir"] / "stripped-B"
    r = cli("strip", pair["B"], "-o", out, "--tol", pair["bundle"])
    assert r.code == ExitCode.BAD_INPUT == 4 and not out.exists()
    short_a, short_b = reference_fingerprint(pair["A"])[:19], reference_fingerprint(pair["B"])[:19]
    assert r.err.count("\n") == 1 and str(pair["bundle"]) in r.err and short_a in r.err and short_b in r.err
    assert "(hint: pass --allow-source-mismatch if this is intended)" in r.err
    r = cli("strip", pair["B"], "-o", out, "--tol", pair["bundle"], "--allow-source-mismatch")
    assert r.code == 0 and r.err.startswith("tolcli: warning: ") and short_a in r.err and short_b in r.err
    assert open_checkpoint(out).config.source_fingerprint == reference_fingerprint(pair["B"])


def test_unknown_sources_warn_that_they_cannot_be_checked(pair: dict[str, Path], tmp_path: Path, cli) -> None:
    with open_bundle(pair["bundle"]) as b:
        manifest = {**b.manifest, "source": {k: v for k, v in b.manifest["source"].items() if k != "fingerprint"}}
        old = write_bundle(tmp_path / "old.safetensors", [b.entry(n) for n in b.tensor_names], manifest)
    r = cli("strip", pair["B"], "-o", tmp_path / "s", "--tol", old)
    assert r.code == 0 and "warning: cannot check" in r.err and "records no source fingerprint" in r.err
    unrecorded = shutil.copytree(tmp_path / "s", tmp_path / "s-old")
    cfg = json.loads((unrecorded / "config.json").read_text())
    del cfg["tolcli_source_fingerprint"]
    (unrecorded / "config.json").write_text(json.dumps(cfg))
    notes: list[str] = []
    with open_bundle(pair["bundle"]) as b:
        check_pairing(open_checkpoint(unrecorded), b, allow_mismatch=False, note=notes.append)
    assert len(notes) == 1 and notes[0].startswith("warning: cannot check") and "stripped checkpoint" in notes[0]


def test_strip_tol_refuses_a_bundle_of_other_shapes(pair: dict[str, Path], make_ckpt, cli) -> None:
    other = make_ckpt(hidden_size=48)
    r = cli("strip", other, "-o", pair["dir"] / "never", "--tol", pair["bundle"])
    assert r.code == 4 and "does not match" in r.err and not (pair["dir"] / "never").exists()


def test_strip_takes_a_tensor_map(pair: dict[str, Path], cli) -> None:
    foreign = foreign_copy(pair["A"], pair["dir"] / "A-foreign")
    out = pair["dir"] / "stripped-foreign"
    assert cli("strip", foreign, "-o", out, "--tol", pair["bundle"]).code == 4  # foreign names: unreadable
    r = cli("strip", foreign, "-o", out, "--tol", pair["bundle"], "--tensor-map", TENSOR_MAP)
    assert r.code == 0 and r.err == ""
    stripped = open_checkpoint(out)  # canonical names now
    assert stripped.config.source_fingerprint == reference_fingerprint(pair["A"])
    assert "model.layers.0.self_attn.q_proj.weight" in stripped.tensors


def test_strip_library_refuses_before_writing(pair: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="allow_source_mismatch"):
        strip_checkpoint(pair["B"], tmp_path / "s", tols=[pair["bundle"]])
    assert not (tmp_path / "s").exists()


# ---- checking it: compress --sensitivity ------------------------------------------------------------------------
def test_compress_sensitivity_must_be_the_source(pair: dict[str, Path], cli) -> None:
    d = pair["dir"]
    common = ["compress", pair["bundle"], "-s", "svd", "--rank", "8", "--calibration", pair["calib"]]
    assert cli(*common, "-o", d / "sA.safetensors", "--sensitivity", pair["A"], "--quiet").code == 0
    r = cli(*common, "-o", d / "sB.safetensors", "--sensitivity", pair["B"])
    assert r.code == 4 and "another checkpoint" in r.err and "--allow-source-mismatch" in r.err
    assert not (d / "sB.safetensors").exists()
    r = cli(*common, "-o", d / "sB.safetensors", "--sensitivity", pair["B"], "--allow-source-mismatch", "--json")
    assert r.code == 0 and r.err.startswith("tolcli: warning: ")
    hist = json.loads(r.out)["manifest"]["history"][-1]
    assert hist["allow_source_mismatch"] is True and hist["sensitivity"] == "B"
    with open_bundle(d / "sA.safetensors") as b:
        assert "allow_source_mismatch" not in b.manifest["history"][-1]


def test_compress_sensitivity_takes_a_tensor_map_or_an_open_checkpoint(pair: dict[str, Path], cli) -> None:
    d = pair["dir"]
    foreign = foreign_copy(pair["A"], d / "A-foreign-c")
    common = ["compress", pair["bundle"], "-s", "svd", "--rank", "8", "--calibration", pair["calib"], "--quiet"]
    assert cli(*common, "-o", d / "f1.safetensors", "--sensitivity", foreign).code == 4
    r = cli(*common, "-o", d / "f1.safetensors", "--sensitivity", foreign, "--tensor-map", TENSOR_MAP)
    assert r.code == 0 and r.err == ""
    r = cli("compress", pair["bundle"], "-o", d / "f2.safetensors", "-s", "int4", "--tensor-map", TENSOR_MAP)
    assert r.code == ExitCode.USAGE and "--tensor-map and --revision apply to the --sensitivity checkpoint" in r.err
    opts = CompressOptions("svd", rank=8, calibration=str(pair["calib"]), sensitivity=open_checkpoint(pair["A"]))
    res = compress(pair["bundle"], d / "f3.safetensors", opts)
    with open_bundle(d / "f1.safetensors") as b:  # the same model under other names: the same weights
        assert b.manifest["layers"] == res.manifest["layers"]
    assert res.manifest["history"][-1]["sensitivity"] == "A"
    with pytest.raises(InputError, match="another checkpoint"):
        opts.sensitivity = open_checkpoint(pair["B"])
        compress(pair["bundle"], d / "f4.safetensors", opts)


# ---- checking it: eval-ppl (tolcli/evaluation.py calls check_pairing) ------------------------------
def test_eval_ppl_refuses_a_bundle_of_another_checkpoint(pair: dict[str, Path], tmp_path: Path) -> None:
    from tolcli import eval_ppl

    ids = np.array(random.Random(1).choices(range(100), k=300), dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    data, tol = [tmp_path / "ids.npy"], [pair["bundle"]]
    r = eval_ppl(pair["A"], data, tols=tol, ctx=32)
    assert r.variants[1]["ppl"] == pytest.approx(r.variants[0]["ppl"], rel=1e-5)
    with pytest.raises(InputError, match="another checkpoint"):
        eval_ppl(pair["B"], data, tols=tol, ctx=32)
    notes: list[str] = []
    eval_ppl(pair["B"], data, tols=tol, ctx=32, allow_source_mismatch=True, note=notes.append)
    assert any(n.startswith("warning: ") and "another checkpoint" in n for n in notes)


def test_eval_ppl_and_sweep_take_a_tensor_map(pair: dict[str, Path], cli) -> None:
    # Expected: the foreign-named copy read through the map is the same model: the same perplexities as A itself.
    foreign = foreign_copy(pair["A"], pair["dir"] / "A-foreign-eval")
    common = ["--data", pair["calib"], "--tol", pair["bundle"], "--ctx", "32", "--json"]
    plain = cli("eval-ppl", pair["A"], *common)
    assert plain.code == 0, plain.err
    refused = cli("eval-ppl", foreign, *common)
    assert refused.code == 4 and "--tensor-map" in refused.err
    mapped = cli("eval-ppl", foreign, *common, "--tensor-map", TENSOR_MAP)
    assert mapped.code == 0, mapped.err
    want, got = json.loads(plain.out)["variants"], json.loads(mapped.out)["variants"]
    assert [v["ppl"] for v in got] == pytest.approx([v["ppl"] for v in want], rel=1e-12)
    out = pair["dir"] / "sweep-foreign"
    r = cli(
        "sweep",
        foreign,
        "--data",
        pair["calib"],
        "-o",
        out,
        "--schemes",
        "drop",
        "--ctx",
        "32",
        "--tensor-map",
        TENSOR_MAP,
    )
    assert r.code == 0, r.err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[0]["ppl"] == pytest.approx(want[0]["ppl"], rel=1e-12)
