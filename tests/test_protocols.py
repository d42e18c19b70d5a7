"""eval-ppl's scoring protocols, text metrics and error bars against independent references (issue 14).

Every expected value comes from ``tests/protocol_refs.py`` (each tool's algorithm transcribed from its own source:
Hugging Face's perplexity guide, lm-evaluation-harness, llama.cpp) run with ``transformers.LlamaForCausalLM`` on the
shipped llama demo, or, for the error bars, from per-token log-probabilities of tolcli's model forward combined
with formulas written here. Nothing is taken from ``tolcli.scoring``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pytest
import tokenizers
import torch
from conftest import require
from protocol_refs import (
    GuideResult,
    bits_per_byte,
    get_rolling_token_windows,
    hf_guide,
    hf_logits_fn,
    kl_rows,
    llama_cpp_perplexity,
    lm_eval_rolling,
    log_probs,
    make_disjoint_window,
    mean_and_uncertainty,
    median,
    percentile,
    same_top_uncertainty,
    weighted_perplexity,
    wikitext_counts,
)
from test_reference_numerics import brute_windows
from tokenizers import processors

from tolcli import demo_checkpoint_path, demo_heldout_path, eval_ppl, load_model, open_checkpoint
from tolcli.errors import InputError, UsageError
from tolcli.model import DropSource, FFNSource

REL = 1e-6
EOS = 0  # the demo tokenizer's only special token, <|endoftext|>; its config names no BOS
HELD = demo_heldout_path().read_text(encoding="utf-8")
TEXT = HELD[:6000]  # 1,750 tokens
DOCS = [HELD[:900], HELD[900:2600]]


@pytest.fixture(scope="module")
def llama() -> tuple[Path, Any, tokenizers.Tokenizer]:
    """The llama demo: its directory, the same weights in transformers (fp32), and its tokenizer."""
    transformers = require("transformers")
    d = demo_checkpoint_path("llama")
    model = transformers.LlamaForCausalLM.from_pretrained(d, local_files_only=True, dtype=torch.float32).eval()
    return d, model, tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))


@pytest.fixture(scope="module")
def bos_llama(llama, tmp_path_factory) -> tuple[Path, tokenizers.Tokenizer]:
    """The llama demo whose tokenizer adds a BOS (``<|endoftext|>``, id 0, as GPT-2's) and whose config names it."""
    src = llama[0]
    d = tmp_path_factory.mktemp("bos_llama")
    shutil.copyfile(src / "model.safetensors", d / "model.safetensors")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    write_text(d / "config.json", json.dumps({**config, "bos_token_id": EOS, "eos_token_id": EOS}))
    tok = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    bos = "<|endoftext|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, EOS)])
    tok.save(str(d / "tokenizer.json"))
    return d, tok


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, docs: list[str]) -> Path:
    return write_text(path, "".join(json.dumps({"text": doc}) + "\n" for doc in docs))


def write_ids(path: Path, ids: list[int]) -> Path:
    np.save(path, np.asarray(ids, dtype=np.int32))
    return path


def assert_text_metrics(v: dict[str, Any], nll_sum: float, words: int, nbytes: int) -> None:
    """lm-eval's wikitext metrics from a total NLL and the documents' word and byte counts."""
    assert v["word_perplexity"] == pytest.approx(math.exp(nll_sum / words), rel=REL)
    assert v["byte_perplexity"] == pytest.approx(math.exp(nll_sum / nbytes), rel=REL)
    assert v["bits_per_byte"] == pytest.approx(nll_sum / (nbytes * math.log(2)), rel=REL)


def assert_no_text_metrics(v: dict[str, Any]) -> None:
    assert v["word_perplexity"] is None and v["byte_perplexity"] is None and v["bits_per_byte"] is None


# ==== 1. hf-sliding: the Hugging Face guide's loop ================================================================
# ``tokens`` is what the guide's losses average over (its valid labels after the shift, ``GuideResult.n_targets``);
# ``nll_sum`` and ``mean_nll`` are the guide's own, which weights each window by ``num_valid - 1``.
def assert_guide(v: dict[str, Any], want: GuideResult) -> None:
    assert v["tokens"] == want.n_targets
    assert v["nll_sum"] == pytest.approx(want.nll_sum, rel=REL)
    assert v["mean_nll"] == pytest.approx(want.avg_nll, rel=REL)
    assert v["ppl"] == pytest.approx(want.ppl, rel=REL)
    assert_no_text_metrics(v)  # the guide does not score the first token of later windows: no whole-text NLL


