"""The transformers integration: an exported directory loads with AutoModelForCausalLM (trust_remote_code) and
through the registered model type, matches tolcli's own forward, and generates; with and without a bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import require
from tolcli import CompressOptions, compress, demo_checkpoint_path, load_model, open_checkpoint, precompute
from tolcli.bundle.reader import open_bundle
from tolcli.errors import UsageError
from tolcli.generate import SamplingOptions, generate
from tolcli.strip import strip_checkpoint

IDS = torch.tensor([[701, 221, 15, 99, 4000, 7]])


@pytest.fixture(scope="module")
def hf():
    transformers = require("transformers")
    import tolcli.hf

    return transformers, tolcli.hf


@pytest.fixture(scope="module")
def made(tmp_path_factory, hf) -> dict[str, Path]:
    _, tolhf = hf
    d = tmp_path_factory.mktemp("hf")
    dense = precompute(demo_checkpoint_path(), d / "dense.safetensors", dtype="fp32").path
    int4 = compress(dense, d / "int4.safetensors", CompressOptions("int4")).path
    stripped = strip_checkpoint(demo_checkpoint_path(), d / "stripped").path
    return {
        "full": tolhf.export_hf(demo_checkpoint_path(), d / "full"),
        "stripped": tolhf.export_hf(stripped, d / "stripped-hf", tol=int4),
        "llama": tolhf.export_hf(demo_checkpoint_path("llama"), d / "llama"),
        "dense": dense,
        "int4": int4,
    }


def _tolcli_logits(kind: str, source_bundle: Path | None = None) -> torch.Tensor:
    model = load_model(open_checkpoint(demo_checkpoint_path(kind)))
    with torch.no_grad():
        if source_bundle is None:
            return model(IDS)
        with open_bundle(source_bundle) as b:
            return model(IDS, b.as_source())


@pytest.mark.parametrize("kind", ["full", "llama"])
def test_exported_directory_loads_offline_and_matches_tolcli(hf, made, kind: str, monkeypatch) -> None:
    transformers, _ = hf
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = transformers.AutoModelForCausalLM.from_pretrained(made[kind], trust_remote_code=True, dtype=torch.float32)
    assert type(m).__name__ == "TolcliForCausalLM"
    with torch.no_grad():
        out = m(IDS, labels=IDS)
    want = _tolcli_logits("memoryllm" if kind == "full" else "llama")
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
    # the loss is the mean next-token cross entropy, computed independently here
    ce = torch.nn.functional.cross_entropy(want[0, :-1], IDS[0, 1:])
    assert float(out.loss) == pytest.approx(float(ce), rel=1e-5)
    greedy = m.generate(IDS, max_new_tokens=6, do_sample=False)
    model = load_model(open_checkpoint(demo_checkpoint_path("memoryllm" if kind == "full" else "llama")))
    assert greedy[0, IDS.shape[1] :].tolist() == generate(model, IDS[0], options=SamplingOptions(6)).new_ids


def test_stripped_checkpoint_runs_from_its_bundle(hf, made, monkeypatch) -> None:
    transformers, _ = hf
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = json.loads((made["stripped"] / "config.json").read_text())
    assert config["tol"] == str(made["int4"].resolve()) and config["tolcli_stripped"] is True
    m = transformers.AutoModelForCausalLM.from_pretrained(made["stripped"], trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        logits = m(IDS).logits
    torch.testing.assert_close(logits, _tolcli_logits("memoryllm", made["int4"]), rtol=1e-5, atol=1e-5)
    assert m.generate(IDS, max_new_tokens=4, do_sample=False).shape == (1, IDS.shape[1] + 4)
    # a full checkpoint told to use a bundle: the dense fp32 bundle reproduces the FFNs
    m = transformers.AutoModelForCausalLM.from_pretrained(
        made["full"], trust_remote_code=True, dtype=torch.float32, tol=str(made["dense"])
    )
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, _tolcli_logits("memoryllm"), rtol=1e-4, atol=1e-4)


def test_registered_model_type_loads_without_remote_code(hf, made) -> None:
    transformers, tolhf = hf
    config = transformers.AutoConfig.from_pretrained(made["full"])
    assert isinstance(config, tolhf.TolcliConfig) and config.tolcli_model_type == "memoryllm"
    m = transformers.AutoModelForCausalLM.from_pretrained(made["full"], dtype=torch.float32)
    assert isinstance(m, tolhf.TolcliForCausalLM)


def test_export_refuses_a_stripped_checkpoint_without_bundle(hf, made, tmp_path: Path, cli) -> None:
    _, tolhf = hf
    stripped = strip_checkpoint(demo_checkpoint_path(), tmp_path / "s").path
    with pytest.raises(UsageError, match="stripped"):
        tolhf.export_hf(stripped, tmp_path / "x")
    r = cli("export-hf", "demo", "-o", tmp_path / "cli-hf")
    assert r.code == 0, r.err
    assert (tmp_path / "cli-hf" / "modeling_tolcli.py").is_file()
    assert cli("export-hf", "demo", "-o", tmp_path / "cli-hf").code == 6  # exists: --force
