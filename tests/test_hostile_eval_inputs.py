"""Adversarial review of the evaluation inputs (issue 14): data files, stored references and the Hugging Face cache.

Each test is an attack that got through (or cost unbounded memory) before its fix. Expected values are derived here:
line numbers by counting the newlines the test wrote, byte counts from ``itemsize`` and row counts, probability sums
by hand, the accepted reference by a numpy top-k (``argsort``) of a ``log_softmax`` the test computes itself, and
the byte order mark rule from RFC 8259 and Python's own ``utf-8`` codec (which keeps a BOM, as ``datasets``' text
reader and llama.cpp do)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import require
from tolcli import data as data_module
from tolcli.data import read_data
from tolcli.errors import InputError
from tolcli.hub import cached_snapshot
from tolcli.reference import META_KEY, load_reference

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging forever) when the block runs longer than ``seconds``."""

    def _raise(*_: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s: the reader blocked")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _refused(path: Path, *needles: str, **kwargs: Any) -> str:
    """read_data's one-line InputError naming ``path`` and every needle."""
    with pytest.raises(InputError) as e:
        read_data(path, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and len(msg) < 1000, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ---- JSON Lines: blank lines, line numbers, byte order marks, surrogates ---------------------------------------
def test_a_jsonl_of_blank_lines_costs_no_memory_per_line(tmp_path: Path) -> None:
    blank = 8 << 20
    path = tmp_path / "blank.jsonl"
    path.write_bytes(b"\n" * blank + b'{"text": 5}\n')  # the one record is on line blank + 1, and is wrong
    tracemalloc.start()
    try:
        msg = _refused(path, f"line {blank + 1}:", "is a number")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # the bytes and their decoded str are 16 MiB; a list of 8M lines would add 64 MiB of pointers alone
    assert peak < 40 << 20, f"{peak:,} bytes for {blank:,} blank lines ({msg})"


def test_jsonl_line_numbers_count_every_line_crlf_and_whitespace_included(tmp_path: Path) -> None:
    lines = ['{"text": "a"}', "", "  \t", '{"text": "b"}\r', "\r", '  {"text": "c"}  ', '{"id": 1}']
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
    wrong = len(lines)  # the last line, counted from 1 with the blank and whitespace-only ones
    _refused(path, f"line {wrong}:", "no field 'text'")
    path.write_text("\n".join(lines[:-1]), encoding="utf-8", newline="")
    assert read_data(path).texts == ["a", "b", "c"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".jsonl.gz"])
def test_a_byte_order_mark_before_json_is_ignored(tmp_path: Path, suffix: str) -> None:
    # RFC 8259 section 8.1: a parser MAY ignore a BOM; datasets' JSON reader strips it (pyarrow tolerates it)
    docs = ["first", "second ✓"]
    body = ("".join(json.dumps({"text": d}) + "\n" for d in docs) if ".jsonl" in suffix else json.dumps(docs)).encode(
        "utf-8"
    )
    raw = b"\xef\xbb\xbf" + body
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(gzip.compress(raw, mtime=0) if suffix.endswith(".gz") else raw)
    assert read_data(path).texts == docs


def test_a_byte_order_mark_inside_jsonl_or_before_text(tmp_path: Path) -> None:
    late = tmp_path / "late.jsonl"
    late.write_text('{"text": "a"}\n\ufeff{"text": "b"}\n', encoding="utf-8")
    _refused(late, "line 2:", "BOM")  # only the file's first bytes may be a BOM
    text = tmp_path / "bom.txt"
    text.write_bytes(b"\xef\xbb\xbfhello\r\nworld")
    # text is kept as Python's utf-8 codec decodes it (datasets' text reader, llama.cpp's raw read): BOM and CRLF
    with open(text, encoding="utf-8", newline="") as f:
        expected = f.read()
    assert expected[0] == "\ufeff" and read_data(text).texts == [expected]


def test_lone_surrogates_are_refused_and_pairs_are_one_character(tmp_path: Path) -> None:
    with pytest.raises(UnicodeEncodeError):  # why: no tokenizer or UTF-8 byte count can take such a string
        "a\ud800".encode("utf-8")
    cases = {
        "hi.jsonl": ('{"text": "ok"}\n{"text": "ab\\ud800c"}\n', "line 2:", "'\\ud800' at character 2"),
        "lo.json": ('["ok", {"text": "\\udc00"}]', "record [1]:", "'\\udc00' at character 0"),
        "str.json": ('["x\\ude00"]', "record [0]:", "'\\ude00' at character 1"),
    }
    for name, (content, where, what) in cases.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        _refused(tmp_path / name, where, what, "lone surrogate")
    (tmp_path / "pair.jsonl").write_text('{"text": "\\ud83d\\ude00"}\n', encoding="utf-8")
    assert read_data(tmp_path / "pair.jsonl").texts == [chr(0x1F600)]


def test_a_json_array_is_counted_before_it_is_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = 1000
    monkeypatch.setattr(data_module, "MAX_DATA_RECORDS", limit)
    zeros = tmp_path / "zeros.json"
    n = 2_000_000
    zeros.write_text("[" + "0," * (n - 1) + "0]")
    tracemalloc.start()
    try:
        _refused(zeros, f"more than {limit:,} records")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # 4 MB of bytes and 4 MB of str; the parsed list alone would be 16 MB of pointers
    assert peak < 14 << 20, f"{peak:,} bytes to refuse {n:,} elements"
    exact = tmp_path / "exact.json"
    exact.write_text(json.dumps(["x"] * limit))
    assert len(read_data(exact).texts or []) == limit  # 999 commas: at the limit, accepted
    exact.write_text(json.dumps(["x"] * (limit + 1)))
    _refused(exact, f"more than {limit:,} records")
    commas = tmp_path / "commas.json"  # commas inside strings and nested arrays are no records
    docs = ["a, b, " * 300 + '\\", [tricky]', *(f"doc {i}" for i in range(9))]
    commas.write_text(json.dumps(docs))
    assert read_data(commas).texts == docs
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps([[0] * 5000, "x"]))
    _refused(nested, "record [0]: expected a string or an object")


