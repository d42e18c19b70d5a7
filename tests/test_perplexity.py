"""eval-ppl, drop and strip: numbers against independent computations, gates, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tolcli import (
    CompressOptions,
    compress,
    demo_checkpoint_path,
    demo_heldout_path,
    drop_layers,
    eval_ppl,
    open_bundle,
    open_checkpoint,
    precompute,
    strip_checkpoint,
)
from tolcli.errors import ExitCode, InputError, QualityGateError, UsageError
from tolcli.scoring import plan_windows


def test_llama_perplexity_matches_transformers(make_ckpt, hf_llama, tmp_path: Path) -> None:
    d = make_ckpt(
        "llama",
        vocab_size=89,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=True,
    )
    ids = torch.randint(0, 89, (300,), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "ids.npy", ids.numpy().astype(np.int32))
    ctx, stride = 64, 24
    report = eval_ppl(d, [tmp_path / "ids.npy"], ctx=ctx, stride=stride, batch_size=3)
    ckpt = open_checkpoint(d)
    hf, _, _ = hf_llama(ckpt)
    length, windows = plan_windows(300, ctx, stride)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            x = ids[w.start : w.start + length + 1]
            logp = F.log_softmax(hf(input_ids=x[None, :-1]).logits[0].double(), -1)
            for j in range(w.first_scored, length):
                nll -= float(logp[j, x[j + 1]])
                n += 1
    assert n == 299 == report.variants[0]["tokens"]
    assert report.variants[0]["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)


@pytest.fixture(scope="module")
def demo_dense(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ev") / "dense.safetensors"
    precompute(demo_checkpoint_path(), out, dtype="fp32")
    return out


def test_dense_bundle_reproduces_the_baseline_and_int4_costs_under_1pct(demo_dense: Path, tmp_path: Path) -> None:
    int4 = compress(demo_dense, tmp_path / "int4.h5", CompressOptions("int4", group_size=64)).path
    r = eval_ppl(demo_checkpoint_path(), [demo_heldout_path()], tols=[demo_dense, int4], ctx=128, stride=64)
    base, dense, q = r.variants
    assert dense["ppl"] == pytest.approx(base["ppl"], rel=1e-5) and dense["mean_kl"] < 1e-8
    assert dense["top1_agreement"] == 1.0
    assert 0 < q["ppl_change_pct"] < 1.0 and q["mean_kl"] > 0  # the paper: 4-bit ToLs cost almost nothing
    assert r.protocol["tokens_scored"] == 18618 and r.protocol["tokenizer_sha256"] is not None
    assert len(r.protocol["data"][0]["sha256"]) == 64


def test_quality_gate_exit_codes(demo_dense: Path, tmp_path: Path, cli) -> None:
    svd = compress(demo_dense, tmp_path / "svd.safetensors", CompressOptions("svd", rank=16)).path
    args = [
        "eval-ppl",
        "demo",
        "--data",
        demo_heldout_path(),
        "--ctx",
        "128",
        "--max-tokens",
        "3000",
        "--tol",
        demo_dense,
        "--tol",
        svd,
        "--json",
    ]
    r = cli(*args, "--max-increase", "5")
    assert r.code == ExitCode.QUALITY_GATE == 3
    doc = json.loads(r.out)  # the report is still printed
    assert doc["variants"][2]["ppl_change_pct"] > 5 and "quality gate failed" in r.err
    assert cli(*args, "--max-increase", "1000").code == 0
    # without --json the verdict is printed, passing or failing (issue 18), naming the failing variant
    human = args[:-1]
    r = cli(*human, "--max-increase", "1000")
    assert r.code == 0 and "gate: pass (no variant's perplexity change above +1000%)" in r.out
    r = cli(*human, "--max-increase", "5")
    assert r.code == 3 and "gate: FAIL (1 variant(s) above +5% or not finite:" in r.out
    assert svd.name in r.out[r.out.index("gate: FAIL") :]  # the verdict names the failing bundle
    with pytest.raises(QualityGateError):
        eval_ppl(demo_checkpoint_path(), [demo_heldout_path()], tols=[svd], ctx=128, max_tokens=3000, max_increase=5)


def test_tokenizer_mismatch_is_refused(demo_dense: Path, tmp_path: Path) -> None:
    other = tmp_path / "tok.json"
    tok = json.loads((demo_checkpoint_path() / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|other|>"
    other.write_text(json.dumps(tok))
    kw = {"tols": [demo_dense], "ctx": 64, "max_tokens": 500, "tokenizer": other}
    with pytest.raises(InputError, match="differs from the one the bundle was built with"):
        eval_ppl(demo_checkpoint_path(), [demo_heldout_path()], **kw)
    notes: list[str] = []
    eval_ppl(demo_checkpoint_path(), [demo_heldout_path()], allow_tokenizer_mismatch=True, note=notes.append, **kw)
    assert any("differs" in n for n in notes)


def test_data_formats_agree_and_bad_data_is_refused(tmp_path: Path) -> None:
    text = demo_heldout_path().read_text()[:6000]
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": text}) + "\n")
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(demo_checkpoint_path() / "tokenizer.json")).encode(text).ids
    np.save(tmp_path / "a.npy", np.array(ids, dtype=np.uint16))
    ppls = [
        eval_ppl(demo_checkpoint_path(), [tmp_path / f], ctx=64).variants[0]["ppl"]
        for f in ("a.txt", "a.jsonl", "a.npy")
    ]
    assert ppls[0] == ppls[1] == ppls[2]
    np.save(tmp_path / "bad.npy", np.array([1, 2, 99999]))
    with pytest.raises(InputError, match="outside the vocabulary"):
        eval_ppl(demo_checkpoint_path(), [tmp_path / "bad.npy"], ctx=64)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="empty file"):
        eval_ppl(demo_checkpoint_path(), [tmp_path / "empty.txt"], ctx=64)


def test_strip_then_evaluate_with_a_bundle(demo_dense: Path, tmp_path: Path, cli) -> None:
    res = strip_checkpoint(demo_checkpoint_path(), tmp_path / "stripped")
    assert res.removed == 6 * 5 and res.bytes_removed == 6 * (3 * 128 * 512 + 2 * 128) * 2
    ck = open_checkpoint(tmp_path / "stripped")
    assert ck.config.stripped and not any("mlp" in n or "memory_layernorm" in n for n in ck.tensors)
    full = eval_ppl(demo_checkpoint_path(), [demo_heldout_path()], tols=[demo_dense], ctx=128, max_tokens=4000)
    part = eval_ppl(tmp_path / "stripped", [demo_heldout_path()], tols=[demo_dense], ctx=128, max_tokens=4000)
    assert part.protocol["reference"] == str(demo_dense) and part.variants[0]["ppl"] == full.variants[1]["ppl"]
    with pytest.raises(UsageError, match="is stripped"):
        eval_ppl(tmp_path / "stripped", [demo_heldout_path()], ctx=128)
    doc = json.loads(cli("info", tmp_path / "stripped", "--json").out)
    assert doc["parameters"]["memory_ffn"] == 0 and doc["config"]["tolcli_stripped"] is True
    assert cli("strip", tmp_path / "stripped", "-o", tmp_path / "again").code == ExitCode.USAGE


def test_drop_keeps_indices_and_matches_the_drop_variant(demo_dense: Path, tmp_path: Path, cli) -> None:
    out, manifest = drop_layers(demo_dense, tmp_path / "d4.h5", drop_last=2)
    assert [e["status"] for e in manifest["layers"]] == ["present"] * 4 + ["dropped"] * 2
    assert manifest["history"][-1] == {"command": "drop", "kept": [0, 1, 2, 3]}
    with open_bundle(out, verify=True) as b, open_bundle(demo_dense) as d:
        assert sorted(b.layers) == [0, 1, 2, 3]
        assert all(b.manifest["tensors"][n] == d.manifest["tensors"][n] for n in b.manifest["tensors"])
    r = eval_ppl(demo_checkpoint_path(), [demo_heldout_path()], tols=[out], ctx=128, max_tokens=4000, drop_last=2)
    assert r.variants[1]["ppl"] == pytest.approx(r.variants[2]["ppl"], rel=1e-6)
    rr = cli("drop", demo_dense, "-o", tmp_path / "k.safetensors", "--keep-layers", "0,5", "--json")
    assert json.loads(rr.out)["layers_present"] == [0, 5]
    assert cli("drop", demo_dense, "-o", tmp_path / "x.safetensors").code == ExitCode.USAGE


def test_flex_and_llama(make_ckpt, tmp_path: Path) -> None:
    flex = make_ckpt("flex_memoryllm")
    precompute(flex, tmp_path / "f.safetensors", dtype="fp32")
    ids = torch.randint(0, 101, (200,), generator=torch.Generator().manual_seed(1)).numpy()
    np.save(tmp_path / "ids.npy", ids)
    r = eval_ppl(flex, [tmp_path / "ids.npy"], tols=[tmp_path / "f.safetensors"], ctx=32)
    assert r.variants[1]["ppl"] == pytest.approx(r.variants[0]["ppl"], rel=1e-5)
    llama = make_ckpt("llama")
    assert eval_ppl(llama, [tmp_path / "ids.npy"], ctx=32).variants[0]["tokens"] == 199
    with pytest.raises(UsageError, match="no context-free FFN"):
        eval_ppl(llama, [tmp_path / "ids.npy"], tols=[tmp_path / "f.safetensors"], ctx=32)