@pytest.mark.parametrize(("ctx", "stride"), [(64, 64), (64, 24), (48, 17)])
def test_hf_sliding_is_the_guide_loop(llama, tmp_path: Path, ctx: int, stride: int) -> None:
    d, model, tok = llama
    ids = tok.encode(TEXT).ids
    assert len(ids) % stride not in (0, 1)  # a final short window, never one of a single token
    want = hf_guide(model, ids, ctx, stride)
    r = eval_ppl(d, [write_text(tmp_path / "t.txt", TEXT)], protocol="hf-sliding", ctx=ctx, stride=stride, batch_size=3)
    assert r.protocol["protocol"] == "hf-sliding"
    assert_guide(r.variants[0], want)


def test_hf_sliding_keeps_the_guides_weights_for_a_last_window_of_one_target(llama, tmp_path: Path) -> None:
    # ctx 32, stride 12, N = 153: windows end at 32, 44, ..., 152, then [132, 153) has one new target. The guide
    # averages 31 + 10 * 12 + 1 = 152 labels but weights them 31 + 10 * 11 + 0 = 141.
    d, model, tok = llama
    ids = tok.encode(TEXT).ids[:153]
    want = hf_guide(model, ids, 32, 12)
    assert (want.n_targets, want.n_tokens) == (152, 141)
    r = eval_ppl(d, [write_ids(tmp_path / "ids.npy", ids)], protocol="hf-sliding", ctx=32, stride=12, batch_size=4)
    assert_guide(r.variants[0], want)


def test_hf_sliding_leaves_out_a_last_window_of_one_token(llama, tmp_path: Path) -> None:
    # stride = ctx = 32, N = 65: the guide's last window [64, 65) has no label after the shift, loss NaN, NaN * 0.
    d, model, tok = llama
    ids = tok.encode(TEXT).ids[:65]
    assert math.isnan(hf_guide(model, ids, 32, 32).nll_sum)
    want = hf_guide(model, ids[:64], 32, 32)  # the same loop without that window (docs/evaluation.md)
    r = eval_ppl(d, [write_ids(tmp_path / "ids.npy", ids)], protocol="hf-sliding", ctx=32, stride=32)
    assert_guide(r.variants[0], want)


def test_hf_sliding_encodes_with_the_tokenizers_special_tokens(llama, bos_llama, tmp_path: Path) -> None:
    # The guide's ``tokenizer(text)`` adds the tokenizer's BOS: the stream starts with it and it is context only.
    _, model, _ = llama
    d, tok = bos_llama
    ids = tok.encode(TEXT).ids
    assert ids[0] == EOS and ids[1:] == tok.encode(TEXT, add_special_tokens=False).ids
    want = hf_guide(model, ids, 64, 24)
    v = eval_ppl(d, [write_text(tmp_path / "t.txt", TEXT)], protocol="hf-sliding", ctx=64, stride=24).variants[0]
    assert_guide(v, want)


# ==== 2. lm-eval-rolling: loglikelihood_rolling per document ======================================================
def test_rolling_windows_transcription_on_lm_evals_docstring_example() -> None:
    # lm_eval.utils' docstring: tokens 0..8, prefix P, max_seq_len 3, context_len 2 (the reference's own check).
    windows = list(get_rolling_token_windows(list(range(9)), -1, 3, 2))
    assert windows == [([-1, 0, 1], [0, 1, 2]), ([1, 2, 3], [3, 4]), ([3, 4, 5], [5, 6]), ([5, 6, 7], [7, 8])]
    # disjoint: the context ends right before the continuation, so context + continuation is the stream itself
    joined = [ctx + cont for ctx, cont in map(make_disjoint_window, windows)]
    assert joined == [[-1, 0, 1, 2], [1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8]]