def test_paths_that_are_no_text_file_are_refused_before_reading(tmp_path: Path) -> None:
    # these held before the review; kept here so that they stay held
    (tmp_path / "dir.txt").mkdir()
    _refused(tmp_path / "dir.txt", "not a saved datasets.Dataset")  # a directory is never read as text
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    _refused(tmp_path / "zero.txt", "is special, not a regular file")
    os.mkfifo(tmp_path / "pipe.fifo")
    (tmp_path / "pipe.jsonl").symlink_to(tmp_path / "pipe.fifo")
    with deadline(10):
        _refused(tmp_path / "pipe.jsonl", "is a FIFO, not a regular file")
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as f:
        f.truncate((3 << 30) + 1)  # 3 GiB that take no disk space
    (tmp_path / "sparse.txt").symlink_to(sparse)
    _refused(tmp_path / "sparse.txt", f"{(3 << 30) + 1:,} bytes (limit {2 << 30:,})")


# ---- token ids -------------------------------------------------------------------------------------------------
def test_npy_bound_counts_the_int64_ids_not_the_file(tmp_path: Path) -> None:
    ids = np.arange(1000, dtype=np.uint8) % 200
    np.save(tmp_path / "u8.npy", ids)
    int64_bytes = ids.size * np.dtype(np.int64).itemsize  # 8,000: what read_data allocates for them
    assert (tmp_path / "u8.npy").stat().st_size < 1200  # 1,000 bytes of data: 8 times less than the copy
    too_small = int64_bytes - 1
    _refused(tmp_path / "u8.npy", "8,000 bytes as int64", f"exceed {too_small:,} bytes", max_bytes=too_small)
    assert read_data(tmp_path / "u8.npy", max_bytes=int64_bytes).ids.tolist() == ids.tolist()  # type: ignore[union-attr]


# ---- a path swapped for a FIFO after its check -----------------------------------------------------------------
def test_a_fifo_swapped_in_after_the_check_does_not_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "race.txt"
    path.write_text("innocent text")
    real = data_module.regular_file

    def check_then_swap(p: Any, **kwargs: Any) -> os.stat_result:
        st = real(p, **kwargs)
        os.unlink(p)
        os.mkfifo(p)  # what an attacker racing the reader does between stat and open
        return st

    monkeypatch.setattr(data_module, "regular_file", check_then_swap)
    with deadline(10):
        _refused(path, "not a regular file")


