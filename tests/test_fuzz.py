"""Fuzzed bundles: every mangled input ends in a valid result or tolcli's own error, never another
exception, hang or huge allocation. 300 deterministic examples per reader (derandomized for CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import mutate, read_everything
from tolcli import CompressOptions, compress, convert_bundle, precompute
from tolcli.testing import tiny_config, write_random_checkpoint

MUTATIONS = st.tuples(
    st.sampled_from(["flip", "overwrite", "truncate", "header"]),
    st.integers(0, 1 << 20),
    st.integers(0, 255),
    st.integers(1, 64),
)
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("fuzz")
    cfg = tiny_config("memoryllm", vocab_size=37, hidden_size=32, intermediate_size=32, num_hidden_layers=2)
    ck = write_random_checkpoint(d / "ckpt", cfg)
    dense = precompute(ck, d / "dense.safetensors", dtype="bf16").path
    q = compress(dense, d / "q.safetensors", CompressOptions("int4", group_size=32)).path
    return {"safetensors": q.read_bytes(), "hdf5": convert_bundle(q, d / "q.h5").read_bytes()}


@pytest.mark.parametrize("kind", ["safetensors", "hdf5"])
def test_mangled_bundles_end_in_tolcli_errors(seeds: dict[str, bytes], tmp_path: Path, kind: str) -> None:
    target = tmp_path / ("x.h5" if kind == "hdf5" else "x.safetensors")
    outcomes: dict[str, int] = {}

    @FUZZ
    @given(mutations=st.lists(MUTATIONS, min_size=1, max_size=3))
    def check(mutations) -> None:
        data = seeds[kind]
        for op, pos, value, length in mutations:
            data = mutate(data, op, pos, value, length)
        target.write_bytes(data)
        result = read_everything(target)  # raises on anything but success or a TolcliError
        outcomes[result] = outcomes.get(result, 0) + 1

    check()
    assert sum(outcomes.values()) >= 300 and set(outcomes) - {"ok"}, outcomes  # errors were seen too
