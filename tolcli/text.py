"""Tokenizers and token streams: data files in (every format of :mod:`tolcli.data`), 1-D int64 tensors out.

Reading and checking the files is :func:`tolcli.data.read_data`'s job (regular files only, sizes bounded, hardened
JSON, ``.npy`` headers checked before a single element is read); this module encodes the documents and checks
every id against the vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from tolcli.bundle.spec import MAX_TOKENIZER_BYTES
from tolcli.data import DataFile, load_npy, npy_header, read_data
from tolcli.errors import InputError
from tolcli.fsutil import sha256_file
from tolcli.jsonsafe import cut, read_bytes, short


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    raw = read_bytes(path, max_bytes=MAX_TOKENIZER_BYTES, what="tokenizer")
    try:
        return Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # tokenizers raises its own exception types; UnicodeDecodeError too
        raise InputError(
            f"cannot load tokenizer ({cut(str(e), 200)})", path=path, hint="expected a tokenizers tokenizer.json"
        ) from None


def tokens_of(data: DataFile, tokenizer: Tokenizer | None, vocab_size: int) -> torch.Tensor:
    """The token ids of data read by :func:`~tolcli.data.read_data`: a ``.npy`` file's ids, or the documents
    joined by a blank line (``"\\n\\n"``) and encoded once. Every id is checked against ``vocab_size``."""
    if data.ids is not None:
        ids = torch.from_numpy(data.ids)
    else:
        if tokenizer is None:
            raise InputError("no tokenizer to encode this text", path=data.path, hint="pass --tokenizer tokenizer.json")
        ids = torch.tensor(tokenizer.encode("\n\n".join(data.texts or [])).ids, dtype=torch.long)
    if ids.numel() == 0:
        raise InputError("no tokens (empty file)", path=data.path)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise InputError(
            f"token id {hi if hi >= vocab_size else lo} is outside the vocabulary [0, {vocab_size})", path=data.path
        )
    return ids


def read_tokens(
    path: str | Path, tokenizer: Tokenizer | None, vocab_size: int, *, text_field: str = "text"
) -> torch.Tensor:
    """Token ids of a data path in any format :func:`~tolcli.data.read_data` reads (``docs/data-formats.md``):
    ``.npy`` ids, or text documents (``text_field`` of records) joined by blank lines and encoded once. Ids are
    checked against ``vocab_size``."""
    return tokens_of(read_data(path, text_field=text_field, vocab_size=vocab_size), tokenizer, vocab_size)


def load_token_weights(
    vocab_size: int,
    *,
    weights_file: str | Path | None = None,
    calibration: str | Path | None = None,
    tokenizer: Tokenizer | None = None,
    floor: float = 1.0,
    text_field: str = "text",
) -> tuple[torch.Tensor, dict]:
    """Per-token weights ``counts + floor`` (fp64 [vocab_size]) and a description for the manifest.

    Counts come from ``weights_file`` (a 1-D ``.npy`` of non-negative counts per token id) or from
    ``calibration`` data (any format of :func:`~tolcli.data.read_data`, records' ``text_field``) tokenised with
    ``tokenizer``. ``floor`` keeps unseen tokens from being ignored.
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
        counts = torch.from_numpy(np.array(load_npy(path), dtype=np.float64))
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
        data = read_data(path, text_field=text_field, vocab_size=vocab_size)
        ids = tokens_of(data, tokenizer, vocab_size)
        counts = torch.bincount(ids, minlength=vocab_size).double()
        source = {"source": "calibration", "name": path.name, "sha256": data.sha256, "tokens": ids.numel()}
    w = counts + floor
    if float(w.sum()) <= 0:
        raise InputError("all token weights are zero", hint="use --weight-floor > 0")
    source["floor"] = floor
    return w, source
