"""atheris harness for longer local fuzzing of the bundle readers (not run by pytest).

    pip install atheris
    python tests/fuzz/fuzz_bundle.py -atheris_runs=200000        # or: -max_total_time=600

Seeds are small safetensors and HDF5 bundles written at start-up; every input is written to a temp
file and read as a bundle. An exception that is not tolcli's own error type is a finding.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def seeds(directory: Path) -> list[bytes]:
    from tolcli import CompressOptions, compress, convert_bundle, precompute
    from tolcli.testing import tiny_config, write_random_checkpoint

    cfg = tiny_config("memoryllm", vocab_size=37, hidden_size=32, intermediate_size=32, num_hidden_layers=2)
    ck = write_random_checkpoint(directory / "ckpt", cfg)
    dense = precompute(ck, directory / "dense.safetensors", dtype="bf16").path
    q = compress(dense, directory / "q.safetensors", CompressOptions("int4", group_size=32)).path
    return [p.read_bytes() for p in (dense, q, convert_bundle(q, directory / "q.h5"))]


def main() -> None:
    import atheris

    with atheris.instrument_imports():
        from tests.fuzz.harness import read_everything
    work = Path(tempfile.mkdtemp())
    corpus = seeds(work)
    target = work / "input.bin"

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        seed = corpus[fdp.ConsumeIntInRange(0, len(corpus) - 1)]
        b = bytearray(seed)
        for _ in range(fdp.ConsumeIntInRange(1, 8)):
            b[fdp.ConsumeIntInRange(0, len(b) - 1)] = fdp.ConsumeIntInRange(0, 255)
        if fdp.ConsumeBool():
            del b[fdp.ConsumeIntInRange(0, len(b)) :]
        target.write_bytes(bytes(b))
        read_everything(target)

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