def test_lm_eval_rolling_matches_lm_evals_loglikelihood_rolling(llama, tmp_path: Path) -> None:
    d, model, tok = llama
    ctx = 32
    docs = [HELD[:1500], HELD[1500:1560], HELD[48400:50000]]  # the last has curly quotes: bytes != characters
    ids = [tok.encode(doc, add_special_tokens=False).ids for doc in docs]
    assert len(ids[1]) < ctx < len(ids[0]) and len(ids[0]) % ctx and len(ids[2]) % ctx
    assert len(docs[2].encode("utf-8")) > len(docs[2])
    per_doc = [lm_eval_rolling(hf_logits_fn(model), t, EOS, ctx) for t in ids]
    assert [len(p) for p in per_doc] == [len(t) for t in ids]  # every token of every document is scored
    lls = [math.fsum(p) for p in per_doc]  # lm-eval's result per request
    r = eval_ppl(d, [write_jsonl(tmp_path / "docs.jsonl", docs)], protocol="lm-eval-rolling", ctx=ctx, batch_size=3)
    v = r.variants[0]
    n = sum(len(t) for t in ids)
    assert r.protocol["protocol"] == "lm-eval-rolling"
    assert v["tokens"] == n
    assert v["nll_sum"] == pytest.approx(-math.fsum(lls), rel=REL)
    assert v["mean_nll"] == pytest.approx(-math.fsum(lls) / n, rel=REL)
    assert v["ppl"] == pytest.approx(math.exp(-math.fsum(lls) / n), rel=REL)
    counts = [wikitext_counts(doc) for doc in docs]
    assert r.protocol["words"] == sum(c[0] for c in counts) and r.protocol["bytes"] == sum(c[1] for c in counts)
    words = [(ll, c[0]) for ll, c in zip(lls, counts, strict=True)]
    nbytes = [(ll, c[1]) for ll, c in zip(lls, counts, strict=True)]
    assert v["word_perplexity"] == pytest.approx(weighted_perplexity(words), rel=REL)
    assert v["byte_perplexity"] == pytest.approx(weighted_perplexity(nbytes), rel=REL)
    assert v["bits_per_byte"] == pytest.approx(bits_per_byte(nbytes), rel=REL)


def test_lm_eval_rolling_refuses_a_stride(llama, tmp_path: Path) -> None:
    d, _, _ = llama
    with pytest.raises(UsageError, match="stride"):
        eval_ppl(d, [write_text(tmp_path / "t.txt", TEXT)], protocol="lm-eval-rolling", ctx=32, stride=16)


def test_lm_eval_rolling_with_a_bos_tokenizer_follows_lm_evals_tok_encode(llama, bos_llama, tmp_path: Path) -> None:
    # lm-eval >= 0.4.9.2 (PR #3347, commit 5302f2a9): loglikelihood_rolling calls tok_encode(string), which leaves
    # add_special_tokens unset (``_add_special_kwargs(None, None) == {}``): the tokenizer adds its BOS, and
    # prefix_token_id is that BOS too, so the first window scores BOS | BOS. (lm-eval <= 0.4.9.1 passed
    # add_special_tokens=False for causal models: no BOS in the token list.)
    _, model, _ = llama
    d, tok = bos_llama
    token_lists = [tok.encode(doc).ids for doc in DOCS]
    assert all(t[0] == EOS for t in token_lists)
    lls = [math.fsum(lm_eval_rolling(hf_logits_fn(model), t, EOS, 32)) for t in token_lists]
    v = eval_ppl(d, [write_jsonl(tmp_path / "docs.jsonl", DOCS)], protocol="lm-eval-rolling", ctx=32).variants[0]
    assert v["tokens"] == sum(len(t) for t in token_lists)
    assert v["nll_sum"] == pytest.approx(-math.fsum(lls), rel=REL)


