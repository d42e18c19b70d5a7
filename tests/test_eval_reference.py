"""Stored references (``--save-reference`` / ``--reference``), the significance gate, the context limit, and a
sweep that computes its baseline once. Expected values come from the live computation (a reference must
reproduce it), from hand statistics (``statistics``), or from counting windows by hand."""

from __future__ import annotations

import json
import math
import statistics
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import tolcli
from tolcli import demo_checkpoint_path, demo_heldout_path, eval_ppl
from tolcli.errors import InputError, QualityGateError, UsageError
from tolcli.evaluation import EvalReport, summarise
from tolcli.model import Transformer
from tolcli.scoring import VariantStats

CKPT = demo_checkpoint_path()
DATA = [demo_heldout_path()]
FAST = {"ctx": 64, "max_tokens": 500, "batch_size": 8}


class ForwardCounter:
    """Counts Transformer forward passes with the model's own FFNs (source None) and with anything else."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.own = self.other = 0
        original = Transformer.forward

        def counted(model, idx, source=None, *args, **kwargs):
            if source is None:
                self.own += 1
            else:
                self.other += 1
            return original(model, idx, source, *args, **kwargs)

        monkeypatch.setattr(Transformer, "forward", counted)


def test_saved_reference_reproduces_the_live_comparison(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = tmp_path / "ref.safetensors"
    live = eval_ppl(CKPT, DATA, drop_last=1, save_reference=ref, reference_top_k=4096, **FAST)
    counter = ForwardCounter(monkeypatch)
    again = eval_ppl(CKPT, DATA, drop_last=1, reference=ref, **FAST)
    assert counter.own == 0 and counter.other > 0  # the baseline is never recomputed
    (b0, v0), (b1, v1) = live.variants, again.variants
    assert b1["name"].startswith("reference ref.safetensors") and b1["kind"] == "reference"
    assert b1["tokens"] == b0["tokens"] == 499
    for key in ("ppl", "mean_nll", "mean_nll_stderr"):
        assert b1[key] == pytest.approx(b0[key], rel=1e-6), key
    for key in ("ppl", "ppl_change_pct", "nll_diff_mean", "nll_diff_stderr", "mean_kl", "top1_agreement"):
        assert v1[key] == pytest.approx(v0[key], rel=1e-5, abs=1e-9), key
    for key in ("median", "p99", "max"):
        assert v1["kl"][key] == pytest.approx(v0["kl"][key], rel=1e-4), key
    assert again.protocol["reference_file"] == str(ref)


def test_top_k_reference_is_a_close_lower_bound_of_kl(tmp_path: Path) -> None:
    # Expected: grouping the tail of both distributions into one outcome can only lower KL (log-sum inequality),
    # and with the 64 most likely of 4,096 tokens it keeps most of it on this model.
    ref = tmp_path / "ref64.safetensors"
    live = eval_ppl(CKPT, DATA, drop_last=1, save_reference=ref, reference_top_k=64, **FAST)
    again = eval_ppl(CKPT, DATA, drop_last=1, reference=ref, **FAST)
    kl_live, kl_k = live.variants[1]["mean_kl"], again.variants[1]["mean_kl"]
    assert kl_k <= kl_live * (1 + 1e-6)
    assert kl_k >= 0.6 * kl_live
    assert again.variants[1]["top1_agreement"] == live.variants[1]["top1_agreement"]  # the argmax is stored
    assert again.variants[1]["ppl"] == pytest.approx(live.variants[1]["ppl"], rel=1e-6)
    assert ref.stat().st_size == pytest.approx(499 * (4 + 8 * 64), abs=2048)  # documented size


def test_reference_for_another_run_is_refused(tmp_path: Path) -> None:
    ref = tmp_path / "ref.safetensors"
    eval_ppl(CKPT, DATA, save_reference=ref, reference_top_k=8, **FAST)
    with pytest.raises(InputError, match=r"another run \(ctx: file 64, this run 32"):
        eval_ppl(CKPT, DATA, reference=ref, **{**FAST, "ctx": 32})
    with pytest.raises(InputError, match="max_tokens"):
        eval_ppl(CKPT, DATA, reference=ref, **{**FAST, "max_tokens": 400})
    with pytest.raises(InputError, match="protocol"):
        eval_ppl(CKPT, DATA, reference=ref, protocol="hf-sliding", **FAST)


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy a reference file with ``edit(header_dict, data_bytearray)`` applied (same layout otherwise)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = bytearray(raw[8 + n :])
    edit(header, data)
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data))


def test_hostile_reference_files(tmp_path: Path) -> None:
    ref = tmp_path / "ref.safetensors"
    eval_ppl(CKPT, DATA, save_reference=ref, reference_top_k=4, **FAST)
    header = json.loads(ref.read_bytes()[8 : 8 + struct.unpack("<Q", ref.read_bytes()[:8])[0]])
    begin, _ = header["topk_logp"]["data_offsets"]
    id_begin, _ = header["topk_ids"]["data_offsets"]

    def nan_logp(h, d):
        d[begin : begin + 4] = struct.pack("<f", float("nan"))

    def bad_id(h, d):
        d[id_begin : id_begin + 4] = struct.pack("<i", 4096)

    def lie_tokens(h, d):  # metadata and shapes that agree with each other but not with the run
        meta = json.loads(h["__metadata__"]["tolcli.reference"])
        meta["run"]["tokens"] = [1000]
        h["__metadata__"]["tolcli.reference"] = json.dumps(meta)

    def not_reference(h, d):
        del h["__metadata__"]["tolcli.reference"]

    cases = [
        (nan_logp, "not log-probabilities"),
        (bad_id, r"outside the vocabulary \[0, 4096\)"),
        (lie_tokens, "another run"),
        (not_reference, "not a tolcli reference"),
    ]
    for edit, message in cases:
        bad = tmp_path / f"{edit.__name__}.safetensors"
        _rewrite(ref, bad, edit)
        with pytest.raises(InputError, match=message):
            eval_ppl(CKPT, DATA, reference=bad, **FAST)
    with pytest.raises(UsageError, match="not both"):
        eval_ppl(CKPT, DATA, reference=ref, save_reference=tmp_path / "x.safetensors", **FAST)


def _stats(name: str, nll: list[float]) -> VariantStats:
    n = len(nll)
    return VariantStats(name, np.array(nll), np.zeros(n), np.ones(n, dtype=bool))


def test_error_bars_and_significance_gate_against_hand_statistics() -> None:
    rng = np.random.default_rng(0)
    ref = rng.gamma(2.0, 1.5, size=400)
    var = ref + rng.normal(0.03, 0.2, size=400)
    infos = [{"kind": "baseline", "bytes": None}, {"kind": "bundle", "bytes": 1}]
    results = summarise(infos, [[_stats("ref", list(ref)), _stats("var", list(var))]], confidence=0.95)
    r0, r1 = results
    # Expected: statistics.stdev (n - 1 denominator) / sqrt(n); delta method for perplexity.
    se = statistics.stdev(ref.tolist()) / math.sqrt(400)
    assert r0["mean_nll_stderr"] == pytest.approx(se, rel=1e-9)
    assert r0["ppl_stderr"] == pytest.approx(math.exp(statistics.fmean(ref.tolist())) * se, rel=1e-9)
    d = (var - ref).tolist()
    d_se = statistics.stdev(d) / math.sqrt(400)
    assert r1["nll_diff_stderr"] == pytest.approx(d_se, rel=1e-9)
    z = statistics.NormalDist().inv_cdf(0.975)
    lo, hi = (100 * (math.exp(statistics.fmean(d) + s * z * d_se) - 1) for s in (-1, 1))
    assert r1["ppl_change_pct_ci"] == pytest.approx([lo, hi], rel=1e-9)
    assert r1["ppl_change_pct"] == pytest.approx(100 * (math.exp(statistics.fmean(d)) - 1), rel=1e-9)
    report = EvalReport({"confidence": 0.95}, results, 0.0)
    between = (lo + r1["ppl_change_pct"]) / 2  # above the low end, below the measured change
    assert lo > 0 and [v["name"] for v in report.gate(between)] == ["var"]
    assert report.gate(between, significant=True) == []
    assert [v["name"] for v in report.gate(lo - 0.01, significant=True)] == ["var"]
    with pytest.raises(QualityGateError, match="interval from"):
        report.enforce(lo - 0.01, significant=True)


def test_ctx_beyond_the_models_positions_is_refused(cli) -> None:
    with pytest.raises(UsageError, match=r"ctx 513 exceeds the model's max_position_embeddings \(512\)"):
        eval_ppl(CKPT, DATA, ctx=513, max_tokens=600)
    res = cli("eval-ppl", "demo", "--data", DATA[0], "--ctx", "600")
    assert res.code == 2 and "--ctx 600 exceeds" in res.err


def test_unknown_protocol_and_stride_with_chunked_protocols(cli) -> None:
    with pytest.raises(UsageError, match="unknown protocol"):
        eval_ppl(CKPT, DATA, protocol="wikitext", **FAST)
    with pytest.raises(UsageError, match="stride applies to the tolcli and hf-sliding"):
        eval_ppl(CKPT, DATA, protocol="llama-cpp", stride=32, **FAST)
    res = cli("eval-ppl", "demo", "--data", DATA[0], "--protocol", "nope")
    assert res.code == 2 and "unknown --protocol 'nope'" in res.err


def test_sweep_evaluates_the_baseline_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Expected: 399 targets at ctx 64 are 7 windows (ceil(399 / 64)); at 4 windows per batch that is 2 forward
    # passes per variant. The grid: dense, int4 g32/g64/g128, nf4, int8 and 6 drops = 12 variants besides the
    # baseline, so 24 passes with a source and exactly 2 with the model's own FFNs.
    counter = ForwardCounter(monkeypatch)
    opts = tolcli.SweepOptions(
        families=("int4", "nf4", "int8", "drop"), group_sizes=(32, 64, 128), ctx=64, max_tokens=400, batch_size=4
    )
    res = tolcli.sweep(CKPT, DATA, tmp_path / "sweep", opts)
    assert len(res.rows) == 13
    assert counter.own == 2
    assert counter.other == 2 * 12


def test_cli_reference_round_trip_and_json_fields(tmp_path: Path, cli) -> None:
    ref = tmp_path / "ref.safetensors"
    base = ["eval-ppl", "demo", "--data", str(DATA[0]), "--ctx", "64", "--max-tokens", "300", "--drop-last", "1"]
    first = cli(*base, "--save-reference", ref, "--json")
    assert first.code == 0, first.err
    second = cli(*base, "--reference", ref, "--json")
    assert second.code == 0, second.err
    a, b = json.loads(first.out), json.loads(second.out)
    assert a["protocol"]["saved_reference"] == str(ref) and b["protocol"]["reference_file"] == str(ref)
    assert b["variants"][1]["ppl"] == pytest.approx(a["variants"][1]["ppl"], rel=1e-6)
    v = a["variants"][1]
    assert set(v["kl"]) == {"mean", "stderr", "median", "p90", "p99", "p999", "max"}
    assert v["kl"]["median"] <= v["kl"]["p90"] <= v["kl"]["p99"] <= v["kl"]["p999"] <= v["kl"]["max"]
    assert 0 < v["top1_agreement_stderr"] < 0.05
    assert a["variants"][0]["bits_per_byte"] is None  # --max-tokens cut the text: no byte count to divide by


def test_table_shows_error_bars(cli) -> None:
    res = cli("eval-ppl", "demo", "--data", DATA[0], "--ctx", "64", "--max-tokens", "300", "--drop-last", "1")
    assert res.code == 0, res.err
    assert "±" in res.out and "95% interval" in res.out and "protocol tolcli" in res.out


def test_kl_with_torch_reference_on_a_stored_full_distribution(tmp_path: Path) -> None:
    # Independent: KL(ref || var) of one position from the stored full distribution equals F.kl_div on it.
    ref = tmp_path / "ref.safetensors"
    eval_ppl(CKPT, DATA, save_reference=ref, reference_top_k=4096, ctx=16, max_tokens=17)
    from safetensors.numpy import load_file

    stored = load_file(str(ref))
    logp = stored["topk_logp"][0]
    assert logp.shape == (4096,) and np.all(np.diff(logp) <= 0)  # most likely first
    assert float(np.exp(logp.astype(np.float64)).sum()) == pytest.approx(1.0, abs=1e-4)
    assert torch.tensor(stored["target_logp"]).shape == (16,)


def test_ctx_defaults_to_the_models_positions_up_to_512(make_ckpt, tmp_path) -> None:
    # Issue 18: without --ctx, a model trained on 96 positions is evaluated with 96-token windows (not refused for
    # the old fixed 512), and one trained on 1,024 with 512. Expected: the window each report states; the tolcli
    # protocol scores every token but the first once whatever the window: 399 of 400.
    text = tmp_path / "t.npy"
    np.save(text, (np.arange(2000, dtype=np.int64) * 7) % 50)  # token ids: the random checkpoint has no tokenizer
    for positions, want in ((96, 96), (1024, 512)):
        ck = make_ckpt(max_position_embeddings=positions)
        r = eval_ppl(ck, [text], max_tokens=400)
        assert r.protocol["ctx"] == want and r.variants[0]["tokens"] == 399
