"""Evaluation data formats (tolcli/data.py, docs/data-formats.md): every format gives exactly the documents the test
wrote, every refusal is one InputError naming the file, and compressed input stops at the byte bound.

Expected documents are the lists the tests write; expected hashes come from ``hashlib`` over the bytes the tests
wrote; expected tokens from the tokenizer applied by the test to the documents it joined itself; Parquet and
``datasets`` files are written by pyarrow and datasets themselves (independent writers)."""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zstandard as zstd
from tokenizers import Tokenizer

from tests.conftest import require
from tolcli import demo_checkpoint_path, demo_heldout_path
from tolcli.cli._common import flag_for
from tolcli.data import DATA_SUFFIXES, MAX_DATA_BYTES, data_format, read_data
from tolcli.errors import ExitCode, InputError, TolcliError, UsageError
from tolcli.text import load_token_weights, read_tokens

DOCS = ["first document\nwith two lines", "second: ünïcödé ✓", "third\r\n", '{"looks": "like json"}']
TOKENIZER = Tokenizer.from_file(str(demo_checkpoint_path() / "tokenizer.json"))
COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "": lambda b: b,
    ".gz": lambda b: gzip.compress(b, mtime=0),
    ".zst": lambda b: zstd.ZstdCompressor(level=3).compress(b),
}


def _payload(kind: str, docs: list[str], field: str = "text") -> bytes:
    """The bytes of a file of ``docs`` in ``kind``, written with the stdlib's json (an independent writer)."""
    if kind in ("txt", "raw", "md"):
        return "\n\n".join(docs).encode("utf-8")
    if kind == "jsonl":
        return "".join(json.dumps({"id": i, field: d}) + "\n\n" for i, d in enumerate(docs)).encode("utf-8")
    if kind == "json-records":
        return json.dumps([{field: d, "id": i} for i, d in enumerate(docs)], indent=1).encode("utf-8")
    assert kind == "json-strings"
    return json.dumps(docs, ensure_ascii=False).encode("utf-8")


def _one_line(e: pytest.ExceptionInfo[TolcliError], path: Path, *needles: str) -> str:
    msg = str(e.value)
    assert isinstance(e.value, InputError) and "\n" not in msg and len(msg) < 1000, msg
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ---- every format gives the documents written -----------------------------------------------------------------
@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
@pytest.mark.parametrize("kind", ["txt", "raw", "md", "jsonl", "json-records", "json-strings"])
def test_every_text_format_gives_the_documents_written(tmp_path: Path, kind: str, compression: str) -> None:
    suffix = ".json" if kind.startswith("json-") else f".{kind}"
    raw = COMPRESS[compression](_payload(kind, DOCS))
    path = tmp_path / f"data{suffix}{compression}"
    path.write_bytes(raw)
    f = read_data(path)
    one_doc = kind in ("txt", "raw", "md")
    assert f.texts == (["\n\n".join(DOCS)] if one_doc else DOCS)
    assert f.format == {"raw": "txt", "md": "txt"}.get(kind, kind.split("-")[0])
    assert f.compression == {"": None, ".gz": "gzip", ".zst": "zstd"}[compression]
    assert f.sha256 == hashlib.sha256(raw).hexdigest() and f.ids is None and f.skipped == 0
    # read_tokens: the documents joined by a blank line, encoded once (the same tokens for every format)
    expected = TOKENIZER.encode("\n\n".join(DOCS)).ids
    assert read_tokens(path, TOKENIZER, 4096).tolist() == expected


def test_text_field_other_than_text(tmp_path: Path) -> None:
    for kind, name in [("jsonl", "a.jsonl"), ("json-records", "a.json")]:
        path = tmp_path / name
        path.write_bytes(_payload(kind, DOCS, field="body"))
        assert read_data(path, text_field="body").texts == DOCS
        with pytest.raises(InputError) as e:
            read_data(path)  # the default field, "text", is not there
        msg = _one_line(e, path, "no field 'text'", "'body'", "'id'")
        assert flag_for("text_field") == "--text-field" and "`text_field`" in e.value.hint  # type: ignore[operator]
        assert "--text-field" in e.value.one_line(flag_for) and "--text-field" not in msg
    assert read_tokens(tmp_path / "a.jsonl", TOKENIZER, 4096, text_field="body").tolist() == (
        TOKENIZER.encode("\n\n".join(DOCS)).ids
    )


