"""Deployment memory and latency (the paper's Table 6 in ratio): generation from the full checkpoint vs stripped + ToLs.

For one model, four ways to run greedy KV-cached generation, each in a fresh process (peak RSS = VmHWM of that
process; ms/token = median step time over the generated tokens):

  (a) the full checkpoint, context-free FFNs computed;
  (b) the stripped checkpoint + the dense fp16 ToLs loaded into RAM;
  (c) the stripped checkpoint + the dense fp16 bundle memory-mapped (rows read per step);
  (d) the stripped checkpoint + an int4 bundle memory-mapped, through a hot-token cache of 1,024 tokens.

Each is reported as a ratio to (a), next to the paper's 6.04 / 9.54 = 0.63 (memory) and 14.4 / 21.5 = 0.67
(latency). Models: the demo, and a synthetic model with the paper's FFN-to-hidden ratio
(``TOLCLI_BENCH_DEPLOY=paper``: the 1B shapes, V=128,256, h=2,048, f=5,464, 2 layers: slow, the precompute alone
takes minutes; default: V=32,000, h=512, f=1,366, 4 layers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from benchmarks._models import synthetic_checkpoint
from benchmarks._util import row

PAPER_MEMORY, PAPER_LATENCY = 6.04 / 9.54, 14.4 / 21.5
NEW_TOKENS = 32

SCRIPT = textwrap.dedent(
    """
    import json, statistics, sys, time
    import torch
    from tolcli import load_model, open_checkpoint
    from tolcli.bundle.reader import open_bundle
    from tolcli.generate import SamplingOptions, bundle_step_source, generate
    from tolcli.model import TableSource
    from tolcli.runtime import HotTokenCache, hot_tokens

    args = json.loads(sys.argv[1])
    torch.manual_seed(0)
    ckpt = open_checkpoint(args["checkpoint"])
    model = load_model(ckpt, memory_ffn=args["mode"] == "full")
    source = None
    if args["mode"] == "ram":
        with open_bundle(args["tol"]) as b:  # the fp16 tables, whole, in RAM
            layers = [e for e in b.manifest["layers"] if e["status"] == "present"]
            source = TableSource({e["index"]: b.tensor(e["tensors"]["table"]) for e in layers})
    elif args["mode"] in ("mmap", "int4-cache"):
        b = open_bundle(args["tol"])
        hot = None
        if args["mode"] == "int4-cache":
            counts = torch.arange(ckpt.config.vocab_size, 0, -1).double()  # Zipf-like: small ids are frequent
            hot = HotTokenCache(b, hot_tokens(counts, 1024))
        source = bundle_step_source(b, cache=hot)
    prompt = torch.randint(0, min(ckpt.config.vocab_size, 4096), (16,)).tolist()
    res = generate(model, prompt, source=source, options=SamplingOptions(max_new_tokens=args["tokens"]))
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"rss": int(hwm.split()[1]) * 1024, "ms": 1000 * statistics.median(res.step_seconds)}))
    """
)


def _measure(checkpoint: Path, mode: str, tol: Path | None) -> dict[str, float]:
    arg = json.dumps({"checkpoint": str(checkpoint), "mode": mode, "tol": str(tol), "tokens": NEW_TOKENS})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: stable step times on a shared machine
    r = subprocess.run([sys.executable, "-c", SCRIPT, arg], capture_output=True, text=True, check=True, env=env)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _models(d: Path) -> list[tuple[str, Path]]:
    from tolcli import demo_checkpoint_path

    if os.environ.get("TOLCLI_BENCH_DEPLOY") == "paper":
        shape = {"vocab": 128_256, "hidden": 2048, "ffn": 5464, "layers": 2}
    else:
        shape = {"vocab": 32_000, "hidden": 512, "ffn": 1366, "layers": 4}
    name = f"synthetic V={shape['vocab']:,} h={shape['hidden']} f={shape['ffn']} L={shape['layers']}"
    return [
        ("demo (V=4,096 h=128 f=512 L=6)", demo_checkpoint_path()),
        (name, synthetic_checkpoint(d / "syn", **shape)),
    ]


def run() -> list[str]:
    from tolcli import CompressOptions, compress, precompute, strip_checkpoint

    out = [
        f"greedy generation of {NEW_TOKENS} tokens after a 16-token prompt; ratio to (a); "
        f"paper: memory {PAPER_MEMORY:.2f}, latency {PAPER_LATENCY:.2f}"
    ]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for label, ckpt in _models(d):
            work = d / label.split()[0]
            work.mkdir()
            dense = precompute(ckpt, work / "fp16.safetensors", dtype="fp16").path
            int4 = compress(dense, work / "int4.safetensors", CompressOptions("int4")).path
            stripped = strip_checkpoint(ckpt, work / "stripped").path
            base = _measure(ckpt, "full", None)
            out.append(f"  {label}")
            out.append(row("(a) full checkpoint", f"{base['rss'] / 1e6:.0f} MB {base['ms']:.2f} ms", 1.0))
            for name, mode, tol in (
                ("(b) stripped + fp16 ToLs in RAM", "ram", dense),
                ("(c) stripped + fp16 bundle mmap'd", "mmap", dense),
                ("(d) stripped + int4 bundle mmap'd + hot cache", "int4-cache", int4),
            ):
                m = _measure(stripped, mode, tol)
                out.append(row(f"{name}: memory", f"{m['rss'] / 1e6:.0f} MB", m["rss"] / base["rss"], "paper 0.63"))
                out.append(row(f"{name}: latency", f"{m['ms']:.2f} ms/token", m["ms"] / base["ms"], "paper 0.67"))
    return out
