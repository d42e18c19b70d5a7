"""Byte-for-byte pins of every writing command's output on the demo model (the refactor guard of issue 12).

The SHA-256 values below were computed *before* the codebase was restructured, by the CLI calls listed here; a
refactor must reproduce them exactly. Dense tables come from matmuls and SVD from an eigendecomposition, whose
last bits depend on the CPU's BLAS kernels, so the pins hold for the machine class they were recorded on
(``FINGERPRINT``) and are skipped elsewhere; the CLI calls themselves must succeed everywhere.
Re-record (only for an intended format change): ``TOLCLI_GOLDEN_PRINT=1 pytest tests/test_golden_bundles.py -s``.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import pytest
import torch

from tolcli import demo_heldout_path
from tolcli.cli import main

# (name, argv with {d} = the scratch directory); outputs are name.
CALLS: list[tuple[str, list[str]]] = [
    ("d32.safetensors", ["precompute", "demo", "-o", "d32.safetensors"]),
    ("d16.h5", ["precompute", "demo", "-o", "d16.h5", "--dtype", "fp16"]),
    ("dbf16-sharded", ["precompute", "demo", "-o", "dbf16-sharded", "--dtype", "bf16", "--max-shard-size", "1MB"]),
    ("int4.safetensors", ["compress", "d32.safetensors", "-o", "int4.safetensors", "-s", "int4"]),
    (
        "int4sym.h5",
        ["compress", "d32.safetensors", "-o", "int4sym.h5", "-s", "int4", "--symmetric", "--group-size", "32"],
    ),
    ("nf4.h5", ["compress", "d32.safetensors", "-o", "nf4.h5", "-s", "nf4", "--group-size", "128"]),
    ("int8.safetensors", ["compress", "d32.safetensors", "-o", "int8.safetensors", "-s", "int8"]),
    ("fp16.safetensors", ["compress", "d32.safetensors", "-o", "fp16.safetensors", "-s", "fp16"]),
    ("svd.safetensors", ["compress", "d32.safetensors", "-o", "svd.safetensors", "-s", "svd", "--rank", "32"]),
    ("svdratio.h5", ["compress", "d32.safetensors", "-o", "svdratio.h5", "-s", "svd", "--ratio", "0.25"]),
    (
        "svdrand.safetensors",
        ["compress", "d32.safetensors", "-o", "svdrand.safetensors", "-s", "svd", "--rank", "24",
         "--svd-method", "randomized", "--seed", "3"],
    ),
    (
        "svdint4.safetensors",
        ["compress", "d32.safetensors", "-o", "svdint4.safetensors", "-s", "svd+int4", "--rank", "32"],
    ),
    (
        "adaptive.h5",
        ["compress", "d32.safetensors", "-o", "adaptive.h5", "-s", "adaptive-svd", "--budget", "0.2"],
    ),
    (
        "adaptive-nf4-energy.safetensors",
        ["compress", "d32.safetensors", "-o", "adaptive-nf4-energy.safetensors", "-s", "adaptive-svd+nf4",
         "--energy", "0.9"],
    ),
    (
        "weighted.safetensors",
        ["compress", "d32.safetensors", "-o", "weighted.safetensors", "-s", "adaptive-svd+int8",
         "--budget", "0.3", "--calibration", "calib.txt"],
    ),
    (
        "sensitivity.safetensors",
        ["compress", "d32.safetensors", "-o", "sensitivity.safetensors", "-s", "adaptive-svd",
         "--budget", "0.2", "--calibration", "calib.txt", "--sensitivity", "demo"],
    ),
    ("svd-sharded", ["compress", "d32.safetensors", "-o", "svd-sharded", "-s", "svd", "--rank", "16",
                     "--max-shard-size", "200KB", "--format", "hdf5"]),
    ("drop.h5", ["drop", "int4.safetensors", "-o", "drop.h5", "--drop-last", "2"]),
    ("conv.h5", ["convert", "svd.safetensors", "conv.h5"]),
    ("conv-back.safetensors", ["convert", "conv.h5", "conv-back.safetensors"]),
    ("stripped", ["strip", "demo", "-o", "stripped"]),
]  # fmt: skip

# Recorded before the issue-12 restructuring; re-recorded for issue 14 (item 6), an intended format change: every
# manifest gains source.fingerprint, the stripped config.json tolcli_source_fingerprint, and compress --sensitivity
# records the checkpoint's directory name ("memoryllm", was the argument "demo"). Everything else, every tensor's
# sha256 included, was checked equal to the outputs of the previous pins.
FINGERPRINT = "x86_64 torch-2.13.0+cpu AVX2"
GOLDEN: dict[str, str] = {
    "d32.safetensors": "8a6762bcb5168a73e508520d3010817aa2431bc42d3fd87dde06a5275431c58c",
    "d16.h5": "fdab61bc7c195d45dba7a4a1a84ce0304205cc838aea96a099d3bfaad5677ca8",
    "dbf16-sharded": "39048425b8885242211ce6fc4fd77e51b797385004c6d82047aad21c04ba86d5",
    "int4.safetensors": "b5e859f82e536b643477b9ebeff5462e2395a19ed6f5af14f04f9e8907e11d5a",
    "int4sym.h5": "045956236c24683f23b1322dfbbb4749e094c9d8b6b270ff5ee126404d00d0a8",
    "nf4.h5": "da7713c0d2904af5f6d7368342aafa0afb2ad13e72835695b0ac4f9275c3128f",
    "int8.safetensors": "7aba3f6d3d19c01f23765e0f6fd6a6145acf685dba8915150872f36561948ad4",
    "fp16.safetensors": "03460f3c00a1a3a1eb18cfa725465ffcf1867cf7f017ebc8f27fac15565c992f",
    "svd.safetensors": "0f43d46e18bab556fc921e063920627c6dc9a5fa4cc2b6c1b81af8469abcf04f",
    "svdratio.h5": "e1190c21e248d7cc6ad5c16b10162df029dfc607fbe34a8224602dd550017c67",
    "svdrand.safetensors": "fce9992f1b563c16f05979aa4845e4f251a7982d9a206017f6ff9b6a38773c01",
    "svdint4.safetensors": "c2631085287efeb38e2a669c23ab7549a241c237dde208c79b9c25309d277a00",
    "adaptive.h5": "ea14279f1542ee2e5c3f7ec71b270a3577a5bcde567725eb8eff1fa938b737a5",
    "adaptive-nf4-energy.safetensors": "103f4eeb737d923d9736330164109cbba06e3efed0c6207c984c99536aeaa1c7",
    "weighted.safetensors": "f3003831a06d662716caa99fcb44c9bee86c9b636342c8ac4ca7948d1f070325",
    "sensitivity.safetensors": "77b9eff43fc35657450c64e15edcdb55ca739f06916fb4d661dec050ef25d49f",
    "svd-sharded": "38aa9686766828e735c0ae24cbe6570b02cf5aa735ad43d7fb761c7d5999470a",
    "drop.h5": "4596bd6ba16adaefe1c68e95ff5885f65ef20185cb8b4d51c1249603a0892677",
    "conv.h5": "a0edf5de1f27460a5e8603c13ce4b6a11615497648de0a3927a22e721c98852d",
    "conv-back.safetensors": "0f43d46e18bab556fc921e063920627c6dc9a5fa4cc2b6c1b81af8469abcf04f",
    "stripped": "a9a5f3daa5eb210395e73a1132bb490b0e17b1637ecb17bd98de81450e649295",
}


def fingerprint() -> str:
    return f"{platform.machine()} torch-{torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


def digest(path: Path) -> str:
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    lines = [f"{p.relative_to(path)} {digest(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("golden")
    (d / "calib.txt").write_text(demo_heldout_path().read_text(encoding="utf-8")[:20000], encoding="utf-8")
    got = {}
    env = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = "1700000000"
    cwd = Path.cwd()
    os.chdir(d)
    try:
        for name, argv in CALLS:
            code = main([*argv, "--quiet"])
            assert code == 0, f"{name}: tolcli {' '.join(argv)} exited {code}"
            got[name] = digest(d / name)
    finally:
        os.chdir(cwd)
        if env is None:
            os.environ.pop("SOURCE_DATE_EPOCH", None)
        else:
            os.environ["SOURCE_DATE_EPOCH"] = env
    if os.environ.get("TOLCLI_GOLDEN_PRINT"):
        print(f'\nFINGERPRINT = "{fingerprint()}"')
        for name, sha in got.items():
            print(f'    "{name}": "{sha}",')
    return got


def test_every_writing_call_succeeds_and_is_pinned(outputs: dict[str, str]) -> None:
    assert set(outputs) == {name for name, _ in CALLS}
    if fingerprint() != FINGERPRINT:
        pytest.skip(f"pins recorded on {FINGERPRINT!r}, this is {fingerprint()!r}")
    assert set(GOLDEN) == set(outputs)
    wrong = {name: sha for name, sha in outputs.items() if GOLDEN[name] != sha}
    assert not wrong, f"bytes changed: {sorted(wrong)}"
