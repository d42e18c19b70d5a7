"""precompute: exact against the model's own FFN term, streamed, deterministic, resumable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tolcli import load_model, open_bundle, open_checkpoint, precompute
from tolcli.errors import ExitCode, OutputError, UsageError
from tolcli.layout import ATTENTION, expected_tensors
from tolcli.testing import random_state_dict, tiny_config, write_checkpoint

CASES = {
    "plain": ("memoryllm", {}, {}),
    "gqa-odd-vocab": ("memoryllm", {"vocab_size": 203, "num_attention_heads": 8, "num_key_value_heads": 2}, {}),
    "tied-rmsnorm-alpha": (
        "memoryllm",
        {"tie_word_embeddings": True, "memory_norm_type": "rmsnorm", "ffn_alpha": 0.7},
        {"memory_norm_bias": False},
    ),
    "bf16-sharded": ("memoryllm", {}, {"dtype": torch.bfloat16, "layout": "sharded"}),
    "fp16-bin": ("memoryllm", {"vocab_size": 77}, {"dtype": torch.float16, "layout": "bin"}),
    "flex": ("flex_memoryllm", {"ffn_alpha": 1.5}, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("suffix", [".safetensors", ".h5"])
def test_dense_fp32_bundle_is_exact(tmp_path: Path, make_ckpt, case: str, suffix: str) -> None:
    model_type, cfg_over, ck_over = CASES[case]
    d = make_ckpt(model_type, **ck_over, **cfg_over)
    out = tmp_path / f"tol{suffix}"
    precompute(d, out, batch_rows=37, dtype="fp32")  # batches that do not divide the vocabulary
    ckpt = open_checkpoint(d)
    model = load_model(ckpt)
    cfg = ckpt.config
    with open_bundle(out, verify=True) as b, torch.no_grad():
        assert b.container == ("hdf5" if suffix == ".h5" else "safetensors")
        x0 = model.model.embed_tokens.weight
        for i in range(cfg.num_hidden_layers):
            ref = model.model.layers[i].memory_term(x0)
            got = b.dense_layer(i)
            assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5
        idx = torch.randint(0, cfg.vocab_size, (2, 29), generator=torch.Generator().manual_seed(0))
        assert (model(idx, b.as_source()) - model(idx)).abs().max().item() <= 1e-4
        e0 = b.manifest["layers"][0]
        assert e0["rel_error"] == 0.0 and e0["bits_per_value"] == 32.0
        assert e0["stored_bytes"] == cfg.vocab_size * cfg.hidden_size * 4


def test_precompute_reads_no_attention_weight(tmp_path: Path, make_ckpt) -> None:
    ckpt = open_checkpoint(make_ckpt("flex_memoryllm"))
    precompute(ckpt, tmp_path / "t.safetensors", dtype="fp32")
    specs = expected_tensors(ckpt.config)
    groups = {specs[n].group for n in ckpt.loaded}
    assert ATTENTION not in groups and "context_ffn" not in groups and groups == {"embedding", "memory_ffn"}


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_error_is_recorded(tmp_path: Path, make_ckpt, dtype: str) -> None:
    out = tmp_path / "t.h5"
    precompute(make_ckpt(), out, dtype=dtype)
    with open_bundle(out) as b:
        e = b.manifest["layers"][1]
        assert e["params"] == {"dtype": dtype.upper().replace("FP", "F")}
        bound = 2**-11 if dtype == "fp16" else 2**-8  # half a unit in the last place, relative
        assert 0 < e["rel_error"] <= bound
        assert b.tensor(e["tensors"]["table"]).dtype == (torch.float16 if dtype == "fp16" else torch.bfloat16)


def test_fp16_overflow_is_warned_and_recorded(tmp_path: Path) -> None:
    cfg = tiny_config("memoryllm", memory_norm_type="rmsnorm")
    state = random_state_dict(cfg, memory_norm_bias=False)
    state["model.layers.1.mlp.down_proj.weight"] *= 1e6
    d = write_checkpoint(tmp_path / "c", cfg, state)
    notes: list[str] = []
    precompute(d, tmp_path / "t.safetensors", dtype="fp16", note=notes.append)
    with open_bundle(tmp_path / "t.safetensors") as b:
        assert b.manifest["layers"][1]["fp16_overflow"] > 0 and b.manifest["layers"][0]["fp16_overflow"] == 0
        assert any("layer 1" in w and "bf16" in w for w in b.manifest["warnings"])
    assert any(n.startswith("warning: layer 1") for n in notes)


def test_llama_is_refused(tmp_path: Path, make_ckpt, cli) -> None:
    with pytest.raises(UsageError, match="no context-free FFN"):
        precompute(make_ckpt("llama"), tmp_path / "t.safetensors", dtype="fp32")
    assert cli("precompute", "demo:llama", "-o", tmp_path / "x.safetensors").code == ExitCode.USAGE


@pytest.mark.parametrize("suffix", [".safetensors", ".h5"])
def test_same_inputs_give_identical_bytes(tmp_path: Path, make_ckpt, suffix: str, monkeypatch) -> None:
    d = make_ckpt()
    a, b = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    precompute(d, a, dtype="bf16")
    precompute(d, b, dtype="bf16")
    assert a.read_bytes() == b.read_bytes()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    c = tmp_path / f"c{suffix}"
    precompute(d, c, dtype="bf16")
    with open_bundle(c) as bc:
        assert bc.manifest["created"] == "2023-11-14T22:13:20Z"
    assert c.read_bytes() != a.read_bytes()


class Boom(Exception):
    pass


class FailAfter:
    """A progress sink that interrupts the run after ``rows`` rows (a crash mid-layer)."""

    def __init__(self, rows: int):
        self.left = rows

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        self.left -= n
        if self.left <= 0:
            raise Boom

    def finish(self) -> None:
        pass


@pytest.mark.parametrize("suffix", [".safetensors", ".h5"])
def test_resume_after_interruption_gives_identical_bytes(tmp_path: Path, make_ckpt, suffix: str) -> None:
    d = make_ckpt(num_hidden_layers=5)
    ref = tmp_path / f"ref{suffix}"
    precompute(d, ref, batch_rows=40, dtype="fp32")
    out = tmp_path / f"out{suffix}"
    with pytest.raises(Boom):  # dies in the middle of layer 2 (101 rows per layer)
        precompute(d, out, batch_rows=40, progress=FailAfter(2 * 101 + 50), dtype="fp32")
    assert not out.exists()
    partial = tmp_path / f".out{suffix}.partial"
    assert sorted(json.loads((partial / "state.json").read_text())["layers"]) == ["0", "1"]
    with pytest.raises(UsageError, match="different inputs or options"):
        precompute(d, out, batch_rows=40, dtype="fp16", resume=True)
    notes: list[str] = []
    res = precompute(d, out, batch_rows=40, resume=True, note=notes.append, dtype="fp32")
    assert res.layers_computed == 3 and any("resuming: 2 layer(s)" in n for n in notes)
    assert out.read_bytes() == ref.read_bytes()
    assert not partial.exists()


def test_rerun_without_resume_never_deletes_staged_layers_silently(tmp_path: Path, make_ckpt) -> None:
    """Issue 18: an interrupted job rerun as it was continues (the same job fingerprint); rerun with other options
    it is refused (exit 2, the staged layer kept); --force discards it and starts over, to the same bytes."""
    d = make_ckpt()
    out, ref = tmp_path / "t.safetensors", tmp_path / "ref.safetensors"
    precompute(d, ref, dtype="fp32")
    partial = tmp_path / ".t.safetensors.partial"

    def interrupted() -> None:
        with pytest.raises(Boom):  # dies in layer 1 (101 rows per layer): layer 0 is staged
            precompute(d, out, batch_rows=40, progress=FailAfter(150), dtype="fp32")
        assert json.loads((partial / "state.json").read_text())["layers"].keys() == {"0"}

    interrupted()
    notes: list[str] = []
    assert precompute(d, out, batch_rows=40, note=notes.append, dtype="fp32").layers_computed == 2
    assert any(n.startswith("resuming: 1 layer(s)") for n in notes), notes
    assert out.read_bytes() == ref.read_bytes() and not partial.exists()
    out.unlink()
    interrupted()
    with pytest.raises(UsageError, match=r"1 layer\(s\) done, with different inputs or options"):
        precompute(d, out, batch_rows=40, dtype="fp16")
    assert json.loads((partial / "state.json").read_text())["layers"].keys() == {"0"}
    notes = []
    assert precompute(d, out, batch_rows=40, force=True, note=notes.append, dtype="fp32").layers_computed == 3
    assert any("removing the partial output" in n for n in notes), notes
    assert out.read_bytes() == ref.read_bytes()


def test_existing_output_needs_force(tmp_path: Path, make_ckpt) -> None:
    d = make_ckpt()
    out = tmp_path / "t.safetensors"
    precompute(d, out, dtype="fp32")
    before = out.read_bytes()
    with pytest.raises(OutputError, match="--force"):
        precompute(d, out, dtype="fp16")
    assert out.read_bytes() == before
    precompute(d, out, dtype="fp16", force=True)
    assert out.read_bytes() != before


def test_layers_subset_marks_the_rest_dropped(tmp_path: Path, make_ckpt) -> None:
    out = tmp_path / "t.safetensors"
    precompute(make_ckpt(num_hidden_layers=4), out, layers="0,2-", dtype="fp32")
    with open_bundle(out) as b:
        assert [e["status"] for e in b.manifest["layers"]] == ["present", "dropped", "present", "present"]
        assert sorted(b.layers) == [0, 2, 3]
        with pytest.raises(Exception, match="layer 1 is dropped"):
            b.lookup(1, [0])


@pytest.mark.parametrize(("spec", "msg"), [("5", "outside"), ("a-b", "bad layer spec"), (",", "selects no layer")])
def test_bad_layer_spec(tmp_path: Path, make_ckpt, spec: str, msg: str) -> None:
    with pytest.raises(UsageError, match=msg):
        precompute(make_ckpt(), tmp_path / "t.safetensors", layers=spec, dtype="fp32")


def test_cuda_requested_without_cuda(tmp_path: Path, make_ckpt) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match="no CUDA device"):
        precompute(make_ckpt(), tmp_path / "t.safetensors", device="cuda", dtype="fp32")


# VmHWM, not ru_maxrss: after fork+exec, ru_maxrss still counts the forked copy of the parent (pytest).
PEAK_SCRIPT = textwrap.dedent(
    """
    import sys
    from tolcli import precompute
    precompute(sys.argv[1], sys.argv[2], batch_rows=1024)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(int(hwm.split()[1]) * 1024)
    """
)


def test_peak_memory_does_not_grow_with_layers(tmp_path: Path) -> None:
    """2x the layers must add less than one layer table (32,000 x 256 fp32 = 32.8 MB) to peak RSS.

    Measured when written (VmHWM): about 300 MB at 4 layers and +9 MB at 8 (the extra layers' mmapped
    weights); the embedding is read zero-copy from the checkpoint's memory map."""
    peaks = {}
    for layers in (4, 8):
        cfg = tiny_config(
            "memoryllm",
            vocab_size=32000,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
        d = write_checkpoint(tmp_path / f"c{layers}", cfg, random_state_dict(cfg))
        r = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(d), str(tmp_path / f"t{layers}.safetensors")],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[layers] = int(r.stdout.strip().splitlines()[-1])
    table = 32000 * 256 * 4
    assert peaks[8] - peaks[4] < table, peaks


def test_reduced_precision_matmuls(tmp_path: Path, make_ckpt) -> None:
    d = make_ckpt(hidden_size=64, intermediate_size=128)
    ref = precompute(d, tmp_path / "fp32.safetensors", dtype="fp32").path
    out = precompute(d, tmp_path / "bf16mm.safetensors", matmul_dtype="bf16", dtype="fp32").path
    with open_bundle(ref) as a, open_bundle(out) as b:
        assert b.manifest["history"][0]["matmul_dtype"] == "bf16"
        for i in range(3):
            x, y = a.dense_layer(i), b.dense_layer(i)
            rel = float((x - y).norm() / x.norm())
            assert 1e-5 < rel < 2e-2  # bf16 inputs, fp32 accumulation
    with pytest.raises(UsageError, match="matmul_dtype must be one of"):
        precompute(d, tmp_path / "x.safetensors", matmul_dtype="int8", dtype="fp32")
