"""Every integrity check, attacked: each test makes the check's failure condition happen and asserts the check
fires (and, where it matters, that the same input without the fault passes)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import tolcli.bundle.st_format as st_format
from tolcli import convert_bundle, drop_layers, eval_ppl, open_bundle, precompute
from tolcli.bundle.entries import TensorEntry
from tolcli.bundle.writer import Staging, WriteOptions, write_bundle
from tolcli.errors import InputError, QualityGateError, UsageError, VerifyError
from tolcli.evaluation import EvalReport
from tolcli.testing import random_state_dict, tiny_config, tiny_manifest, write_checkpoint


@pytest.fixture
def dense(tmp_path: Path, make_ckpt) -> Path:
    return precompute(make_ckpt("memoryllm"), tmp_path / "dense.safetensors", dtype="fp32").path


# ---- staging: what was staged is what lands ------------------------------------------------------------------
def test_staged_file_changed_before_assembly_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    s = Staging(out, {"job": 1}, resume=False, options=WriteOptions.make(out), note=lambda m: None)
    table = np.arange(12, dtype="<f4").reshape(6, 2)
    rec = s.stage("layers.0.table", "F32", (6, 2), [table])
    raw = bytearray((s.dir / rec["file"]).read_bytes())
    raw[5] ^= 0x01  # one bit, after staging and before assembly
    (s.dir / rec["file"]).write_bytes(bytes(raw))
    with pytest.raises(VerifyError, match="changed while it was copied"):
        s.finish(tiny_manifest(6, 2))
    assert not out.exists() and not list(tmp_path.glob(".t.safetensors.tmp*"))


def test_staged_file_truncated_before_assembly_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    s = Staging(out, {"job": 1}, resume=False, options=WriteOptions.make(out), note=lambda m: None)
    rec = s.stage("layers.0.table", "F32", (6, 2), [np.zeros((6, 2), "<f4")])
    (s.dir / rec["file"]).write_bytes(b"\0" * 40)
    with pytest.raises(VerifyError, match="shorter than recorded"):
        s.finish(tiny_manifest(6, 2))
    assert not out.exists()


class _Interrupt(Exception):
    pass


def interrupted_run(ckpt: Path, out: Path, monkeypatch, layers: int) -> bytes:
    """Precompute ``ckpt`` into ``out``, interrupted once ``layers`` layers are committed; returns the bytes of an
    uninterrupted run of the same job (the reference a resume must reproduce)."""
    ref = precompute(ckpt, out.with_name("ref.safetensors"), dtype="fp32").path.read_bytes()
    commit = Staging.commit_layer
    calls: list[int] = []

    def interrupted(self, index, entry):
        commit(self, index, entry)
        calls.append(index)
        if len(calls) == layers:
            raise _Interrupt

    monkeypatch.setattr(Staging, "commit_layer", interrupted)
    with pytest.raises(_Interrupt):
        precompute(ckpt, out, dtype="fp32")
    monkeypatch.setattr(Staging, "commit_layer", commit)
    assert not out.exists()
    return ref


def test_resume_over_tampered_staging_starts_over(tmp_path: Path, make_ckpt, monkeypatch) -> None:
    """An interrupted run leaves 2 committed layers; one staged byte is flipped; --resume must not reuse it."""
    ckpt = make_ckpt("memoryllm")
    out = tmp_path / "out.safetensors"
    ref = interrupted_run(ckpt, out, monkeypatch, layers=2)
    partial = tmp_path / ".out.safetensors.partial"
    staged = sorted(partial.glob("*.bin"))
    assert len(staged) >= 2 and not out.exists()
    raw = bytearray(staged[0].read_bytes())
    raw[len(raw) // 2] ^= 0x40
    staged[0].write_bytes(bytes(raw))
    notes: list[str] = []
    precompute(ckpt, out, resume=True, note=notes.append, dtype="fp32")
    assert out.read_bytes() == ref
    assert any("removing the partial output" in n for n in notes), notes
    assert not any(n.startswith("resuming") for n in notes)


def test_resume_over_intact_staging_reuses_it(tmp_path: Path, make_ckpt, monkeypatch) -> None:
    """The control for the test above: untouched staging is resumed, to the same bytes."""
    ckpt = make_ckpt("memoryllm")
    out = tmp_path / "out.safetensors"
    ref = interrupted_run(ckpt, out, monkeypatch, layers=1)
    notes: list[str] = []
    precompute(ckpt, out, resume=True, note=notes.append, dtype="fp32")
    assert out.read_bytes() == ref and "resuming: 1 layer(s) already done" in notes[0]


# ---- copies: a byte flipped on the way never lands ------------------------------------------------------------
@pytest.mark.parametrize("how", ["convert", "drop"])
def test_byte_flipped_during_copy_is_refused(dense: Path, tmp_path: Path, monkeypatch, how: str) -> None:
    blocks = st_format.SafetensorsReader.blocks

    def flipping(self, name: str, rows: int):
        for i, b in enumerate(blocks(self, name, rows)):
            if name == "layers.1.table" and i == 0:
                b = np.array(b, copy=True)
                b.view(np.uint8).reshape(-1)[3] ^= 0x10
            yield b

    monkeypatch.setattr(st_format.SafetensorsReader, "blocks", flipping)
    out = tmp_path / ("c.h5" if how == "convert" else "d.safetensors")
    with pytest.raises(VerifyError, match=r"'layers.1.table' changed while it was copied"):
        if how == "convert":
            convert_bundle(dense, out)
        else:
            drop_layers(dense, out, drop_last=1)
    assert not out.exists() and not list(tmp_path.glob(f".{out.name}.tmp*"))
    monkeypatch.setattr(st_format.SafetensorsReader, "blocks", blocks)
    (convert_bundle(dense, out) if how == "convert" else drop_layers(dense, out, drop_last=1))
    assert out.exists()


# ---- lookups: the vocabulary's edges ------------------------------------------------------------------------
def test_lookup_ids_at_the_vocabulary_edges(dense: Path) -> None:
    with open_bundle(dense) as b:
        V = b.vocab_size
        last = b.lookup(0, [V - 1, 0])
        assert last.shape == (2, b.hidden_size)
        for bad in ([V], [-1], [0, V], [[1, 2], [V + 5, 0]], [-(2**40)], [2**40]):
            with pytest.raises(InputError, match=rf"token id outside the vocabulary \[0, {V}\)"):
                b.lookup(0, bad)
        with pytest.raises(InputError, match="layer 7 is out of range"):
            b.lookup(7, [0])


# ---- the quality gate: exactly at the limit passes, above fails, NaN never passes ------------------------------
def _report(*changes: float, kl: float = 0.0) -> EvalReport:
    variants = [{"name": "ref", "ppl_change_pct": 0.0, "mean_kl": 0.0}]
    variants += [{"name": f"v{i}", "ppl_change_pct": c, "mean_kl": kl} for i, c in enumerate(changes)]
    return EvalReport({}, variants, 0.0)


def test_gate_boundaries() -> None:
    assert _report(1.0).gate(1.0) == []  # exactly at the limit passes
    assert [v["name"] for v in _report(1.0, math.nextafter(1.0, 2.0)).gate(1.0)] == ["v1"]
    assert _report(-3.0).gate(0.0) == []
    for bad in (float("nan"), float("inf")):
        assert len(_report(bad).gate(1.0)) == 1  # a NaN or infinite perplexity never passes
        assert len(_report(0.5, kl=bad).gate(1.0)) == 1  # nor a NaN KL
        with pytest.raises(UsageError, match="finite"):
            _report(0.5).gate(bad)


def test_gate_end_to_end_exactly_at_the_measured_change(tmp_path: Path, make_ckpt) -> None:
    ckpt = make_ckpt("memoryllm")
    data = tmp_path / "ids.npy"
    np.save(data, np.random.default_rng(0).integers(0, 101, 300))
    kw = dict(ctx=32, drop_last=1)
    change = eval_ppl(ckpt, [data], **kw).variants[1]["ppl_change_pct"]
    assert change > 0
    eval_ppl(ckpt, [data], max_increase=change, **kw)  # exactly at the limit: passes
    with pytest.raises(QualityGateError, match="quality gate failed: drop last 1"):
        eval_ppl(ckpt, [data], max_increase=math.nextafter(change, 0.0), **kw)
    with pytest.raises(UsageError, match="finite"):  # refused before any work: the checkpoint is not even opened
        eval_ppl(tmp_path / "no-such-checkpoint", [data], max_increase=float("nan"), **kw)


def test_gate_fails_on_a_nan_bundle(tmp_path: Path, make_ckpt) -> None:
    """A bundle holding NaN (written past the checks, as a buggy tool would) gives a NaN perplexity: exit 3."""
    ckpt = make_ckpt("memoryllm")
    good = precompute(ckpt, tmp_path / "good.safetensors", dtype="fp32").path
    bad = _rewrite(good, tmp_path / "nan.safetensors", edit=lambda name, a: a.__setitem__((slice(None), 0), np.nan))
    data = tmp_path / "ids.npy"
    np.save(data, np.random.default_rng(0).integers(0, 101, 200))
    with pytest.raises(QualityGateError) as e:
        eval_ppl(ckpt, [data], tols=[bad], ctx=32, max_increase=1000.0)
    assert math.isnan(e.value.report.variants[1]["ppl"])  # type: ignore[attr-defined]


def test_cli_reports_a_nan_perplexity_as_strict_json_and_exit_3(tmp_path: Path, make_ckpt, cli) -> None:
    ckpt = make_ckpt("memoryllm")
    good = precompute(ckpt, tmp_path / "good.safetensors", dtype="fp32").path
    bad = _rewrite(good, tmp_path / "nan.safetensors", edit=lambda name, a: a.__setitem__((slice(None), 0), np.nan))
    data = tmp_path / "ids.npy"
    np.save(data, np.random.default_rng(0).integers(0, 101, 200))
    r = cli("eval-ppl", ckpt, "--data", data, "--tol", bad, "--ctx", "32", "--max-increase", "1", "--json")
    assert r.code == 3
    doc = json.loads(r.out, parse_constant=lambda c: pytest.fail(f"bare {c} in --json output"))
    assert doc["variants"][1]["ppl"] is None and doc["variants"][0]["ppl"] > 1
    assert "quality gate failed" in r.err and "nan" in r.err
    r = cli("eval-ppl", ckpt, "--data", data, "--max-increase", "nan", "--drop-last", "1")
    assert r.code == 2 and "--max-increase must be a finite number" in r.err


# ---- verify: recorded fp16 overflow passes, anything beyond it fails --------------------------------------------
def _rewrite(src: Path, dst: Path, *, overflow: int | None = None, edit=None) -> Path:
    """A copy of ``src`` with layer 1's table edited in place by ``edit(name, array)`` and/or its recorded fp16
    overflow count changed, hashed consistently (a manifest that lies with consistent hashes)."""
    with open_bundle(src) as b:
        manifest = b.manifest
        entries = []
        for name in b.tensor_names:
            arr = b.tensor(name).numpy().copy()
            if edit is not None and name == "layers.1.table":
                edit(name, arr)
            sha = hashlib.sha256(arr.tobytes()).hexdigest()
            dtype = manifest["tensors"][name]["dtype"]
            entries.append(TensorEntry(name, dtype, arr.shape, sha, lambda a=arr: iter([a])))
    if overflow is not None:
        manifest["layers"][1]["fp16_overflow"] = overflow
    return write_bundle(dst, entries, manifest)


def test_verify_accepts_recorded_fp16_overflow_and_nothing_more(tmp_path: Path) -> None:
    cfg = tiny_config("memoryllm", memory_norm_type="rmsnorm")
    state = random_state_dict(cfg, memory_norm_bias=False)
    state["model.layers.1.mlp.down_proj.weight"] *= 1e6
    t16 = precompute(write_checkpoint(tmp_path / "c", cfg, state), tmp_path / "t.safetensors", dtype="fp16").path
    with open_bundle(t16) as b:
        recorded = b.manifest["layers"][1]["fp16_overflow"]
        table = b.tensor("layers.1.table").float()
        assert recorded == int(torch.isinf(table).sum()) > 0  # counted independently, here
        b.verify()  # the overflow the manifest records is allowed
        assert b.check_values() == {"layer 1": recorded}
    one_less = _rewrite(t16, tmp_path / "lie.safetensors", overflow=recorded - 1)
    with open_bundle(one_less) as b, pytest.raises(VerifyError, match=rf"layer 1: 0 NaN and {recorded:,} Inf"):
        b.verify()
    nan = _rewrite(t16, tmp_path / "nan.safetensors", edit=lambda name, a: a.__setitem__((3, 2), np.nan))
    with open_bundle(nan) as b, pytest.raises(VerifyError, match="layer 1: 1 NaN"):
        b.verify()


@pytest.mark.parametrize(
    ("dtype", "torch_dtype", "np_dtype"), [("BF16", torch.bfloat16, "<u2"), ("F16", torch.float16, "<f2")]
)
def test_nonfinite_counts_against_torch_on_every_16_bit_pattern(dtype: str, torch_dtype, np_dtype: str) -> None:
    """Brute force over all 65,536 bit patterns: NaN and Inf counts equal torch's isnan/isinf."""
    from tolcli.bundle.reader import nonfinite_counts

    bits = np.arange(1 << 16, dtype=np.uint16)
    t = torch.from_numpy(bits.astype(np.int32).astype(np.int16)).view(torch_dtype)
    want = (int(torch.isnan(t).sum()), int(torch.isinf(t).sum()))
    assert want == (2 * (2**10 - 1) if dtype == "F16" else 2 * (2**7 - 1), 2)  # closed form: +-NaN payloads, +-Inf
    assert nonfinite_counts(bits.view(np_dtype), dtype) == want
    f32 = np.array([np.nan, np.inf, -np.inf, 1.0, 3e38], dtype="<f4")
    assert nonfinite_counts(f32, "F32") == (1, 2)
    assert nonfinite_counts(np.array([-1, 0x7F80], dtype="<i4"), "I32") == (0, 0)


def test_resume_over_a_hostile_state_file_starts_over(tmp_path: Path, make_ckpt, monkeypatch) -> None:
    """A state.json nested 100,000 deep (RecursionError in the stdlib parser) is not reused, and is no crash."""
    ckpt = make_ckpt("memoryllm")
    out = tmp_path / "out.safetensors"
    ref = interrupted_run(ckpt, out, monkeypatch, layers=1)
    (tmp_path / ".out.safetensors.partial" / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    notes: list[str] = []
    precompute(ckpt, out, resume=True, note=notes.append, dtype="fp32")
    assert out.read_bytes() == ref and not any(n.startswith("resuming") for n in notes)
