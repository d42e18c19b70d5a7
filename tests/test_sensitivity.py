"""Per-layer, per-token loss sensitivity: checked against finite differences, and wired into compress."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tolcli import CompressOptions, TableSource, compress, demo_heldout_path, load_model, open_checkpoint, precompute
from tolcli.errors import InputError, UsageError
from tolcli.sensitivity import sensitivity_weights, token_sensitivity


def test_sensitivity_equals_finite_differences(make_ckpt) -> None:
    model = load_model(open_checkpoint(make_ckpt("memoryllm", vocab_size=53, hidden_size=16, intermediate_size=24)))
    torch.manual_seed(0)
    x = torch.randperm(53)[:20]  # every token occurs once
    S, counts = token_sensitivity(model, x, ctx=19)
    assert counts.sum() == 19 and counts[x[-1]] == 0  # the last token is only a target
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        tables = {i: model.model.layers[i].memory_term(emb).double() for i in range(3)}
    model = model.double()

    def loss(tabs: dict[int, torch.Tensor]) -> float:
        logits = model(x[None, :-1], TableSource(tabs))
        return float(F.cross_entropy(logits[0], x[1:], reduction="sum"))

    base = loss(tables)
    layer, pos = 1, 4
    t = int(x[pos])
    eps = 1e-6
    grad = []
    for k in range(16):
        bumped = {i: v.clone() for i, v in tables.items()}
        bumped[layer][t, k] += eps
        grad.append((loss(bumped) - base) / eps)
    fd = sum(g * g for g in grad)
    assert S[layer, t].item() == pytest.approx(fd, rel=1e-3)


def test_weights_floor_is_relative_to_each_layer() -> None:
    S = torch.tensor([[4.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    w = sensitivity_weights(S, torch.tensor([2.0, 0.0], dtype=torch.float64), 1.0)
    assert w.tolist() == [[6.0, 2.0], [1.5, 0.5]]


def test_compress_with_sensitivity(tmp_path: Path, make_ckpt) -> None:
    from tolcli import demo_checkpoint_path

    dense = tmp_path / "d.safetensors"
    precompute(demo_checkpoint_path(), dense)
    calib = tmp_path / "calib.txt"
    calib.write_text(demo_heldout_path().read_text()[:20000])
    res = compress(
        dense,
        tmp_path / "s.safetensors",
        CompressOptions("adaptive-svd", budget="0.25", calibration=str(calib), sensitivity="demo"),
    )
    tw = res.manifest["history"][-1]["token_weights"]
    assert tw["source"] == "sensitivity" and len(tw["layer_sensitivity"]) == 6
    assert tw["layer_sensitivity"][0] > tw["layer_sensitivity"][5]  # later layers matter less
    assert all(e["params"]["weighted"] for e in res.manifest["layers"])
    with pytest.raises(UsageError, match="needs --calibration"):
        compress(dense, tmp_path / "x.safetensors", CompressOptions("svd", rank=8, sensitivity="demo"))
    for other, msg in (("demo:llama", "no context-free FFN"), (str(make_ckpt("memoryllm")), "does not match")):
        with pytest.raises(InputError, match=msg):
            opts = CompressOptions("svd", rank=8, calibration=str(calib), sensitivity=other)
            compress(dense, tmp_path / "x.safetensors", opts)
