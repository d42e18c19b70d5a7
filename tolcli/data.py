"""Evaluation and calibration data: every accepted format read into documents (or token ids), bounded and checked.

:func:`read_data` reads one data path into a :class:`DataFile`: the documents of a text file, a JSON Lines or JSON
file (optionally gzip or zstd compressed), a Parquet file or a directory written by ``datasets``' ``save_to_disk``;
or the token ids of a ``.npy`` file. The format comes from the name alone (:data:`DATA_SUFFIXES`, case-insensitive)
or, for a directory, from the files ``datasets`` writes; nothing is ever guessed from the content.

Inputs are untrusted. Every file must be a regular file (a FIFO would block); text is bounded by ``max_bytes``
(:data:`MAX_DATA_BYTES`), checked from the file size before reading, or while decompressing, so that a gzip or zstd
bomb stops at the bound having decompressed at most a few MiB beyond it; JSON goes through the hardened loader
(:mod:`tolcli.jsonsafe`); a Parquet file's declared sizes and row count are checked from its footer before a row is
read, and the strings read are validated (offsets, UTF-8) before they become Python strings; a ``.npy`` header is
checked against the file size before a single element is read. Documents that are empty or only whitespace are
left out and counted (:attr:`DataFile.skipped`); a path with no document at all is an error.

This module needs neither torch nor a tokenizer (see :func:`tolcli.text.read_tokens`); pyarrow and datasets are
optional and imported only for the formats that need them.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import math
import os
import re
import stat
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import zstandard as zstd

from tolcli.errors import InputError, UsageError
from tolcli.fsutil import sha256_file
from tolcli.jsonsafe import cut, inside, load_file, loads, plain_file_name, regular_file, short

MAX_DATA_BYTES = 2 << 30  # 2 GiB of text (after decompression) or of ids per data path
MAX_DATA_RECORDS = 1 << 26  # 67,108,864 records (lines, array elements, rows) per data path
MAX_JSONL_LINE_BYTES = 64 << 20  # one .jsonl line
PARQUET_BATCH_BYTES = 64 << 20  # a Parquet read decodes at most about this much per batch (see _parquet_batch_rows)
PARQUET_MAX_BATCH_ROWS = 4096
BOM = "\ufeff"  # a UTF-8 byte order mark, decoded
ZSTD_MAX_WINDOW_BYTES = 1 << 27  # 128 MiB: zstd's default limit for levels <= 19 (what `zstd` writes)
# zstd expands one input byte into at most 32 KiB (a 4-byte RLE block of 128 KiB); input is fed in pieces small
# enough that one call cannot decompress much past the bound.
_ZSTD_MAX_EXPANSION = 1 << 15
_CHUNK = 1 << 20

TEXT_SUFFIXES = (".txt", ".raw", ".md")
RECORD_SUFFIXES = (".jsonl", ".json")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd"}
_FORMATS = {".txt": "txt", ".raw": "txt", ".md": "txt", ".jsonl": "jsonl", ".json": "json"}
_FORMATS |= {".parquet": "parquet", ".npy": "npy"}
DATA_SUFFIXES: tuple[str, ...] = (
    *_FORMATS,
    *(s + c for s in TEXT_SUFFIXES + RECORD_SUFFIXES for c in COMPRESSION_SUFFIXES),
)
FORMATS_HELP = (
    ".txt .raw .md .jsonl .json (each also as .gz or .zst), .parquet, .npy, "
    "or a directory written by datasets' save_to_disk"
)
DATASETS_FILES = ("dataset_info.json", "state.json")  # what makes a directory a saved datasets.Dataset


@dataclass(frozen=True)
class DataFile:
    """One data path, read.

    Attributes:
        path: the path as given.
        format: ``"txt"``, ``"jsonl"``, ``"json"``, ``"parquet"``, ``"datasets"`` or ``"npy"``.
        compression: ``"gzip"``, ``"zstd"`` or None.
        sha256: of the file's bytes as stored (compressed bytes for ``.gz`` / ``.zst``); for a ``datasets``
            directory, of the ``sha256sum`` lines of the files read (:func:`datasets_dir_sha256`).
        texts: the documents in order, empty ones left out (None for ``.npy``).
        ids: 1-D int64 token ids of a ``.npy`` file (None otherwise).
        skipped: how many empty (or whitespace-only) documents were left out.
    """

    path: Path
    format: str
    compression: str | None
    sha256: str
    texts: list[str] | None
    ids: np.ndarray | None
    skipped: int = 0

    @property
    def documents(self) -> int:
        """How many documents were kept (0 for token ids)."""
        return len(self.texts) if self.texts is not None else 0


def data_format(path: str | Path) -> tuple[str, str | None]:
    """``(format, compression)`` of a data file from its name (case-insensitive), refusing what is not accepted.

    Example:
        >>> data_format("wiki.test.raw"), data_format("c4-val.JSONL.gz"), data_format("x.json.zst")
        (('txt', None), ('jsonl', 'gzip'), ('json', 'zstd'))
        >>> data_format("ids.npy.gz")
        Traceback (most recent call last):
        tolcli.errors.InputError: ids.npy.gz: compressed .npy files are not read (hint: decompress it first)
    """
    path = Path(path)
    name = path.name.lower()
    compression = next((c for s, c in COMPRESSION_SUFFIXES.items() if name.endswith(s)), None)
    inner = Path(name.rsplit(".", 1)[0]).suffix if compression else Path(name).suffix
    fmt = _FORMATS.get(inner)
    if fmt in ("npy", "parquet") and compression:
        hint = "decompress it first" if fmt == "npy" else "Parquet compresses its columns itself: pass the .parquet"
        raise InputError(f"compressed {inner} files are not read", path=path, hint=hint)
    if fmt is None:
        what = short(inner, 60) if inner else "(no suffix)"
        raise InputError(f"unknown data format {what}", path=path, hint=f"use {FORMATS_HELP}")
    return fmt, compression


def read_data(
    path: str | Path, *, text_field: str = "text", vocab_size: int | None = None, max_bytes: int = MAX_DATA_BYTES
) -> DataFile:
    """Read one data path: documents (text, JSON Lines, JSON, Parquet, datasets directory) or token ids (.npy).

    ``text_field`` names the field (or column) holding the text in records; ``vocab_size``, when given, bounds
    ``.npy`` ids; ``max_bytes`` bounds the text (after decompression) or the ids' bytes.

    Example:
        >>> import tempfile, json
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "a.jsonl").write_text(json.dumps({"body": "one"}) + "\\n\\n" + json.dumps({"body": " "}) + "\\n")
        >>> f = read_data(d / "a.jsonl", text_field="body")
        >>> f.format, f.texts, f.skipped
        ('jsonl', ['one'], 1)
    """
    path = Path(path)
    if not isinstance(text_field, str) or not text_field:
        raise UsageError(f"`text_field` must be a non-empty field name, got {short(text_field, 80)}")
    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise UsageError(f"max_bytes must be a positive integer, got {short(max_bytes, 40)}")
    if path.is_dir():
        return _read_datasets_dir(path, text_field, max_bytes)
    size = regular_file(path, what="data file").st_size
    fmt, compression = data_format(path)
    if fmt == "npy":
        ids = _read_npy(path, vocab_size, max_bytes)
        return DataFile(path, "npy", None, sha256_file(path), None, ids)
    if fmt == "parquet":
        return _documents(path, "parquet", None, sha256_file(path), _read_parquet(path, text_field, max_bytes))
    if compression is None and size > max_bytes:
        raise InputError(f"data file has {size:,} bytes (limit {max_bytes:,})", path=path)
    raw, digest = _read_stream(path, compression, max_bytes)
    text = _utf8(raw, path, compression)
    del raw
    texts = _PARSERS[fmt](text, path, text_field)
    return _documents(path, fmt, compression, digest, texts)


def _documents(path: Path, fmt: str, compression: str | None, digest: str, texts: list[str]) -> DataFile:
    """The DataFile of ``texts``, empty ones left out; an error when nothing is left."""
    kept = [t for t in texts if t.strip()]
    if not kept:
        empty = not texts or texts == [""]
        what = "empty file: no documents" if empty else f"no documents ({len(texts):,} empty or whitespace-only)"
        raise InputError(what, path=path)
    return DataFile(path, fmt, compression, digest, kept, None, skipped=len(texts) - len(kept))


def _said(e: BaseException, limit: int = 200) -> str:
    """A third-party exception's message as one line, cut to ``limit`` characters."""
    return cut(" ".join(str(e).split()), limit)


