"""Write docs/commands/NAME.md for every command: what it is for, its --help, and real output on the demo.

    python scripts/gen_command_pages.py        # about a minute; run after changing a command's output

The pages record output as it was when generated (timings vary); tests check that every command has a
page, not the figures in it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "commands"
HELD = "tolcli/demo/heldout.txt"

# (command, intro, example command lines run in a scratch directory, in order)
PAGES: list[tuple[str, str, list[str]]] = [
    ("info", "Describe a checkpoint before anything else: architecture, parameters, ToL sizes.", ["info demo"]),
    (
        "precompute",
        "Compute every context-free layer's ToL into a dense bundle.",
        ["precompute demo -o dense.safetensors", "precompute demo -o tol/ --dtype bf16 --max-shard-size 3MB"],
    ),
    ("inspect", "Read a bundle's manifest.", ["inspect int4.safetensors"]),
    (
        "verify",
        "Check every tensor's hash, shape, dtype and values.",
        ["verify int4.safetensors", "verify tol/ --json"],
    ),
    (
        "convert",
        "Move a bundle between safetensors and HDF5 (or a sharded directory), losslessly.",
        ["convert int4.safetensors -o int4.h5 --sha256sums SHA256SUMS"],
    ),
    (
        "compress",
        "Make a bundle smaller.",
        [
            "compress dense.safetensors -o int4.safetensors --scheme int4",
            "compress dense.safetensors -o svd.safetensors --scheme adaptive-svd --budget 0.25 "
            f"--calibration {HELD} --sensitivity demo",
        ],
    ),
    ("pack", "Compress a bundle for transport.", ["pack int4.safetensors -o int4.safetensors.zst"]),
    ("unpack", "Restore a packed bundle.", ["unpack int4.safetensors.zst -o back.safetensors"]),
    (
        "eval-ppl",
        "Measure what a bundle costs.",
        [
            f"eval-ppl demo --data {HELD} --ctx 128 --stride 64 --tol int4.safetensors --tol svd.safetensors "
            "--drop-last 1"
        ],
    ),
    ("drop", "Remove later layers from a bundle.", ["drop int4.safetensors -o int4-5.safetensors --drop-last 1"]),
    ("strip", "The deployable checkpoint, without the context-free FFNs.", ["strip demo -o active"]),
    (
        "sweep",
        "A grid of compressions and layer drops, evaluated together.",
        [f"sweep demo --data {HELD} -o sweep --schemes int4,nf4,drop --ctx 128 --max-tokens 4000"],
    ),
    (
        "bench-lookup",
        "Lookup throughput and the hot-token cache's hit rate.",
        [f"bench-lookup int4.safetensors --data {HELD} --cache-tokens 256"],
    ),
    (
        "generate",
        "Run what tolcli ships: text from a checkpoint, or a stripped checkpoint plus a bundle.",
        ['generate demo --prompt "def " -n 24', 'generate active --tol int4.safetensors --prompt "def " -n 24'],
    ),
    (
        "export-hf",
        "A checkpoint directory that transformers loads (trust_remote_code).",
        ["export-hf demo -o demo-hf"],
    ),
    ("schema", "The manifest's JSON Schema.", ["schema"]),
]


# Pages whose examples write what the others read: run first, whatever the pages' order.
PRODUCERS = ("precompute", "compress")


def run(args: str, cwd: Path, *, limit: int | None = 40) -> str:
    """What ``tolcli ARGS`` prints (stdout, then stderr); examples' output cut after ``limit`` lines (help never)."""
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "110", "PYTHONPATH": str(ROOT), "TOLCLI_HEARTBEAT_SECONDS": "1e9"}
    r = subprocess.run(
        [sys.executable, "-m", "tolcli", *shlex.split(args)], cwd=cwd, env=env, capture_output=True, text=True
    )
    text = (r.stdout + r.stderr).rstrip()
    lines = text.splitlines()
    if limit is not None and len(lines) > limit:
        text = "\n".join([*lines[: limit - 4], f"... ({len(lines) - limit + 4} more lines)"])
    if r.returncode != 0 and "--help" not in args:
        raise SystemExit(f"gen_command_pages: `tolcli {args}` failed ({r.returncode}):\n{text}")
    return text


def main() -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        (work / "tolcli").symlink_to(ROOT / "tolcli")  # so that tolcli/demo/heldout.txt resolves
        outputs = {}
        order = sorted(PAGES, key=lambda page: page[0] not in PRODUCERS)  # stable: producers first, then page order
        for name, _, examples in order:  # later examples use earlier outputs
            outputs[name] = [(ex, run(ex, work)) for ex in examples]
            outputs[name].insert(0, (f"{name} --help", run(f"{name} --help", work, limit=None)))
    for name, intro, _ in PAGES:
        parts = [f"# `tolcli {name}`\n", intro, "", "Reference: [cli.md](../cli.md#tolcli-" + name + ").", ""]
        for cmd, text in outputs[name]:
            parts += [f"```console\n$ tolcli {cmd}\n{text}\n```", ""]
        (DOCS / f"{name}.md").write_text("\n".join(parts), encoding="utf-8")
        print(f"wrote docs/commands/{name}.md")


if __name__ == "__main__":
    main()
