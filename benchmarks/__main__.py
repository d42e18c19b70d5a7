"""``python -m benchmarks [NAME ...] [--list]``."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time

import torch

NAMES = (
    "precompute_speed",
    "peak_memory",
    "svd_speed",
    "compress_memory",
    "lookup_speed",
    "eval_speed",
    "deploy",
    "mixed_decode",
    "fit_chunks",
    "paper_scale",
)
SLOW = ("paper_scale",)  # 15-25 minutes on 2 cores: run only when named
DEFAULT = tuple(n for n in NAMES if n not in SLOW)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: {', '.join(DEFAULT)})")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args()
    if args.list:
        for n in NAMES:
            print(f"{n}: {importlib.import_module(f'benchmarks.{n}').__doc__.strip().splitlines()[0]}")
        return 0
    unknown = set(args.names) - set(NAMES)
    if unknown:
        print(f"unknown benchmark(s): {', '.join(sorted(unknown))}; see --list", file=sys.stderr)
        return 2
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, cuda: {cuda}")
    for name in args.names or DEFAULT:
        t0 = time.perf_counter()
        mod = importlib.import_module(f"benchmarks.{name}")
        print(f"\n[{name}] {mod.__doc__.strip().splitlines()[0]}")
        for line in mod.run():
            print(line, flush=True)
        print(f"  ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