# ---- datasets directories: no file of the directory is read before its links are checked ----------------------
@pytest.mark.parametrize("name", ["dataset_info.json", "state.json", "dataset_dict.json"])
def test_datasets_json_files_linking_out_are_refused_unread(tmp_path: Path, name: str) -> None:
    d = tmp_path / "ds"
    d.mkdir()
    (d / "dataset_info.json").write_text("{}")
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data.arrow"}]}))
    (d / "data.arrow").write_bytes(b"")
    secret = tmp_path / "secret.json"
    secret.write_text("not json: a private file outside the directory")
    (d / name).unlink(missing_ok=True)
    (d / name).symlink_to(secret)
    msg = _refused(d, f"data file {name} is a link that leaves its directory")
    assert "invalid JSON" not in msg  # it was never parsed


# ---- Parquet: encodings that expand -------------------------------------------------------------------------------
_PARQUET_CHILD = textwrap.dedent(
    """
    import resource, sys
    from tolcli.data import read_data
    from tolcli.errors import InputError
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        read_data(sys.argv[1], max_bytes=int(sys.argv[2]))
        print("read", before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    except InputError as e:
        print("refused", before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, str(e))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
def test_a_parquet_dictionary_bomb_stops_at_the_bound(tmp_path: Path) -> None:
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")
    rows, width = 10_000, 100_000
    column = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array(["x" * width]))
    path = tmp_path / "bomb.parquet"
    # without the Arrow schema a reader sees a plain string column, dictionary-encoded (what most writers emit)
    pq.write_table(pa.table({"text": column}), path, compression="zstd", row_group_size=rows, store_schema=False)
    dense = rows * width  # 1 GB once decoded; the file holds the string once
    declared = pq.ParquetFile(path).metadata.row_group(0).column(0).total_uncompressed_size
    assert path.stat().st_size < 10_000 and declared < 2 * width  # the footer tells the truth: 1 string
    limit = 50 << 20
    out = subprocess.run(
        [sys.executable, "-c", _PARQUET_CHILD, str(path), str(limit)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    ).stdout.split(maxsplit=3)
    grew = (int(out[2]) - int(out[1])) * 1024  # ru_maxrss is in KiB on Linux
    assert out[0] == "refused" and f"more than {limit:,} bytes" in out[3], out
    assert grew < dense // 4, f"{grew:,} bytes of memory to refuse {dense:,} bytes of decoded text"


def test_parquet_batches_keep_every_row_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")
    docs = [f"row {i} " + "w" * (i % 7) for i in range(1000)]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": docs}), path, row_group_size=300)
    monkeypatch.setattr(data_module, "PARQUET_BATCH_BYTES", 1)  # one row per batch
    assert read_data(path).texts == docs
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a"] * 450 + [None] + ["b"]}), nulls, row_group_size=300)
    _refused(nulls, "row 450: field 'text' is null")


# ---- stored references ----------------------------------------------------------------------------------------
RUN = {"protocol": "tolcli", "ctx": 8, "tokens": [40, 24]}
VOCAB = 16


def _honest(n: int, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A real top-k: log_softmax of random logits, the k largest by numpy's argsort (not torch.topk)."""
    logp = torch.log_softmax(torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)), -1).numpy()
    ids = np.argsort(-logp, axis=1, kind="stable")[:, :k].astype(np.int32)
    return {
        "target_logp": logp[np.arange(n), np.arange(n) % VOCAB].astype(np.float32),
        "topk_ids": ids,
        "topk_logp": np.take_along_axis(logp, ids, 1).astype(np.float32),
    }


def _write_ref(path: Path, arrays: dict[str, np.ndarray], **meta: Any) -> Path:
    from safetensors.numpy import save

    n, k = arrays["topk_ids"].shape
    doc = {"format": "tolcli-reference", "version": 1, "name": "base", "top_k": k, "vocab_size": VOCAB}
    doc |= {"tokens": n, "run": RUN} | meta
    path.write_bytes(save(arrays, metadata={META_KEY: json.dumps(doc)}))
    return path


def _ref_refused(path: Path, needle: str, **kwargs: Any) -> None:
    with pytest.raises(InputError) as e:
        load_reference(path, run=RUN, vocab_size=VOCAB, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value), str(e.value)


