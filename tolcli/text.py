"""Tokenizers and token streams: text (.txt, .jsonl) and token ids (.npy) in, 1-D int64 tensors out.

Inputs are untrusted: every file must be a regular file (a FIFO would block); ``.jsonl`` lines go through the
hardened JSON loader (:mod:`tolcli.jsonsafe`); a ``.npy`` header is read and its declared shape and dtype checked
(against the vocabulary, and against the file's size) before a single element is read, so a forged header cannot
make tolcli allocate terabytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from tolcli.bundle.spec import MAX_TOKENIZER_BYTES
from tolcli.errors import InputError
from tolcli.fsutil import sha256_file
from tolcli.jsonsafe import cut, loads, read_bytes, regular_file, short

MAX_JSONL_LINE_BYTES = 64 << 20


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    raw = read_bytes(path, max_bytes=MAX_TOKENIZER_BYTES, what="tokenizer")
    try:
        return Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # tokenizers raises its own exception types; UnicodeDecodeError too
        raise InputError(
            f"cannot load tokenizer ({cut(str(e), 200)})", path=path, hint="expected a tokenizers tokenizer.json"
        ) from None


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
        raise InputError(f"not a readable .npy file ({cut(str(e), 200)})", path=path) from None
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


def _load_npy(path: Path) -> np.ndarray:
    """A checked ``.npy`` (:func:`npy_header` first), memory-mapped: no pickle, nothing allocated from the header."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise InputError(f"not a readable .npy file ({cut(str(e), 200)})", path=path) from None


def read_tokens(path: str | Path, tokenizer: Tokenizer | None, vocab_size: int) -> torch.Tensor:
    """Token ids from ``.txt`` (whole file), ``.jsonl`` (a ``text`` field per line, joined by blank
    lines) or ``.npy`` (1-D integer ids). Ids are checked against ``vocab_size``."""
    path = Path(path)
    if not path.exists():
        raise InputError("data file not found", path=path)
    regular_file(path, what="data file")
    if path.suffix == ".npy":
        shape, dtype = npy_header(path, kinds="iu", what="token ids")
        if len(shape) != 1:
            raise InputError(f"expected 1-D integer token ids, got {dtype} of shape {short(shape, 80)}", path=path)
        arr = _load_npy(path)
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) >= vocab_size:
            hi = int(arr.max())  # before the cast to int64, which would wrap a huge uint64 into a negative id
            raise InputError(f"token id {hi} is outside the vocabulary [0, {vocab_size})", path=path)
        ids = torch.from_numpy(np.array(arr, dtype=np.int64))  # a copy: the memory map is read-only
    else:
        if tokenizer is None:
            raise InputError("no tokenizer to encode this text", path=path, hint="pass --tokenizer tokenizer.json")
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"not UTF-8 text ({e.reason} at byte {e.start})", path=path) from None
        if path.suffix == ".jsonl":
            texts = []
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                obj = loads(line, path=path, what=f"line {n}", max_bytes=MAX_JSONL_LINE_BYTES)
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise InputError(f'line {n}: expected an object with a "text" string', path=path)
                texts.append(obj["text"])
            raw = "\n\n".join(texts)
        ids = torch.tensor(tokenizer.encode(raw).ids, dtype=torch.long)
    if ids.numel() == 0:
        raise InputError("no tokens (empty file)", path=path)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise InputError(
            f"token id {hi if hi >= vocab_size else lo} is outside the vocabulary [0, {vocab_size})", path=path
        )
    return ids


def load_token_weights(
    vocab_size: int,
    *,
    weights_file: str | Path | None = None,
    calibration: str | Path | None = None,
    tokenizer: Tokenizer | None = None,
    floor: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """Per-token weights ``counts + floor`` (fp64 [vocab_size]) and a description for the manifest.

    Counts come from ``weights_file`` (a 1-D ``.npy`` of non-negative counts per token id) or from
    ``calibration`` text tokenised with ``tokenizer``. ``floor`` keeps unseen tokens from being ignored.
    """
    if (weights_file is None) == (calibration is None):
        raise InputError("give exactly one of `token_weights` and `calibration`")
    if not (floor >= 0 and np.isfinite(floor)):
        raise InputError(f"`weight_floor` must be a finite number >= 0, got {floor}")
    if weights_file is not None:
        path = Path(weights_file)
        if not path.exists():
            raise InputError("token weights file not found", path=path)
        shape, dtype = npy_header(path, kinds="iuf", what="token weights")
        if shape != (vocab_size,):  # bounded by the vocabulary before anything is read
            raise InputError(
                f"expected 1-D numeric counts of length {vocab_size}, got {dtype} {short(shape, 80)}", path=path
            )
        counts = torch.from_numpy(np.array(_load_npy(path), dtype=np.float64))
        if not torch.isfinite(counts).all() or (counts < 0).any():
            raise InputError("token weights must be finite and >= 0", path=path)
        source = {"source": "file", "name": path.name, "sha256": sha256_file(path)}
    else:
        path = Path(calibration)  # type: ignore[arg-type]
        if tokenizer is None:
            raise InputError(
                "the bundle has no embedded tokenizer to count calibration text with",
                hint="pass --token-weights counts.npy instead",
            )
        ids = read_tokens(path, tokenizer, vocab_size)
        counts = torch.bincount(ids, minlength=vocab_size).double()
        source = {"source": "calibration", "name": path.name, "sha256": sha256_file(path), "tokens": ids.numel()}
    w = counts + floor
    if float(w.sum()) <= 0:
        raise InputError("all token weights are zero", hint="use --weight-floor > 0")
    source["floor"] = floor
    return w, source
