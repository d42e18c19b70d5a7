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

# Recorded before the issue-12 restructuring.
FINGERPRINT = "x86_64 torch-2.13.0+cpu AVX2"
GOLDEN: dict[str, str] = {
    "d32.safetensors": "62db4c7ae10f8bb5b3864f8f43be33c72cff3fc2fc5a14dccb0912fae09dc31c",
    "d16.h5": "079880593a992e1a0079a62f76284e7ad404a686b15e83fdc90105a99bf9953c",
    "dbf16-sharded": "f59d461b3b1bdba194acbbbcb871672c019f790459b0bea0d92653d492566701",
    "int4.safetensors": "6f59ccc8998fc197162fcacf040b9940f18fbb29634b8fe4399f4bd4497e916d",
    "int4sym.h5": "87919fb06129ec8d48592cdf98e304ee03eb0562a8a432384f06ca6195f46368",
    "nf4.h5": "ced7aa5f15bab8e2ac2c6642e2a499a64d947befd6958413a38051dfbb370ed9",
    "int8.safetensors": "b0cac2446a2d166ed1332e7fe7ad864ef72641b6c2fdba7a717adbd0c88a3ad8",
    "fp16.safetensors": "4f902e78c405189077e1c8552f7e1958c5c6b1a14ebfe95883c80df4f8be4d03",
    "svd.safetensors": "6f7b69c73232cdb244f0da44f0f2dcaf18f7547b7b261131b1ffa375b01dc7e9",
    "svdratio.h5": "2eda22a3b0895015bebde533bfd4e78679412120157afa797a663afd1155dda8",
    "svdrand.safetensors": "7e132d40bc7d1b8c67e85798c1a28f5d9af1d8b44a114293723b44d1e20cfc2f",
    "svdint4.safetensors": "521b02624ae5a81a6f52c61e637a27d8c8a2cbd6db2aa37a14ef28e4c373be2c",
    "adaptive.h5": "9d36ab9b2d463dee326f21795dfdf6e89e1b2f2842c65f2b9985e953649f9137",
    "adaptive-nf4-energy.safetensors": "ead64d8f34a9e0913f0feb55d5528af0750368d500c8b51b02d8de1b828fd1dc",
    "weighted.safetensors": "3ef7f3129fe73d0895f865f218a3c87d464d952a8225fc34f17d09b754fab7cd",
    "sensitivity.safetensors": "ce3cc494a3c37827cb5e7d7031cdd6c7fa2eb80d5c994d75e5b9d8134f2c0f5d",
    "svd-sharded": "0d6f0c40a5a3c637a40ad3dfa9d10dac50c10f94acc4d1c5337d2ec134b629d9",
    "drop.h5": "ce33285a9d93d43e705b0dc45b566f0f82f5286d26f0b06d003fd2182c05c3ba",
    "conv.h5": "88e51a9c08e480a12dc6e6d6d817be3c0f3be442c3b07724f19f22e365f300f1",
    "conv-back.safetensors": "6f7b69c73232cdb244f0da44f0f2dcaf18f7547b7b261131b1ffa375b01dc7e9",
    "stripped": "40d74b535d1bc338abeed8a9aae0f01d1c7457a79e65682c4b0da86b00a7fc98",
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