def test_an_honest_reference_loads_exactly(tmp_path: Path) -> None:
    arrays = _honest(50, 4)
    ref = load_reference(_write_ref(tmp_path / "ok.safetensors", arrays), run=RUN, vocab_size=VOCAB, tokens_scored=50)
    assert np.array_equal(ref.topk_ids.numpy(), arrays["topk_ids"])
    assert np.array_equal(ref.topk_logp.numpy(), arrays["topk_logp"])
    full = _honest(10, VOCAB, seed=1)  # the whole vocabulary: probabilities sum to 1 within float32 rounding
    assert abs(float(np.log(np.exp(full["topk_logp"].astype(np.float64)).sum(1)).max())) < 1e-5
    load_reference(_write_ref(tmp_path / "full.safetensors", full), run=RUN, vocab_size=VOCAB)


def test_reference_token_counts_are_checked_before_reading(tmp_path: Path) -> None:
    most = sum(RUN["tokens"])  # 64: a run scores each of its tokens at most once
    over = _write_ref(tmp_path / "over.safetensors", _honest(most + 1, 2))  # shapes agree with the lying count
    _ref_refused(over, f"declares {most + 1} tokens; the run has {most}")
    fits = _write_ref(tmp_path / "fits.safetensors", _honest(most, 2))
    assert load_reference(fits, run=RUN, vocab_size=VOCAB).target_logp.numel() == most
    _ref_refused(fits, f"holds {most} tokens, this run scores 50", tokens_scored=50)
    for bad in (-1, "64", 64.0, True):
        _ref_refused(_write_ref(tmp_path / "t.safetensors", _honest(1, 1), tokens=bad), "tokens")


def test_a_boolean_top_k_is_refused(tmp_path: Path) -> None:
    # json true == 1 in Python: a top_k of true would pass an isinstance(int) check and the shape comparison
    _ref_refused(_write_ref(tmp_path / "b.safetensors", _honest(5, 1), top_k=True), "top-k True")


def test_references_that_are_no_top_k_of_a_distribution_are_refused(tmp_path: Path) -> None:
    def edited(name: str, edit: Any) -> Path:
        arrays = _honest(6, 3, seed=2)
        edit(arrays)
        return _write_ref(tmp_path / f"{name}.safetensors", arrays)

    def repeat(a: dict[str, np.ndarray]) -> None:
        a["topk_ids"][4, 2] = a["topk_ids"][4, 0]

    def unsorted(a: dict[str, np.ndarray]) -> None:
        a["topk_logp"][3] = a["topk_logp"][3, ::-1].copy()

    def mass(a: dict[str, np.ndarray]) -> None:  # 0.6 + 0.6 + 0.01 = 1.21 > 1: no distribution
        a["topk_logp"][1] = np.log(np.array([0.6, 0.6, 0.01], dtype=np.float32))

    _ref_refused(edited("repeat", repeat), "repeats a token id in a row")
    _ref_refused(edited("unsorted", unsorted), "is not sorted most likely first")
    _ref_refused(edited("mass", mass), "has probabilities summing past 1")

    def almost(a: dict[str, np.ndarray]) -> None:  # 0.5 + 0.3 + 0.2 = 1 exactly in real numbers: accepted
        a["topk_logp"][1] = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))

    load_reference(edited("almost", almost), run=RUN, vocab_size=VOCAB)


def test_a_reference_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "ref.safetensors"
    os.mkfifo(fifo)
    with deadline(10):
        _ref_refused(fifo, "is a FIFO")


# ---- the Hugging Face cache ----------------------------------------------------------------------------------------
def test_a_refs_folder_linking_out_of_the_repo_is_refused(tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "snapshots" / commit).mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "main").write_text(commit)
    (repo / "refs").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(InputError) as e:
        cached_snapshot(repo)
    assert "refs folder refs is a link that leaves its directory" in str(e.value), str(e.value)
    (repo / "refs").unlink()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert cached_snapshot(repo) == repo / "snapshots" / commit


def test_an_unterminated_string_of_escaped_quotes_is_refused_in_linear_time() -> None:
    # Expected: the depth check refuses 65 levels; before the fix the string scan alone took over a minute.
    from tolcli.errors import InputError
    from tolcli.jsonsafe import loads

    text = "[" * 65 + '"' + '\\"' * 20_000
    with deadline(2), pytest.raises(InputError, match="nested 65 levels"):
        loads(text, what="test")
