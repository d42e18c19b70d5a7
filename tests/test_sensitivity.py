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

    @torch.no_grad()
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


class _Bumped:
    """The model's own context-free terms, with ``delta`` added at one (layer, position) of one window."""

    def __init__(self, model, layer: int, pos: int, delta: torch.Tensor):
        self.model, self.layer, self.pos, self.delta = model, layer, pos, delta

    def __call__(self, layer: int, token_ids: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        term = self.model.model.layers[layer].memory_term(x0)
        if layer == self.layer and self.pos is not None:
            term = term.clone()
            term[0, self.pos] += self.delta
        return term


@pytest.mark.parametrize(("n", "ctx"), [(23, 8), (25, 8), (9, 8)])
def test_sensitivity_with_several_windows_equals_finite_differences(make_ckpt, n: int, ctx: int) -> None:
    """Brute force: the text is cut into disjoint windows of ctx positions (the last shorter); the loss is the
    summed cross-entropy of all n-1 targets; S[l, t] sums, over every position holding t, the squared norm of
    d loss / d (layer l's term at that position), each gradient by central differences, one coordinate at a
    time, in float64. Token 5 occurs three times (in different windows when n > ctx): the sum over occurrences
    counts."""
    h = 8
    model = load_model(open_checkpoint(make_ckpt("memoryllm", vocab_size=53, hidden_size=h, intermediate_size=16)))
    torch.manual_seed(1)
    x = torch.randperm(53)[:n]
    x[[1, n // 2, n - 3]] = 5
    S, counts = token_sensitivity(model, x, ctx=ctx, batch_size=2)
    want_counts = torch.bincount(x[:-1], minlength=53).double()
    assert torch.equal(counts, want_counts)  # n - 1 positions, each once (the bug counted overlaps twice)
    assert counts.sum() == n - 1

    model = model.double()
    starts = list(range(0, n - 1, ctx))  # written out: [0, ctx, 2 ctx, ...], each window up to ctx positions

    def window_loss(s: int, src) -> float:
        e = min(s + ctx, n - 1)
        logits = model(x[None, s:e], src)
        return float(F.cross_entropy(logits[0], x[s + 1 : e + 1], reduction="sum"))

    want = torch.zeros(3, 53, dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        for layer in range(3):
            for s in starts:
                for pos in range(min(ctx, n - 1 - s)):
                    g2 = 0.0
                    for k in range(h):
                        d = torch.zeros(h, dtype=torch.float64)
                        d[k] = eps
                        up = window_loss(s, _Bumped(model, layer, pos, d))
                        down = window_loss(s, _Bumped(model, layer, pos, -d))
                        g2 += ((up - down) / (2 * eps)) ** 2
                    want[layer, int(x[s + pos])] += g2
    assert torch.allclose(S, want, rtol=1e-4, atol=1e-10)


def test_weights_floor_is_relative_to_each_layer() -> None:
    """By hand: 4 occurrences in all; layer 0's total is 6 (1.5 per occurrence), layer 1's is 1 (0.25)."""
    S = torch.tensor([[4.0, 0.0, 2.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    w = sensitivity_weights(S, torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64), 1.0)
    assert w.tolist() == [[5.5, 1.5, 3.5], [1.25, 0.25, 0.25]]
    w = sensitivity_weights(S, torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64), 2.0)
    assert w.tolist() == [[7.0, 3.0, 5.0], [1.5, 0.5, 0.5]]


def test_compress_with_sensitivity(tmp_path: Path, make_ckpt) -> None:
    from tolcli import demo_checkpoint_path

    dense = tmp_path / "d.safetensors"
    precompute(demo_checkpoint_path(), dense, dtype="fp32")
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
    with pytest.raises(UsageError, match="sensitivity needs calibration text"):
        compress(dense, tmp_path / "x.safetensors", CompressOptions("svd", rank=8, sensitivity="demo"))
    for other, msg in (("demo:llama", "no context-free FFN"), (str(make_ckpt("memoryllm")), "does not match")):
        with pytest.raises(InputError, match=msg):
            opts = CompressOptions("svd", rank=8, calibration=str(calib), sensitivity=other)
            compress(dense, tmp_path / "x.safetensors", opts)


def test_compress_device_is_where_the_sensitivity_passes_run(tmp_path: Path, cli, monkeypatch) -> None:
    # Issue 18: --device on compress reaches the sensitivity model (recorded here by wrapping load_model); a device
    # that is not there is a usage error (exit 2) before anything is written.
    import importlib

    from tolcli import demo_checkpoint_path

    C = importlib.import_module("tolcli.compress")  # the module (``tolcli.compress`` is the function)

    dense = precompute(demo_checkpoint_path(), tmp_path / "d.safetensors", dtype="fp32").path
    calib = tmp_path / "calib.txt"
    calib.write_text(demo_heldout_path().read_text()[:3000])
    seen: list[str] = []
    real = C.load_model

    def spy(ckpt, **kw):
        seen.append(str(kw.get("device")))
        return real(ckpt, **kw)

    monkeypatch.setattr(C, "load_model", spy)
    args = [
        "compress",
        dense,
        "-s",
        "adaptive-svd",
        "--budget",
        "0.25",
        "--calibration",
        calib,
        "--sensitivity",
        "demo",
    ]
    assert cli(*args, "-o", tmp_path / "a.safetensors", "--device", "cpu").code == 0 and seen == ["cpu"]
    if not torch.cuda.is_available():
        r = cli(*args, "-o", tmp_path / "b.safetensors", "--device", "cuda")
        assert r.code == 2 and "no CUDA device" in r.err and not (tmp_path / "b.safetensors").exists()