def test_missing_field_and_wrong_type_name_the_line_or_record(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    # line 4 (blank lines count) lacks the field; its keys are listed
    jsonl.write_text('{"text": "a"}\n\n{"text": "b"}\n{"id": 7, "title": "x"}\n')
    with pytest.raises(InputError) as e:
        read_data(jsonl)
    _one_line(e, jsonl, "line 4:", "no field 'text'", "keys present: 'id', 'title'")
    jsonl.write_text('{"text": "a"}\n{"text": 12.5}\n')
    with pytest.raises(InputError) as e:
        read_data(jsonl)
    _one_line(e, jsonl, "line 2:", "field 'text' is a number, not a string")
    jsonl.write_text('{"text": "a"}\n["text"]\n')
    with pytest.raises(InputError) as e:
        read_data(jsonl)
    _one_line(e, jsonl, "line 2:", "expected an object", "got an array")
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"text": "a"}, "b", {"text": None}]))
    with pytest.raises(InputError) as e:
        read_data(js)
    _one_line(e, js, "record [2]:", "field 'text' is null")
    js.write_text(json.dumps([{"text": "a"}, 3]))
    with pytest.raises(InputError) as e:
        read_data(js)
    _one_line(e, js, "record [1]:", "expected a string or an object", "got a number")


def test_json_must_be_an_array(tmp_path: Path) -> None:
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"text": "a"}]}))
    with pytest.raises(InputError) as e:
        read_data(wrapped)
    _one_line(e, wrapped, "expected a JSON array", "got an object")
    assert "is not read" in (e.value.hint or "")
    lines = tmp_path / "lines.json"  # what datasets' to_json writes by default: JSON Lines under a .json name
    lines.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    with pytest.raises(InputError) as e:
        read_data(lines)
    _one_line(e, lines, "line 2 column 1")
    assert "name it .jsonl" in (e.value.hint or "")


def test_hostile_json_in_data_is_one_clean_error(tmp_path: Path) -> None:
    cases = {
        "nan.jsonl": '{"text": "a"}\n{"text": "b", "score": NaN}\n',
        "deep.json": "[" * 100 + "]" * 100,
        "big-int.json": '[{"text": "a", "n": ' + "9" * 5000 + "}]",
        "dup.jsonl": '{"text": "a", "text": "b"}\n',
    }
    needles = {"nan.jsonl": "line 2", "deep.json": "nested 100 levels", "big-int.json": "5,000 digits"}
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(InputError) as e:
            read_data(path)
        _one_line(e, path, needles.get(name, "appears twice"))


def test_empty_documents_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(["a", "", "  \n\t", "b", ""]))
    f = read_data(path)
    assert f.texts == ["a", "b"] and f.skipped == 3 and f.documents == 2
    path.write_text(json.dumps(["", " "]))
    with pytest.raises(InputError) as e:
        read_data(path)
    _one_line(e, path, "no documents (2 empty or whitespace-only)")
    for name, raw in [("e.txt", b""), ("e.jsonl", b"\n\n  \n"), ("e.txt.gz", gzip.compress(b"")), ("e.json", b"[]")]:
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(InputError) as e:
            read_data(tmp_path / name)
        _one_line(e, tmp_path / name, "empty file")


def test_non_utf8_text_names_the_byte(tmp_path: Path) -> None:
    raw = "héllo wörld".encode() + b"\xff" + b"tail"
    offset = len("héllo wörld".encode())  # 13: two 2-byte characters
    for name, data in [("t.txt", raw), ("t.txt.zst", COMPRESS[".zst"](raw))]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError) as e:
            read_data(tmp_path / name)
        _one_line(e, tmp_path / name, f"not UTF-8 text (invalid start byte at byte {offset}")


