"""Peak memory of precompute for a synthetic model with L and 4L layers (goal: flat)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from benchmarks._models import synthetic_checkpoint
from benchmarks._util import row

SCRIPT = textwrap.dedent(
    """
    import sys
    from tolcli import precompute
    precompute(sys.argv[1], sys.argv[2], dtype="fp32", batch_rows=2048)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(int(hwm.split()[1]) * 1024)
    """
)


def run() -> list[str]:
    V, H, FFN = 32000, 512, 1024
    table = V * H * 4
    out = [
        f"synthetic memoryllm: vocab {V:,}, hidden {H}, fp32 tables of {table / 1e6:.1f} MB; peak RSS (VmHWM) of a "
        "fresh process"
    ]
    peaks = {}
    with tempfile.TemporaryDirectory() as d:
        for layers in (2, 8):
            ckpt = synthetic_checkpoint(Path(d) / f"c{layers}", vocab=V, hidden=H, ffn=FFN, layers=layers)
            r = subprocess.run(
                [sys.executable, "-c", SCRIPT, str(ckpt), str(Path(d) / f"t{layers}.safetensors")],
                capture_output=True,
                text=True,
                check=True,
            )
            peaks[layers] = int(r.stdout.split()[-1])
            out.append(
                row(f"{layers} layers ({layers * table / 1e6:.0f} MB of tables)", f"{peaks[layers] / 1e6:.0f} MB")
            )
    grow = peaks[8] - peaks[2]
    out.append(
        row(
            "growth from 2 to 8 layers",
            f"{grow / 1e6:+.1f} MB",
            peaks[8] / peaks[2],
            f"= {grow / table:.2f} tables (goal: flat)",
        )
    )
    return out
