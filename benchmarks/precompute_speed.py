"""precompute throughput vs bare torch.mm on the same FLOPs (goal >= 0.8x), and the cost of writing (goal <= 25%)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from benchmarks._models import synthetic_checkpoint
from benchmarks._util import best_of, row
from tolcli import open_checkpoint, precompute
from tolcli.layout import EMBED
from tolcli.model import load_memory_ffn

V, H, FFN, LAYERS, BATCH = 16384, 512, 1408, 2, 4096


def run() -> list[str]:
    flops = LAYERS * V * 3 * 2 * H * FFN
    out = [
        f"synthetic memoryllm: vocab {V:,}, hidden {H}, FFN {FFN}, {LAYERS} layers, fp32, batches of {BATCH} "
        f"rows ({flops / 1e9:.0f} GFLOP)"
    ]
    with tempfile.TemporaryDirectory() as d:
        ckpt_dir = synthetic_checkpoint(Path(d) / "ckpt", vocab=V, hidden=H, ffn=FFN, layers=LAYERS)
        ckpt = open_checkpoint(ckpt_dir)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(V, H, generator=g)
        w1, w2, w3 = (
            torch.randn(FFN, H, generator=g),
            torch.randn(FFN, H, generator=g),
            torch.randn(H, FFN, generator=g),
        )

        def bare_mm() -> None:  # the same matmuls, nothing else
            for _ in range(LAYERS):
                for s in range(0, V, BATCH):
                    xb = x[s : s + BATCH]
                    torch.mm(torch.mm(xb, w1.T) * torch.mm(xb, w2.T), w3.T)

        embed = ckpt.load(EMBED, dtype=None)

        def compute_only() -> None:  # tolcli's computation (norm, SwiGLU, alpha) without writing
            with torch.no_grad():
                for i in range(LAYERS):
                    ffn = load_memory_ffn(ckpt, i)
                    for s in range(0, V, BATCH):
                        ffn(embed[s : s + BATCH].float())

        t_mm = best_of(bare_mm)
        t_compute = best_of(compute_only)
        out.append(row("bare torch.mm, same FLOPs", f"{flops / t_mm / 1e9:,.1f} GFLOP/s"))
        out.append(
            row(
                "precompute, compute only",
                f"{flops / t_compute / 1e9:,.1f} GFLOP/s",
                t_mm / t_compute,
                "goal >= 0.8x of torch.mm",
            )
        )
        for suffix in (".safetensors", ".h5"):
            target = Path(d) / f"tol{suffix}"
            t_full = best_of(lambda t=target: precompute(ckpt, t, dtype="fp32", batch_rows=BATCH, force=True), repeat=2)
            size = target.stat().st_size
            out.append(
                row(
                    f"precompute -> {suffix[1:]} (writes {size / 1e6:.0f} MB)",
                    f"{t_full:.2f} s",
                    t_full / t_compute,
                    f"writing adds {100 * (t_full / t_compute - 1):.0f}% (goal <= 25%)",
                )
            )
    return out


if __name__ == "__main__":
    print("\n".join(run()), file=sys.stdout)
