"""Distributed precompute: 2 CPU processes under torchrun (gloo) give the single-process tensor hashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tolcli import open_bundle
from tolcli.bundle.sharded import INDEX_NAME


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in every process: bit-identical math
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_torchrun_matches_a_single_process(make_ckpt, tmp_path: Path) -> None:
    d = make_ckpt("memoryllm", num_hidden_layers=5, vocab_size=301)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r = run(
        [
            *torchrun,
            "-m",
            "tolcli",
            "precompute",
            str(d),
            "-o",
            "dist",
            "--max-shard-size",
            "40kB",
            "--batch-tokens",
            "64",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("wrote dist") == 1  # only rank 0 reports
    r = run(
        [sys.executable, "-m", "tolcli", "precompute", str(d), "-o", "one.safetensors", "--batch-tokens", "64"],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    with open_bundle(tmp_path / "dist", verify=True) as a, open_bundle(tmp_path / "one.safetensors") as b:
        assert {n: t["sha256"] for n, t in a.manifest["tensors"].items()} == {
            n: t["sha256"] for n, t in b.manifest["tensors"].items()
        }
        assert a.manifest["layers"] == b.manifest["layers"]
    index = json.loads((tmp_path / "dist" / INDEX_NAME).read_text())
    names = [s["name"] for s in index["shards"]]
    assert names == sorted(names) and names[-1].endswith(f"-of-{len(names):05d}.safetensors")
    assert not list(tmp_path.glob(".dist*"))  # no staging or temp directories left behind
