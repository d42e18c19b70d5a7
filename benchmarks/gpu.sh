#!/usr/bin/env bash
# tolcli on a GPU (issue 15, item 6): the CUDA tests, GPU-vs-CPU agreement checks and the GPU benchmarks at the
# paper's shapes, in under 5 minutes on one modern GPU. Prints ratios to torch.mm and to the write bandwidth.
#
#   bash benchmarks/gpu.sh                 # needs an NVIDIA GPU and a CUDA build of torch >= 2.4
#   PYTHON=/path/to/python bash benchmarks/gpu.sh
#   GPU_VOCAB=32000 GPU_HIDDEN=512 GPU_FFN=1366 bash benchmarks/gpu.sh      # smaller shapes
#
# Exit status: 0 when every check passed, 1 when there is no usable GPU or a check failed (the failing check is
# named on stderr). GPU_SH_DEVICE=cpu runs the same Python on the CPU with small shapes: a self-test of this
# script for machines without a GPU, not a measurement (pinned-memory parts are skipped).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
die() {
    echo "gpu.sh: error: $*" >&2
    exit 1
}

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || die "no Python at '$PY' (set PYTHON=...)"
"$PY" -c 'import tolcli, torch' 2>/dev/null || die "'$PY' cannot import tolcli and torch (pip install -e '.[dev]')"

DEVICE=${GPU_SH_DEVICE:-cuda}
if [[ "$DEVICE" == cuda ]]; then
    command -v nvidia-smi >/dev/null 2>&1 || die "no GPU: nvidia-smi is not installed (this script needs an NVIDIA GPU)"
    nvidia-smi -L >/dev/null 2>&1 || die "no GPU: nvidia-smi sees no device"
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' ||
        die "torch $("$PY" -c 'import torch; print(torch.__version__)') cannot use the GPU (a CPU build? install a CUDA build of torch >= 2.4)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
elif [[ "$DEVICE" != cpu ]]; then
    die "GPU_SH_DEVICE must be cuda or cpu, got '$DEVICE'"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tolcli-gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

echo "== 1/3 CUDA tests (pytest -k 'cuda or gpu')"
set +e
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/
rc=$?
set -e
case $rc in
    0) ;;
    5) echo "gpu.sh: no test matched 'cuda or gpu' (nothing to run)" ;;
    124) die "the CUDA tests ran past 120 s" ;;
    *) die "the CUDA tests failed (pytest exit $rc)" ;;
esac