# ---- refused names --------------------------------------------------------------------------------------------
def test_unknown_suffixes_are_refused_never_guessed(tmp_path: Path) -> None:
    assert ".txt.gz" in DATA_SUFFIXES and ".json.zst" in DATA_SUFFIXES and ".parquet" in DATA_SUFFIXES
    for name, needle in [
        ("data.csv", "unknown data format '.csv'"),
        ("tokens.bin", "unknown data format '.bin'"),
        ("README", "unknown data format (no suffix)"),
        ("corpus.tar.gz", "unknown data format '.tar'"),
        ("ids.npy.gz", "compressed .npy files are not read"),
        ("t.parquet.zst", "compressed .parquet files are not read"),
    ]:
        path = tmp_path / name
        path.write_text("perfectly good text\n")  # the content would read as text: the name alone decides
        with pytest.raises(InputError) as e:
            read_data(path)
        _one_line(e, path, needle)
        if "unknown" in needle:
            assert ".jsonl" in (e.value.hint or "") and ".parquet" in (e.value.hint or "")
    assert data_format("WIKI.TEST.RAW") == ("txt", None) and data_format("a.JSONL.GZ") == ("jsonl", "gzip")


def test_cli_refuses_an_unknown_format_with_exit_4(tmp_path: Path, cli) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n")
    r = cli("eval-ppl", "demo", "--data", path, "--ctx", "32")
    assert r.code == ExitCode.BAD_INPUT and r.err.count("\n") == 1 and "unknown data format '.csv'" in r.err, r.err


# ---- the byte bound, bombs, damaged compressed files ---------------------------------------------------------
def _peak_while(call: Callable[[], object]) -> tuple[BaseException | None, int]:
    tracemalloc.start()
    try:
        call()
        err = None
    except TolcliError as e:
        err = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return err, peak


@pytest.mark.parametrize("compression", [".gz", ".zst"])
def test_a_decompression_bomb_stops_at_the_bound(tmp_path: Path, compression: str) -> None:
    zeros = 50 << 20
    path = tmp_path / f"bomb.txt{compression}"
    path.write_bytes(gzip.compress(bytes(zeros), 9) if compression == ".gz" else zstd.compress(bytes(zeros), 19))
    assert path.stat().st_size < 60_000  # 50 MB in at most ~51 KB: a bomb
    err, peak = _peak_while(lambda: read_data(path, max_bytes=1 << 20))
    assert isinstance(err, InputError), err
    assert "more than 1,048,576 bytes" in str(err) and "\n" not in str(err)
    assert peak < 12 << 20, f"{peak:,} bytes allocated to refuse a 1 MiB bound"  # 50 MiB if it had inflated all
    assert MAX_DATA_BYTES == 2 << 30


@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
def test_the_bound_is_exact(tmp_path: Path, compression: str) -> None:
    limit = 100_000
    fits = tmp_path / f"fits.txt{compression}"
    fits.write_bytes(COMPRESS[compression](b"x" * limit))
    assert read_data(fits, max_bytes=limit).texts == ["x" * limit]
    over = tmp_path / f"over.txt{compression}"
    over.write_bytes(COMPRESS[compression](b"x" * (limit + 1)))
    with pytest.raises(InputError) as e:
        read_data(over, max_bytes=limit)
    _one_line(e, over, "100,000")