# ==== 3. llama-cpp: perplexity() ==================================================================================
def test_llama_cpp_matches_perplexity_cpp(llama, tmp_path: Path) -> None:
    d, model, tok = llama
    ctx = 64
    ids = tok.encode(TEXT).ids  # the demo tokenizer adds no BOS: chunks keep their first token
    want = llama_cpp_perplexity(hf_logits_fn(model), ids, ctx)
    assert want is not None and len(want.nlls) == (len(ids) // ctx) * (ctx - 1 - ctx // 2) == 27 * 31
    r = eval_ppl(d, [write_text(tmp_path / "t.txt", TEXT)], protocol="llama-cpp", ctx=ctx, batch_size=4)
    v = r.variants[0]
    assert r.protocol["protocol"] == "llama-cpp"
    assert v["tokens"] == len(want.nlls)
    assert v["nll_sum"] == pytest.approx(math.fsum(want.nlls), rel=REL)
    assert v["ppl"] == pytest.approx(want.ppl, rel=REL)
    assert v["ppl_stderr"] == pytest.approx(want.unc, rel=REL)  # "Final estimate: PPL = %.4lf +/- %.5lf"
    assert v["mean_nll_stderr"] == pytest.approx(want.unc / want.ppl, rel=REL)
    assert_no_text_metrics(v)


def test_llama_cpp_needs_two_contexts_of_tokens(llama, tmp_path: Path) -> None:
    d, model, _ = llama
    ctx = 32
    ids = torch.randint(1, 4096, (2 * ctx,), generator=torch.Generator().manual_seed(3)).tolist()
    want = llama_cpp_perplexity(hf_logits_fn(model), ids, ctx)
    assert want is not None and llama_cpp_perplexity(hf_logits_fn(model), ids[:-1], ctx) is None
    v = eval_ppl(d, [write_ids(tmp_path / "ok.npy", ids)], protocol="llama-cpp", ctx=ctx).variants[0]
    assert v["tokens"] == 2 * (ctx - 1 - ctx // 2) and v["ppl"] == pytest.approx(want.ppl, rel=REL)
    with pytest.raises((InputError, UsageError)) as e:
        eval_ppl(d, [write_ids(tmp_path / "short.npy", ids[:-1])], protocol="llama-cpp", ctx=ctx)
    msg = str(e.value)
    assert str(2 * ctx) in msg or re.search(r"2\s*[x×*]\s*`?ctx", msg), msg


def test_llama_cpp_puts_the_bos_first_in_every_chunk(llama, bos_llama, tmp_path: Path) -> None:
    _, model, _ = llama
    d, tok = bos_llama
    ids = tok.encode(TEXT).ids  # common_tokenize(ctx, prompt, true): the BOS starts the stream
    want = llama_cpp_perplexity(hf_logits_fn(model), ids, 64, add_bos=True, bos=EOS)
    plain = llama_cpp_perplexity(hf_logits_fn(model), ids, 64)
    assert want is not None and plain is not None and abs(want.ppl / plain.ppl - 1) > 1e-4  # the BOS matters (5e-4)
    v = eval_ppl(d, [write_text(tmp_path / "t.txt", TEXT)], protocol="llama-cpp", ctx=64).variants[0]
    assert v["tokens"] == len(want.nlls)
    assert v["ppl"] == pytest.approx(want.ppl, rel=REL)
    assert v["ppl_stderr"] == pytest.approx(want.unc, rel=REL)


# ==== 4. tolcli (default): the rule of docs/evaluation.md, one target at a time ===================================
def test_tolcli_protocol_is_the_documented_rule(llama, tmp_path: Path) -> None:
    d, model, tok = llama
    n, ctx, stride = 150, 32, 12
    ids = tok.encode(TEXT).ids[:n]
    length, plan, owner = brute_windows(n, ctx, stride)
    nll = 0.0
    for i in range(1, n):  # target t_i, predicted from the window that first scores it
        s = plan[owner[i]][0]
        nll -= float(log_probs(hf_logits_fn(model), ids[s : s + length])[i - 1 - s, ids[i]])
    path = write_ids(tmp_path / "ids.npy", ids)
    for r in (
        eval_ppl(d, [path], ctx=ctx, stride=stride, batch_size=3),
        eval_ppl(d, [path], protocol="tolcli", ctx=ctx, stride=stride, batch_size=5),
    ):
        v = r.variants[0]
        assert r.protocol["protocol"] == "tolcli"
        assert v["tokens"] == n - 1
        assert v["nll_sum"] == pytest.approx(nll, rel=REL)
        assert v["ppl"] == pytest.approx(math.exp(nll / (n - 1)), rel=REL)


# ==== 5. error bars: per-token statistics of the tolcli protocol ==================================================
def per_token_stats(ids: list[int], ctx: int, stride: int) -> dict[str, list[float]]:
    """Per scored target of the memoryllm demo: NLL of the baseline and of drop-last-1, KL, same top-1."""
    model = load_model(open_checkpoint(demo_checkpoint_path()))
    drop = DropSource(FFNSource(model), {5})  # 6 layers: drop_last=1 removes layer 5's context-free FFN
    length, plan, _ = brute_windows(len(ids), ctx, stride)
    out: dict[str, list[float]] = {"ref": [], "var": [], "kl": [], "same": []}
    with torch.no_grad():
        for start, first_scored in plan:
            x = torch.tensor([ids[start : start + length]])
            ref = torch.log_softmax(model(x)[0].double(), -1)[first_scored:]
            var = torch.log_softmax(model(x, drop)[0].double(), -1)[first_scored:]
            tgt = torch.tensor(ids[start + first_scored + 1 : start + length + 1])
            out["ref"] += (-ref.gather(1, tgt[:, None])[:, 0]).tolist()
            out["var"] += (-var.gather(1, tgt[:, None])[:, 0]).tolist()
            out["kl"] += kl_rows(ref, var)
            out["same"] += (ref.argmax(-1) == var.argmax(-1)).double().tolist()
    return out


ORDER_STATS = {"median", "p90", "p99", "p999", "max"}


def test_error_bars_against_per_token_formulas(tmp_path: Path) -> None:
    d = demo_checkpoint_path()
    ctx, stride, text = 64, 32, HELD[:5999]  # 1,748 scored targets: an even count, the median averages two
    ids = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json")).encode(text).ids
    n = len(ids)
    s = per_token_stats(ids, ctx, stride)
    assert len(s["ref"]) == n - 1 == 1748
    path = write_text(tmp_path / "t.txt", text)
    r = eval_ppl(d, [path], ctx=ctx, stride=stride, drop_last=1, batch_size=3, confidence=0.9)
    base, var = r.variants
    for v, nlls in ((base, s["ref"]), (var, s["var"])):
        mean, se = mean_and_uncertainty(nlls)
        assert v["tokens"] == n - 1
        assert v["mean_nll"] == pytest.approx(mean, rel=REL)
        assert v["mean_nll_stderr"] == pytest.approx(se, rel=REL)
        assert v["ppl_stderr"] == pytest.approx(math.exp(mean) * se, rel=REL)  # delta method, as llama.cpp
        assert_text_metrics(v, math.fsum(nlls), *wikitext_counts(text))
    ppl_ref, ppl_var = (math.exp(mean_and_uncertainty(s[k])[0]) for k in ("ref", "var"))
    assert var["ppl_change_pct"] == pytest.approx(100 * (ppl_var / ppl_ref - 1), rel=REL)
    diff_mean, diff_se = mean_and_uncertainty([b - a for a, b in zip(s["ref"], s["var"], strict=True)])
    assert var["nll_diff_mean"] == pytest.approx(diff_mean, rel=REL, abs=1e-7)  # a small mean of fp32 differences
    assert var["nll_diff_stderr"] == pytest.approx(diff_se, rel=REL)
    z = NormalDist().inv_cdf(0.95)  # two-sided 90%: 1.6449
    ci = [100 * math.expm1(diff_mean - z * diff_se), 100 * math.expm1(diff_mean + z * diff_se)]
    assert list(var["ppl_change_pct_ci"]) == pytest.approx(ci, rel=REL, abs=1e-5)  # percent; as nll_diff_mean
    kl_mean, kl_se = mean_and_uncertainty(s["kl"])
    want_kl = {
        "mean": kl_mean,
        "stderr": kl_se,
        "median": median(s["kl"]),
        "p90": percentile(s["kl"], 0.9),
        "p99": percentile(s["kl"], 0.99),
        "p999": percentile(s["kl"], 0.999),
        "max": max(s["kl"]),
    }
    assert set(var["kl"]) == set(want_kl)
    for k, want in want_kl.items():  # order statistics of single-token KLs: fp32 per-token sums allowed (abs 5e-6)
        assert var["kl"][k] == pytest.approx(want, rel=REL, abs=5e-6 if k in ORDER_STATS else 0), k
    assert var["mean_kl"] == pytest.approx(kl_mean, rel=REL)
    p = math.fsum(s["same"]) / (n - 1)
    assert 0.5 < p < 1
    assert var["top1_agreement"] == pytest.approx(p, abs=1.01 / (n - 1))  # at most one near-tie may flip
    assert var["top1_agreement_stderr"] == pytest.approx(same_top_uncertainty(var["top1_agreement"], n - 1), rel=REL)
    assert same_top_uncertainty(var["top1_agreement"], n - 1) == pytest.approx(same_top_uncertainty(p, n - 1), rel=1e-2)


# ==== 6. documents: separators and metrics ========================================================================


@pytest.mark.parametrize("protocol", ["tolcli", "hf-sliding", "llama-cpp"])
def test_doc_sep_eos_puts_the_eos_id_between_documents(llama, tmp_path: Path, protocol: str) -> None:
    d, _, tok = llama
    ids = [*tok.encode(DOCS[0]).ids, EOS, *tok.encode(DOCS[1]).ids]
    kw: dict[str, Any] = {"protocol": protocol, "ctx": 32, "stride": None if protocol == "llama-cpp" else 12}
    a = eval_ppl(d, [write_jsonl(tmp_path / "docs.jsonl", DOCS)], doc_sep="eos", **kw)
    b = eval_ppl(d, [write_ids(tmp_path / "ids.npy", ids)], **kw)
    va, vb = a.variants[0], b.variants[0]
    assert a.protocol["doc_sep"] == "eos"
    assert va["tokens"] == vb["tokens"]
    assert va["nll_sum"] == pytest.approx(vb["nll_sum"], rel=1e-9)
    assert va["ppl"] == pytest.approx(vb["ppl"], rel=1e-9)
    assert_no_text_metrics(vb)
    if protocol == "tolcli":  # the protocols that score every token but the first (docs/evaluation.md)
        words, nbytes = (sum(c) for c in zip(*map(wikitext_counts, DOCS), strict=True))
        assert_text_metrics(va, va["nll_sum"], words, nbytes)
    else:
        assert_no_text_metrics(va)


def test_doc_sep_blank_line_is_the_guides_wikitext_join(llama, tmp_path: Path) -> None:
    d, _, _ = llama
    kw: dict[str, Any] = {"protocol": "tolcli", "ctx": 32, "stride": 12}
    a = eval_ppl(d, [write_jsonl(tmp_path / "docs.jsonl", DOCS)], doc_sep="blank-line", **kw)
    b = eval_ppl(d, [write_text(tmp_path / "t.txt", "\n\n".join(DOCS))], doc_sep="eos", **kw)
    va, vb = a.variants[0], b.variants[0]
    assert va["tokens"] == vb["tokens"]
    assert va["nll_sum"] == pytest.approx(vb["nll_sum"], rel=1e-9)
    # words and bytes are the documents' own: the .txt is one document that holds the separator's 2 bytes
    words = sum(wikitext_counts(doc)[0] for doc in DOCS)
    assert a.protocol["words"] == words == b.protocol["words"]
    assert a.protocol["bytes"] + 2 == b.protocol["bytes"] == len("\n\n".join(DOCS).encode("utf-8"))


def test_a_single_document_ignores_doc_sep_and_max_tokens_drops_text_metrics(llama, tmp_path: Path) -> None:
    d, _, _ = llama
    path = write_text(tmp_path / "t.txt", TEXT)
    runs = [eval_ppl(d, [path], ctx=32, stride=16, doc_sep=sep) for sep in ("eos", "blank-line")]
    assert runs[0].variants[0]["nll_sum"] == runs[1].variants[0]["nll_sum"]
    assert runs[0].variants[0]["tokens"] == runs[1].variants[0]["tokens"] == 1749
    cut = eval_ppl(d, [path], ctx=32, stride=16, max_tokens=500).variants[0]
    assert cut["tokens"] == 499
    assert_no_text_metrics(cut)  # the words and bytes would be the whole text's, not the scored part's