echo "== 2/3 GPU vs CPU agreement (demo model) and 3/3 GPU benchmarks"
cat >"$WORK/gpu_bench.py" <<'PYEOF'
"""The GPU checks and benchmarks of benchmarks/gpu.sh (written out and run by it)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._util import row
from benchmarks.paper_scale import Shape, step_checkpoint
from tolcli import demo_checkpoint_path, demo_heldout_path, eval_ppl, open_bundle, open_checkpoint, precompute
from tolcli.precompute import pipelined
from tolcli.runtime import HotTokenCache

DEV = torch.device(os.environ["GPU_SH_DEVICE"])
WORK = Path(os.environ["GPU_SH_WORK"])
FAILED: list[str] = []


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize(DEV)


def timed(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Best-of-``repeat`` wall time, device work included."""
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def check(name: str, ok: bool, detail: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def agreement() -> None:
    """precompute and eval-ppl on the device agree with the CPU; a device-resident cache returns the bundle's rows."""
    demo = demo_checkpoint_path()
    ref = precompute(demo, WORK / "cpu.safetensors", dtype="fp32", device="cpu").path
    for mm, tol in (("fp32", 1e-5), ("bf16", 2e-2)):
        out = precompute(demo, WORK / f"dev-{mm}.safetensors", dtype="fp32", device=str(DEV), matmul_dtype=mm).path
        with open_bundle(ref) as a, open_bundle(out) as b:
            worst = max(rel(b.dense_layer(i), a.dense_layer(i)) for i in a.present_layers)
        check(f"precompute {mm} matmuls on {DEV} vs CPU", worst <= tol, f"worst layer rel. error {worst:.2e} <= {tol:g}")
    ppl = {}
    for dev in ("cpu", str(DEV)):
        rep = eval_ppl(open_checkpoint(demo), [demo_heldout_path()], tols=[ref], ctx=128, max_tokens=4096, device=dev)
        ppl[dev] = [v["ppl"] for v in rep.variants]
    worst = max(abs(g / c - 1) for g, c in zip(ppl[str(DEV)], ppl["cpu"], strict=True))
    check(f"eval-ppl on {DEV} vs CPU", worst <= 1e-4, f"perplexities {ppl[str(DEV)]} vs {ppl['cpu']}")
    with open_bundle(ref) as b:
        ids = torch.randint(0, b.vocab_size, (4096,), generator=torch.Generator().manual_seed(0))
        cache = HotTokenCache(b, torch.arange(0, b.vocab_size, 2), device=DEV)
        same = torch.equal(cache.lookup_layers(ids).cpu(), b.lookup_layers(ids))
    check(f"hot-token cache on {DEV} (half the vocabulary resident)", same, "rows equal to the bundle's")


def bench_precompute(s: Shape) -> Path:
    """bf16 matmuls, bf16 tables at the paper shapes, against the same matmuls with torch.mm and a plain write."""
    step_checkpoint(s, WORK)
    out = WORK / "dense-bf16.safetensors"
    kw = dict(device=str(DEV), dtype="bf16", matmul_dtype="bf16", batch_rows=4096, force=True)
    t_pre = timed(lambda: precompute(WORK / "ckpt", out, **kw), repeat=2)
    nbytes = out.stat().st_size
    g = torch.Generator(device=DEV).manual_seed(0)
    dt = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    x = torch.randn(s.vocab, s.hidden, generator=g, device=DEV, dtype=dt)
    w1, w2 = (torch.randn(s.ffn, s.hidden, generator=g, device=DEV, dtype=dt) for _ in range(2))
    w3 = torch.randn(s.hidden, s.ffn, generator=g, device=DEV, dtype=dt)

    def mm() -> None:
        for _ in range(s.layers):
            for i in range(0, s.vocab, 4096):
                xb = x[i : i + 4096]
                torch.mm(torch.mm(xb, w1.T) * torch.mm(xb, w2.T), w3.T)

    t_mm = timed(mm)
    chunk = np.ones(64 << 20, dtype=np.uint8)

    def write() -> None:
        with open(WORK / "write-bound.bin", "wb") as f:
            for k in range(0, nbytes, chunk.size):
                f.write(chunk[: min(chunk.size, nbytes - k)])
            f.flush()
            os.fsync(f.fileno())

    t_write = timed(write, repeat=2)
    flops = s.layers * s.vocab * 6 * s.hidden * s.ffn
    print(row(f"precompute bf16 -> {nbytes / 1e9:.2f} GB on {DEV}", f"{t_pre:.2f} s"))
    print(row("  vs the same matmuls, torch.mm", f"{flops / t_mm / 1e12:.2f} TFLOP/s", t_mm / t_pre, "goal >= 0.8x if compute-bound"))
    print(row("  vs writing the same bytes (+fsync)", f"{nbytes / t_write / 1e9:.2f} GB/s", t_write / t_pre, "goal >= 0.8x if write-bound"))
    print(row("  vs max(mm, write): full overlap", "", max(t_mm, t_write) / t_pre, "1.00x = compute and writes overlap"))
    return out


def bench_pinned(s: Shape) -> None:
    """precompute's pinned-buffer pipeline (device -> host on a side stream) vs bare copies into pinned memory."""
    if DEV.type != "cuda":
        print("  (pinned-buffer overlap: CUDA only, skipped)")
        return
    batches = [torch.randn(4096, s.hidden, device=DEV) for _ in range(64)]
    nbytes = sum(b.nbytes for b in batches)
    pinned = torch.empty(batches[0].shape, pin_memory=True)
    t_bare = timed(lambda: [pinned.copy_(b) for b in batches])
    t_page = timed(lambda: [b.cpu() for b in batches])
    t_pipe = timed(lambda: [a.sum() for a in pipelined(iter(batches), DEV)])  # touch each host array, as a writer does
    print(row("device -> host, copy into one pinned buffer (bound)", f"{nbytes / t_bare / 1e9:.1f} GB/s"))
    print(row("device -> host, .cpu() into pageable memory", f"{nbytes / t_page / 1e9:.1f} GB/s", t_bare / t_page))
    print(row("precompute's pipelined() (4 pinned buffers, side stream)", f"{nbytes / t_pipe / 1e9:.1f} GB/s", t_bare / t_pipe))


def bench_lookups(bundle: Path) -> None:
    """All-layer lookups from a device-resident cache (every token hot) vs index_select and a device memcpy."""
    with open_bundle(bundle) as b:
        cache = HotTokenCache(b, torch.arange(b.vocab_size), device=DEV)
        for n in (1, 4096):
            ids = torch.randint(0, b.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
            dev_ids = ids.to(DEV)
            t = timed(lambda ids=ids: cache.lookup_layers(ids), repeat=20)
            t_sel = timed(lambda d=dev_ids: torch.index_select(cache.resident, 1, d), repeat=20)
            res = cache.lookup_layers(ids)
            t_cpy = timed(lambda r=res: r.clone(), repeat=20)
            label = f"cache.lookup_layers on {DEV}, {n:,} id{'s' if n > 1 else ''}, {len(b.present_layers)} layers"
            print(row(label, f"{t * 1e6:.1f} us"))
            print(row("  vs torch.index_select on the resident rows", f"{t_sel * 1e6:.1f} us", t_sel / t))
            print(row("  vs a device memcpy of the returned bytes", f"{res.nbytes / t_cpy / 1e9:.1f} GB/s", t_cpy / t))


def main() -> int:
    small = DEV.type == "cpu"
    env = {k: int(os.environ[f"GPU_{k.upper()}"]) for k in ("vocab", "hidden", "ffn", "layers") if os.environ.get(f"GPU_{k.upper()}")}
    s = Shape(**({"vocab": 4096, "hidden": 128, "ffn": 344} if small else {}) | env)
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(DEV) if DEV.type == 'cuda' else 'cpu (self-test)'}")
    print("-- agreement with the CPU (demo model)")
    agreement()
    print(f"-- benchmarks: vocab {s.vocab:,}, hidden {s.hidden:,}, FFN {s.ffn:,}, {s.layers} layers; ratio = bound time / measured")
    out = bench_precompute(s)
    bench_pinned(s)
    bench_lookups(out)
    if FAILED:
        print(f"gpu.sh: error: failed: {', '.join(FAILED)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
PYEOF

set +e
GPU_SH_DEVICE=$DEVICE GPU_SH_WORK=$WORK PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 240 "$PY" "$WORK/gpu_bench.py"
rc=$?
set -e
case $rc in
    0) ;;
    124) die "the GPU checks and benchmarks ran past 240 s" ;;
    *) die "a GPU check or benchmark failed (exit $rc; see above)" ;;
esac
echo "gpu.sh: all passed in $((SECONDS - START)) s"