def test_damaged_compressed_files_are_one_clean_error(tmp_path: Path) -> None:
    body = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(2000)).encode()
    gz, zs = COMPRESS[".gz"](body), COMPRESS[".zst"](body)
    cases = {
        "cut.jsonl.gz": (gz[: len(gz) // 2], "truncated gzip file"),
        "no-trailer.jsonl.gz": (gz[:-4], "truncated gzip file"),
        "garbage.jsonl.gz": (gz + b"garbage", "corrupted gzip data"),
        "not.jsonl.gz": (b"plain text, not gzip", "corrupted gzip data"),
        "cut.jsonl.zst": (zs[: len(zs) // 2], "truncated zstd file"),
        "header.jsonl.zst": (zs[:5], "truncated zstd file"),
        "garbage.jsonl.zst": (zs + b"garbage!", "corrupted zstd data"),
        "not.jsonl.zst": (b"plain text, not zstd", "corrupted zstd data"),
    }
    for name, (raw, needle) in cases.items():
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(InputError) as e:
            read_data(path)
        _one_line(e, path, needle)
    # several gzip members and several zstd frames are one stream, read whole
    expected = [f"document {i}" for i in range(2000)] * 2
    for name, raw in [("two.jsonl.gz", gz + gz), ("two.jsonl.zst", zs + zs)]:
        (tmp_path / name).write_bytes(raw)
        assert read_data(tmp_path / name).texts == expected


def test_plain_text_over_the_bound_is_refused_from_its_size(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "big.txt"
    path.write_bytes(b"y" * 5000)
    opened: list[str] = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    with pytest.raises(InputError) as e:
        read_data(path, max_bytes=4999)
    _one_line(e, path, "5,000 bytes (limit 4,999)")
    assert str(path) not in opened  # refused from the size, never opened


# ---- the case: a datasets-style .json export ---------------------------------------------------------
def test_json_export_of_the_demo_text_gives_the_jsonl_documents(tmp_path: Path) -> None:
    paragraphs = [p for p in demo_heldout_path().read_text(encoding="utf-8").split("\n\n") if p.strip()]
    assert len(paragraphs) > 400
    records = [{"id": i, "text": p} for i, p in enumerate(paragraphs)]
    (tmp_path / "held.json").write_text(json.dumps(records))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    exports = [tmp_path / "held.json"]
    datasets = require("datasets")
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(records).to_json(str(tmp_path / "hf.json"), lines=False)  # pandas: "\/" escapes
    exports.append(tmp_path / "hf.json")
    expected = TOKENIZER.encode("\n\n".join(paragraphs)).ids
    assert read_data(tmp_path / "held.jsonl").texts == paragraphs
    for path in exports:
        assert read_data(path).texts == paragraphs
        ids = read_tokens(path, TOKENIZER, 4096).tolist()
        assert ids == expected
        assert ids != TOKENIZER.encode(path.read_text(encoding="utf-8")).ids  # not the raw JSON text
    assert len(expected) > 18_000


# ---- Parquet -------------------------------------------------------------------------------------------------
@pytest.fixture
def parquet_file(tmp_path: Path) -> tuple[Path, list[str]]:
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")
    docs = [f"row {i}: " + "word " * (i % 5) for i in range(250)]
    table = pa.table({"id": list(range(250)), "body": docs, "score": [i / 3 for i in range(250)]})
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=64, compression="snappy")  # 4 row groups
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    return path, docs


def test_parquet_reads_the_named_string_column(parquet_file: tuple[Path, list[str]]) -> None:
    path, docs = parquet_file
    f = read_data(path, text_field="body")
    assert f.texts == docs and f.format == "parquet" and f.compression is None
    assert f.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_tokens(path, TOKENIZER, 4096, text_field="body").tolist() == TOKENIZER.encode("\n\n".join(docs)).ids
    with pytest.raises(InputError) as e:
        read_data(path)
    _one_line(e, path, "no column 'text'", "'id', 'body', 'score'")
    with pytest.raises(InputError) as e:
        read_data(path, text_field="score")
    _one_line(e, path, "column 'score' holds double, not strings")
    with pytest.raises(InputError) as e:
        read_data(path, text_field="body", max_bytes=1000)  # refused from the footer's declared sizes
    _one_line(e, path, "declares 250 rows", "1,000")


def test_parquet_nulls_binary_and_nested_columns_are_refused(tmp_path: Path) -> None:
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")
    cases = {
        "null.parquet": (pa.array(["a", "b", None, "d"]), "row 2: field 'text' is null"),
        "binary.parquet": (pa.array([b"a"], pa.binary()), "holds binary, not strings"),
        "nested.parquet": (pa.array([{"x": "a"}]), "holds struct<x: string>, not strings"),
    }
    for name, (arr, needle) in cases.items():
        pq.write_table(pa.table({"text": arr}), tmp_path / name, row_group_size=2)
        with pytest.raises(InputError) as e:
            read_data(tmp_path / name)
        _one_line(e, tmp_path / name, needle)
    pq.write_table(pa.table({"text": pa.array(["x", "yy"], pa.large_string())}), tmp_path / "large.parquet")
    assert read_data(tmp_path / "large.parquet").texts == ["x", "yy"]


def test_corrupt_parquet_is_one_input_error(parquet_file: tuple[Path, list[str]], tmp_path: Path) -> None:
    path, _ = parquet_file
    raw = path.read_bytes()
    footer = int.from_bytes(raw[-8:-4], "little")  # the footer's length, from the format's last 8 bytes
    flipped = bytearray(raw)
    for i in range(len(raw) - 8 - footer, len(raw) - 8, 5):  # damage the footer itself
        flipped[i] ^= 0xA5
    cases = {
        "half.parquet": raw[: len(raw) // 2],
        "no-magic.parquet": raw[:-1],
        "footer.parquet": bytes(flipped),
        "text.parquet": b"id,body\n1,hello\n",
        "empty.parquet": b"",
    }
    for name, data in cases.items():
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(InputError) as e:
            read_data(bad, text_field="body")
        _one_line(e, bad, "not a readable Parquet file")


def test_a_missing_optional_package_names_the_extra(
    parquet_file: tuple[Path, list[str]], tmp_path: Path, monkeypatch
) -> None:
    path, _ = parquet_file
    (tmp_path / "ds").mkdir()
    for name in ("dataset_info.json", "state.json"):
        (tmp_path / "ds" / name).write_text("{}")
    (tmp_path / "ds" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data.arrow"}]}))
    (tmp_path / "ds" / "data.arrow").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UsageError, match=r"needs the pyarrow package") as e:
        read_data(path, text_field="body")
    assert e.value.hint == "pip install 'tolcli[parquet]'" and e.value.exit_code == ExitCode.USAGE
    with pytest.raises(UsageError, match=r"needs the datasets package") as e:
        read_data(tmp_path / "ds")
    assert e.value.hint == "pip install 'tolcli[datasets]'"


# ---- datasets directories ------------------------------------------------------------------------------------
def _save(ds, path: Path) -> Path:
    ds.save_to_disk(str(path))
    return path


def _sha256sum_lines_hash(directory: Path, names: list[str]) -> str:
    """The documented directory hash, rebuilt: sha256sum lines of the named files, sorted by name, hashed."""
    lines = [f"{hashlib.sha256((directory / n).read_bytes()).hexdigest()}  {n}\n" for n in sorted(names)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def test_datasets_directory_gives_its_rows(tmp_path: Path) -> None:
    datasets = require("datasets")
    datasets.disable_progress_bars()
    rows = ["alpha", "", "beta gamma", "  ", "δέλτα"]
    ds = datasets.Dataset.from_dict({"content": rows, "n": list(range(5))})
    d = _save(ds, tmp_path / "ds")
    f = read_data(d, text_field="content")
    assert f.texts == ["alpha", "beta gamma", "δέλτα"] and f.skipped == 2 and f.format == "datasets"
    state = json.loads((d / "state.json").read_text())
    names = ["dataset_info.json", "state.json", *(e["filename"] for e in state["_data_files"])]
    assert f.sha256 == _sha256sum_lines_hash(d, names)
    expected = TOKENIZER.encode("alpha\n\nbeta gamma\n\nδέλτα").ids
    assert read_tokens(d, TOKENIZER, 4096, text_field="content").tolist() == expected
    # calibration text from a directory: its hash is the directory hash (a file hash would fail on a directory)
    _, source = load_token_weights(4096, calibration=d, tokenizer=TOKENIZER, text_field="content")
    assert source["sha256"] == f.sha256 and source["tokens"] == len(expected)
    with pytest.raises(InputError) as e:
        read_data(d, text_field="n")
    _one_line(e, d, "column 'n' holds int64, not strings")
    with pytest.raises(InputError) as e:
        read_data(d)
    _one_line(e, d, "no column 'text'", "'content', 'n'")


def test_datasets_dict_and_foreign_directories_are_refused(tmp_path: Path) -> None:
    datasets = require("datasets")
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    dd = _save(datasets.DatasetDict({"test": ds, "train": ds}), tmp_path / "dd")
    with pytest.raises(InputError) as e:
        read_data(dd)
    _one_line(e, dd, "DatasetDict")
    assert str(dd / "test") in (e.value.hint or "")
    assert read_data(dd / "test").texts == ["a", "b"]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.txt").write_text("x")
    with pytest.raises(InputError) as e:
        read_data(plain)
    _one_line(e, plain, "not a saved datasets.Dataset")
    evil = _save(ds, tmp_path / "evil")
    (tmp_path / "secret.arrow").write_bytes(b"x")
    for listed in ["../secret.arrow", "/etc/passwd", ""]:
        (evil / "state.json").write_text(json.dumps({"_data_files": [{"filename": listed}]}))
        with pytest.raises(InputError) as e:
            read_data(evil)
        _one_line(e, evil, "must list the data files by plain name")
    arrow = _save(ds, tmp_path / "cut")
    data_file = next(arrow.glob("*.arrow"))
    data_file.write_bytes(data_file.read_bytes()[:200])
    with pytest.raises(InputError) as e:
        read_data(arrow)
    _one_line(e, arrow, "cannot load the datasets directory")


def test_datasets_directory_links_out_and_invalid_utf8_are_refused(tmp_path: Path) -> None:
    datasets = require("datasets")
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": ["alpha", "beta"]})
    outside = _save(ds, tmp_path / "outside")
    linked = _save(ds, tmp_path / "linked")
    data_file = next(linked.glob("*.arrow"))
    data_file.unlink()
    data_file.symlink_to(next(outside.glob("*.arrow")))  # the same bytes, but from outside the directory
    with pytest.raises(InputError) as e:
        read_data(linked)
    _one_line(e, linked, "is a link that leaves its directory")
    bad = _save(ds, tmp_path / "bad-utf8")
    data_file = next(bad.glob("*.arrow"))
    raw = data_file.read_bytes()
    assert raw.count(b"alpha") == 1  # Arrow IPC stores the string bytes as they are
    data_file.write_bytes(raw.replace(b"alpha", b"alph\xff"))
    with pytest.raises(InputError) as e:
        read_data(bad)
    _one_line(e, bad, "corrupted column 'text'", "UTF8")


# ---- token ids -----------------------------------------------------------------------------------------------
def test_npy_ids_are_checked_against_the_vocabulary(tmp_path: Path) -> None:
    ids = np.array([0, 5, 36], dtype=np.uint16)
    np.save(tmp_path / "ok.npy", ids)
    f = read_data(tmp_path / "ok.npy", vocab_size=37)
    assert f.format == "npy" and f.texts is None and f.ids.dtype == np.int64 and f.ids.tolist() == [0, 5, 36]
    assert f.sha256 == hashlib.sha256((tmp_path / "ok.npy").read_bytes()).hexdigest()
    with pytest.raises(InputError) as e:
        read_data(tmp_path / "ok.npy", vocab_size=36)
    _one_line(e, tmp_path / "ok.npy", "token id 36 is outside the vocabulary [0, 36)")
    np.save(tmp_path / "huge.npy", np.array([1, 2**64 - 1], dtype=np.uint64))  # would wrap to -1 as int64
    with pytest.raises(InputError) as e:
        read_data(tmp_path / "huge.npy")
    _one_line(e, tmp_path / "huge.npy", f"token id {2**64 - 1} is outside")
    np.save(tmp_path / "neg.npy", np.array([3, -1], dtype=np.int32))
    with pytest.raises(InputError) as e:
        read_data(tmp_path / "neg.npy", vocab_size=37)
    _one_line(e, tmp_path / "neg.npy", "token id -1 is outside")
    np.save(tmp_path / "2d.npy", np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(InputError) as e:
        read_data(tmp_path / "2d.npy")
    _one_line(e, tmp_path / "2d.npy", "expected 1-D integer token ids")
    np.save(tmp_path / "long.npy", np.zeros(1000, dtype=np.int64))
    with pytest.raises(InputError) as e:
        read_data(tmp_path / "long.npy", max_bytes=7999)
    _one_line(e, tmp_path / "long.npy", "exceed 7,999 bytes")
    assert read_data(tmp_path / "long.npy", max_bytes=8000).ids.shape == (1000,)  # type: ignore[union-attr]


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UsageError, match="text_field must be a non-empty field name"):
        read_data(tmp_path / "a.txt", text_field="")
    with pytest.raises(UsageError, match="max_bytes must be a positive integer"):
        read_data(tmp_path / "a.txt", max_bytes=0)
