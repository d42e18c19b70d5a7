"""Tokenizers and token streams: text (.txt, .jsonl) and token ids (.npy) in, 1-D int64 tensors out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from tolcli.errors import InputError
from tolcli.fsutil import sha256_file


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise InputError(
            f"cannot load tokenizer ({e})", path=path, hint="expected a tokenizers tokenizer.json"
        ) from None


def read_tokens(path: str | Path, tokenizer: Tokenizer | None, vocab_size: int) -> torch.Tensor:
    """Token ids from ``.txt`` (whole file), ``.jsonl`` (a ``text`` field per line, joined by blank
    lines) or ``.npy`` (1-D integer ids). Ids are checked against ``vocab_size``."""
    path = Path(path)
    if not path.is_file():
        raise InputError("data file not found", path=path)
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise InputError(f"not a readable .npy file ({e})", path=path) from None
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise InputError(f"expected 1-D integer token ids, got {arr.dtype} of shape {arr.shape}", path=path)
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
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"line {n}: invalid JSON ({e.msg})", path=path) from None
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
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise InputError("token weights file not found", path=path) from None
        except (ValueError, OSError) as e:
            raise InputError(f"not a readable .npy file ({e})", path=path) from None
        if arr.ndim != 1 or arr.shape[0] != vocab_size or arr.dtype.kind not in "iuf":
            raise InputError(
                f"expected 1-D numeric counts of length {vocab_size}, got {arr.dtype} {arr.shape}", path=path
            )
        counts = torch.from_numpy(arr.astype(np.float64))
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