# ---- bytes: plain, gzip, zstd ----------------------------------------------------------------------------------
class _Hashing:
    """A binary file whose bytes are hashed as they are read (``read`` only: what gzip and the zstd loop use)."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.sha = hashlib.sha256()
        self.mode = "rb"

    def read(self, n: int = -1) -> bytes:
        block = self._f.read(n)
        self.sha.update(block)
        return block

    def drain(self) -> None:
        """Hash whatever is left unread."""
        while self.read(_CHUNK):
            pass


def _read_stream(path: Path, compression: str | None, max_bytes: int) -> tuple[bytearray, str]:
    """The (decompressed) bytes of ``path``, at most ``max_bytes`` of them, and the SHA-256 of the stored bytes."""
    chunks = {None: _plain_chunks, "gzip": _gzip_chunks, "zstd": _zstd_chunks}[compression]
    out = bytearray()
    try:
        with _open_regular(path) as f:
            src = _Hashing(f)
            for chunk in chunks(src, max_bytes + 1, path):
                out += chunk
                if len(out) > max_bytes:
                    raise InputError(
                        f"data decompresses to more than {max_bytes:,} bytes (the limit on a data file's text); "
                        "stopped there",
                        path=path,
                        hint="split the file, or pass uncompressed text that fits the limit",
                    )
            src.drain()
    except OSError as e:
        raise InputError(f"cannot read data file: {e.strerror}", path=path) from None
    return out, src.sha.hexdigest()


def _open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for reading without blocking (``O_NONBLOCK``: a FIFO swapped in after the ``stat`` check
    would otherwise block the open forever), and refused unless the descriptor itself is a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError("data file is not a regular file (it changed after it was checked)", path=path)
    return os.fdopen(fd, "rb")


def _plain_chunks(src: _Hashing, budget: int, path: Path) -> Iterator[bytes]:
    while block := src.read(min(_CHUNK, budget)):
        yield block


def _gzip_chunks(src: _Hashing, budget: int, path: Path) -> Iterator[bytes]:
    """Decompressed gzip data (every member), in pieces of at most 1 MiB: nothing is decompressed ahead."""
    try:
        with gzip.GzipFile(fileobj=src, mode="rb") as g:  # type: ignore[call-overload]
            while block := g.read(_CHUNK):
                yield block
    except EOFError:
        raise InputError("truncated gzip file (the compressed stream ends early)", path=path) from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"corrupted gzip data ({_said(e, 120)})", path=path) from None


def _zstd_chunks(src: _Hashing, budget: int, path: Path) -> Iterator[bytes]:
    """Decompressed zstd data (every frame). Input goes in in pieces sized so that one call expands to about the
    remaining ``budget`` at most; a frame that does not end is an error (zstandard's readers do not say)."""
    dctx = zstd.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW_BYTES)
    dobj, pending = None, b""
    try:
        while True:
            piece = max(64, min(_CHUNK, budget // _ZSTD_MAX_EXPANSION))
            if not pending and not (pending := src.read(piece)):
                break
            dobj = dobj or dctx.decompressobj(write_size=_CHUNK)
            out = dobj.decompress(pending[:piece])
            pending = pending[piece:]
            budget -= len(out)
            yield out
            if dobj.eof:  # a frame ended: what follows it starts the next one
                pending, dobj = dobj.unused_data + pending, None
    except zstd.ZstdError as e:
        raise InputError(f"corrupted zstd data ({_said(e, 120)})", path=path) from None
    if dobj is not None:
        raise InputError("truncated zstd file (the last frame does not end)", path=path)


def _utf8(raw: bytearray, path: Path, compression: str | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"byte {e.start}" + (" of the decompressed data" if compression else "")
        raise InputError(f"not UTF-8 text ({e.reason} at {where})", path=path) from None


# ---- documents: text, JSON Lines, JSON ------------------------------------------------------------------------
_JSON_TYPES = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}
_JSON_TYPES |= {dict: "an object", type(None): "null"}


_SURROGATE = re.compile("[\ud800-\udfff]")
# One non-blank line of JSON Lines: anchored at a line start (so each line is tried once, in linear time).
# A byte order mark at the very start of the file is skipped.
_JSONL_LINE = re.compile("(?:\\A\ufeff|^)([ \t\r]*[^ \t\r\n][^\n]*)", re.MULTILINE)


def _unicode(text: str, where: str, path: Path) -> str:
    """``text`` unless it holds a lone surrogate (a JSON ``\\ud800`` escape): that is no Unicode text, and
    neither a tokenizer nor a UTF-8 byte count can take it."""
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise InputError(
            f"{where}: the text holds a lone surrogate {bad.group()!r} at character {bad.start()} (not Unicode text)",
            path=path,
            hint="fix the JSON escapes: a surrogate pair must be complete",
        )
    return text


def _record_text(obj: Any, where: str, field: str, path: Path, *, strings: bool) -> str:
    """The text of one record: ``obj[field]`` of an object (or ``obj`` itself when ``strings`` and a string)."""
    if strings and isinstance(obj, str):
        return _unicode(obj, where, path)
    if not isinstance(obj, dict):
        wanted = "a string or an object" if strings else "an object"
        raise InputError(
            f"{where}: expected {wanted} with a string field {short(field, 80)}, got {_JSON_TYPES[type(obj)]}",
            path=path,
        )
    if field not in obj:
        keys = ", ".join(short(k, 40) for k in list(obj)[:20]) + (", ..." if len(obj) > 20 else "")
        raise InputError(
            f"{where}: no field {short(field, 80)} (keys present: {keys or 'none'})",
            path=path,
            hint="name the field holding the text with `text_field`",
        )
    value = obj[field]
    if not isinstance(value, str):
        raise InputError(f"{where}: field {short(field, 80)} is {_JSON_TYPES[type(value)]}, not a string", path=path)
    return _unicode(value, where, path)


def _parse_txt(text: str, path: Path, field: str) -> list[str]:
    return [text]


def _parse_jsonl(text: str, path: Path, field: str) -> list[str]:
    """One record per non-blank line (lines end at ``\\n``; a trailing ``\\r`` is JSON whitespace; a byte order
    mark at the start of the file is ignored). Lines are found one at a time: blank lines cost no memory."""
    texts: list[str] = []
    n, seen = 1, 0
    for m in _JSONL_LINE.finditer(text):
        n, seen = n + text.count("\n", seen, m.start()), m.start()
        if len(texts) >= MAX_DATA_RECORDS:
            raise InputError(f"more than {MAX_DATA_RECORDS:,} records", path=path)
        obj = loads(m.group(1), path=path, what=f"line {n}", max_bytes=MAX_JSONL_LINE_BYTES)
        texts.append(_record_text(obj, f"line {n}", field, path, strings=False))
    return texts


def _parse_json(text: str, path: Path, field: str) -> list[str]:
    """A JSON array of records (objects holding ``field``) or of strings; nothing else."""
    only = "a .json data file must be one JSON array of records or strings"
    text = text.removeprefix(BOM)  # RFC 8259 lets a parser ignore it; datasets' JSON reader does
    _count_top_level(text, path)
    try:
        doc = loads(text, path=path, what="JSON data", max_bytes=len(text) + 1)
    except InputError as e:
        lines = text.lstrip().startswith("{") and "\n{" in text
        hint = "it looks like JSON Lines (one object per line): name it .jsonl" if lines else only
        raise InputError(e.message, path=path, hint=hint) from None
    if not isinstance(doc, list):
        raise InputError(
            f"expected a JSON array of records or strings, got {_JSON_TYPES[type(doc)]}",
            path=path,
            hint=f'{only}; an object wrapping one (such as {{"data": [...]}}) is not read',
        )
    if len(doc) > MAX_DATA_RECORDS:
        raise InputError(f"{len(doc):,} records (limit {MAX_DATA_RECORDS:,})", path=path)
    return [_record_text(obj, f"record [{i}]", field, path, strings=True) for i, obj in enumerate(doc)]


# A JSON string, or an unterminated one up to the end (so that the scan never retries: linear), or a bracket or comma.
_JSON_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)|[\[\]{},]', re.DOTALL)


def _count_top_level(text: str, path: Path) -> None:
    """Refuse a JSON array of more than :data:`MAX_DATA_RECORDS` elements before parsing it: parsed, every element
    costs a Python object (2 GiB of ``0,`` would be 8 GiB of list alone). Fewer commas than the limit prove it
    without a scan; otherwise the top-level commas are counted, stopping past the limit."""
    if text.count(",") < MAX_DATA_RECORDS:
        return
    depth = commas = 0
    for m in _JSON_STRUCTURE.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 1:
            commas += 1
            if commas >= MAX_DATA_RECORDS:
                raise InputError(f"a JSON array of more than {MAX_DATA_RECORDS:,} records", path=path)


_PARSERS: dict[str, Callable[[str, Path, str], list[str]]] = {
    "txt": _parse_txt,
    "jsonl": _parse_jsonl,
    "json": _parse_json,
}


# ---- Parquet and datasets directories (pyarrow) ---------------------------------------------------------------
def _optional(module: str, extra: str, what: str) -> Any:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise UsageError(
            f"reading {what} needs the {package} package, which is not installed",
            hint=f"pip install 'tolcli[{extra}]'",
        ) from None


def _check_bytes(nbytes: int, max_bytes: int, field: str, path: Path) -> None:
    if nbytes > max_bytes:
        raise InputError(f"column {short(field, 80)} holds more than {max_bytes:,} bytes (the limit)", path=path)


def _string_column(col: Any, path: Path, field: str, done: int) -> list[str]:
    """The strings of a pyarrow (chunked) array, validated first (offsets, UTF-8); nulls refused (``done`` rows
    came before this piece, for the row number in a message)."""
    pa = importlib.import_module("pyarrow")
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise InputError(
            f"column {short(field, 80)} holds {col.type}, not strings",
            path=path,
            hint="name the column holding the text with `text_field`",
        )
    try:
        col.validate(full=True)
    except (pa.ArrowException, ValueError) as e:
        raise InputError(f"corrupted column {short(field, 80)} ({_said(e, 160)})", path=path) from None
    if col.null_count:
        first = done + next(i for i, v in enumerate(col.is_null().to_pylist()) if v)
        raise InputError(f"row {first}: field {short(field, 80)} is null, not a string", path=path)
    return col.to_pylist()


def _no_column(field: str, names: list[str], path: Path) -> InputError:
    cols = ", ".join(short(n, 40) for n in names[:20]) + (", ..." if len(names) > 20 else "")
    return InputError(
        f"no column {short(field, 80)} (columns: {cols or 'none'})",
        path=path,
        hint="name the column holding the text with `text_field`",
    )


def _parquet_footer(pf: Any, path: Path, field: str, max_bytes: int) -> None:
    """Refuse, from the footer alone, a missing or nested column, or more rows or bytes than the limits."""
    meta, names = pf.metadata, pf.schema_arrow.names
    if field not in names:
        raise _no_column(field, names, path)
    j = next((j for j in range(meta.num_columns) if meta.schema.column(j).path == field), None)
    if j is None:  # a nested column (struct, list): its leaves have dotted paths
        raise InputError(
            f"column {short(field, 80)} holds {pf.schema_arrow.field(field).type}, not strings",
            path=path,
            hint="name the column holding the text with `text_field`",
        )
    declared = sum(meta.row_group(i).column(j).total_uncompressed_size for i in range(meta.num_row_groups))
    if meta.num_rows > MAX_DATA_RECORDS or declared > max_bytes:
        raise InputError(
            f"column {short(field, 80)} declares {meta.num_rows:,} rows and {declared:,} bytes "
            f"(limits {MAX_DATA_RECORDS:,} and {max_bytes:,})",
            path=path,
        )


def _parquet_batch_rows(group: Any, field: str) -> int:
    """Rows to decode at once from a row group so that one batch stays near :data:`PARQUET_BATCH_BYTES`.

    Dictionary and ``DELTA_BYTE_ARRAY`` (shared prefix) encodings store a repeated long string once: 3,000 rows of
    one 100 kB string take 439 bytes of file and declare 100 kB, yet decode to 300 MB. No value can be longer than
    its column chunk's uncompressed bytes, so batches of ``PARQUET_BATCH_BYTES // chunk bytes`` rows stay bounded and
    the byte bound stops the read at the first batch past it."""
    chunk = next(group.column(j) for j in range(group.num_columns) if group.column(j).path_in_schema == field)
    return max(1, min(PARQUET_MAX_BATCH_ROWS, PARQUET_BATCH_BYTES // max(1, chunk.total_uncompressed_size)))


def _read_parquet(path: Path, field: str, max_bytes: int) -> list[str]:
    """Column ``field`` of a Parquet file, row group by row group, its sizes checked from the footer first."""
    pa = _optional("pyarrow", "parquet", "Parquet files")
    pq = importlib.import_module("pyarrow.parquet")
    texts: list[str] = []
    used = 0
    try:
        pf = pq.ParquetFile(path)
        _parquet_footer(pf, path, field, max_bytes)
        for i in range(pf.metadata.num_row_groups):
            rows = _parquet_batch_rows(pf.metadata.row_group(i), field)
            for batch in pf.iter_batches(batch_size=rows, row_groups=[i], columns=[field], use_threads=False):
                col = batch.column(0)
                used += col.nbytes
                _check_bytes(used, max_bytes, field, path)
                texts += _string_column(col, path, field, len(texts))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"not a readable Parquet file ({_said(e, 200)})", path=path) from None
    return texts


def datasets_dir_sha256(files: list[Path]) -> str:
    """SHA-256 of the GNU ``sha256sum`` lines (``<hex>  <name>\\n``) of ``files``, sorted by name (bytes).

    That is ``sha256sum dataset_info.json state.json data-*.arrow | LC_ALL=C sort -k2 | sha256sum`` in the
    directory, for the data files its ``state.json`` lists."""
    lines = sorted((f.name.encode("utf-8"), f"{sha256_file(f)}  {f.name}\n") for f in files)
    return hashlib.sha256("".join(line for _, line in lines).encode("utf-8")).hexdigest()


def _datasets_files(path: Path) -> list[Path]:
    """The files a saved ``datasets.Dataset`` directory is read from, checked: regular, inside the directory."""
    if (path / "dataset_dict.json").exists():
        inside(path / "dataset_dict.json", path, what="data file")
        splits = load_file(path / "dataset_dict.json", what="dataset_dict.json")
        splits = splits.get("splits", []) if isinstance(splits, dict) else []
        example = next((s for s in splits if isinstance(s, str) and plain_file_name(s)), "test")
        raise InputError(
            "a datasets DatasetDict directory (several splits), not one split",
            path=path,
            hint=f"pass one split's directory, e.g. {path / example}",
        )
    if not all((path / name).exists() for name in DATASETS_FILES):
        raise InputError(
            "a directory that is not a saved datasets.Dataset (no dataset_info.json and state.json)",
            path=path,
            hint=f"pass a data file ({FORMATS_HELP})",
        )
    for name in DATASETS_FILES:  # links out are refused before a byte of them is read
        inside(path / name, path, what="data file")
    load_file(path / "dataset_info.json", what="dataset_info.json")  # hardened first: datasets parses it too
    state = load_file(path / "state.json", what="state.json")
    entries = state.get("_data_files") if isinstance(state, dict) else None
    names = [e.get("filename") if isinstance(e, dict) else None for e in entries or []]
    if not names or not all(plain_file_name(n) for n in names):
        raise InputError('state.json: "_data_files" must list the data files by plain name', path=path)
    files = [path / name for name in (*DATASETS_FILES, *names)]
    for f in files:
        inside(f, path, what="data file")
        regular_file(f, what=f"data file {f.name}")
    return files


def _read_datasets_dir(path: Path, field: str, max_bytes: int) -> DataFile:
    """A directory written by ``datasets.Dataset.save_to_disk``, loaded with ``datasets.load_from_disk``."""
    files = _datasets_files(path)
    datasets = _optional("datasets", "datasets", "a datasets directory")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets and pyarrow raise many types on damaged files
        raise InputError(
            f"cannot load the datasets directory ({type(e).__name__}: {_said(e, 200)})", path=path
        ) from None
    if not isinstance(ds, datasets.Dataset):
        raise InputError(f"expected one datasets.Dataset, got {type(ds).__name__}", path=path)
    if field not in ds.column_names:
        raise _no_column(field, ds.column_names, path)
    if ds.num_rows > MAX_DATA_RECORDS:
        raise InputError(f"{ds.num_rows:,} rows (limit {MAX_DATA_RECORDS:,})", path=path)
    col = ds.with_format("arrow")[field]  # memory-mapped: nothing is read until the strings are made
    _check_bytes(col.nbytes, max_bytes, field, path)
    texts = _string_column(col, path, field, 0)
    return _documents(path, "datasets", None, datasets_dir_sha256(files), texts)


# ---- token ids: .npy ------------------------------------------------------------------------------------------
def npy_header(path: Path, *, kinds: str, what: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file from its header alone, checked: a plain (non-object) dtype of one of
    ``kinds``, and data bytes exactly what the shape declares. Nothing is allocated from the header."""
    size = regular_file(path, what=what).st_size
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = f.tell()
    except (ValueError, OSError, SyntaxError, TypeError) as e:
        raise InputError(f"not a readable .npy file ({_said(e, 200)})", path=path) from None
    if dtype.hasobject or dtype.kind not in kinds or dtype.subdtype is not None or dtype.names is not None:
        wanted = "an integer or float" if "f" in kinds else "an integer"
        raise InputError(f"expected {what} of {wanted} dtype, got {short(str(dtype), 60)}", path=path)
    declared = dtype.itemsize * math.prod(shape)
    if declared != size - offset:
        raise InputError(
            f"the .npy header declares {short(shape, 80)} {dtype} ({declared:,} bytes) "
            f"but the file holds {size - offset:,} data bytes",
            path=path,
        )
    return tuple(shape), dtype


def load_npy(path: Path) -> np.ndarray:
    """A checked ``.npy`` (:func:`npy_header` first), memory-mapped: no pickle, nothing allocated from the header."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise InputError(f"not a readable .npy file ({_said(e, 200)})", path=path) from None


_ID_BYTES = np.dtype(np.int64).itemsize


def _read_npy(path: Path, vocab_size: int | None, max_bytes: int) -> np.ndarray:
    """1-D integer token ids as int64, every id checked (against ``vocab_size`` when given) before the cast."""
    shape, dtype = npy_header(path, kinds="iu", what="token ids")
    if len(shape) != 1:
        raise InputError(f"expected 1-D integer token ids, got {dtype} of shape {short(shape, 80)}", path=path)
    if shape[0] * _ID_BYTES > max_bytes:  # the int64 copy, not the file: uint8 ids would grow 8 times
        raise InputError(
            f"{shape[0]:,} token ids ({shape[0] * _ID_BYTES:,} bytes as int64) exceed {max_bytes:,} bytes (the limit)",
            path=path,
        )
    if shape[0] == 0:
        raise InputError("no token ids (an empty array)", path=path)
    arr = load_npy(path)
    lo, hi = int(arr.min()), int(arr.max())  # exact Python ints: a huge uint64 must not wrap negative
    limit = vocab_size if vocab_size is not None else 1 << 63
    if lo < 0 or hi >= limit:
        bad = lo if lo < 0 else hi
        bound = f"the vocabulary [0, {vocab_size})" if vocab_size is not None else "int64 ids >= 0"
        raise InputError(f"token id {bad} is outside {bound}", path=path)
    return np.array(arr, dtype=np.int64)  # a copy: the memory map is read-only
