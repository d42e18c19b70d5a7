"""From evaluation data to the token sequences a protocol scores: special tokens, document separation, the
``max_tokens`` cut, and the word and byte counts of the original text (``docs/evaluation.md``).

Documents come from :func:`tolcli.data.read_data` (one per ``.txt`` file, one per record of ``.jsonl``/``.json``/
``.parquet``/a ``datasets`` directory; ``.npy`` token ids are one sequence). For the tolcli, hf-sliding and
llama-cpp protocols the documents of a file become one stream: ``doc_sep="eos"`` puts the EOS id between two
documents, ``"bos"`` the BOS id (in both cases not when the tokenizer already put it there), ``"blank-line"`` joins
the texts with a blank line and encodes once (the Hugging Face guide's wikitext convention). Documents are encoded
with the tokenizer's special tokens, as ``tokenizer(text)`` does in transformers. For lm-eval-rolling every
document is its own sequence, encoded the same way: lm-evaluation-harness's ``tok_encode`` leaves
``add_special_tokens`` to the tokenizer since v0.4.9.2 (earlier versions passed ``False`` for causal models).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tolcli.choices import DOC_SEPARATORS
from tolcli.config import ModelConfig
from tolcli.data import read_data
from tolcli.errors import InputError, UsageError
from tolcli.scoring import Specials

BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")


def special_tokens(cfg: ModelConfig, tokenizer: Any | None) -> Specials:
    """BOS and EOS ids from config.json (``bos_token_id``, ``eos_token_id``), else the tokenizer's special tokens
    by their usual names; ``adds_bos`` when encoding puts BOS first (llama.cpp's ``add_bos``)."""
    bos, eos = cfg.bos_token_id, cfg.eos_token_id
    adds_bos = False
    if tokenizer is not None:
        named = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        bos = bos if bos is not None else next((named[n] for n in BOS_NAMES if n in named), None)
        eos = eos if eos is not None else next((named[n] for n in EOS_NAMES if n in named), None)
        adds_bos = bos is not None and tokenizer.encode("a").ids[:1] == [bos]
    return Specials(bos, eos, adds_bos)


def text_counts(texts: list[str]) -> tuple[int, int]:
    """lm-evaluation-harness's wikitext counts: words ``len(re.split(r"\\s+", doc))`` and UTF-8 bytes, summed."""
    return sum(len(re.split(r"\s+", t)) for t in texts), sum(len(t.encode("utf-8")) for t in texts)


@dataclass
class FileStreams:
    """One data file's sequences and its record for the report."""

    path: Path
    sequences: list[Tensor]
    record: dict[str, Any] = field(default_factory=dict)
    words: int | None = None  # of the original text (None: token ids, or text cut by max_tokens)
    bytes: int | None = None


def _encode(tokenizer: Any, text: str, *, special: bool) -> Tensor:
    return torch.tensor(tokenizer.encode(text, add_special_tokens=special).ids, dtype=torch.long)


def _joined(texts: list[str], tokenizer: Any, doc_sep: str, specials: Specials) -> Tensor:
    if doc_sep == "blank-line" or len(texts) == 1:
        return _encode(tokenizer, "\n\n".join(texts), special=True)
    sep = specials.eos if doc_sep == "eos" else specials.bos
    if sep is None:
        raise UsageError(
            f"`doc_sep` {doc_sep}: this model has no {doc_sep.upper()} token id to put between documents",
            hint=f"set {doc_sep}_token_id in config.json, or use --doc-sep blank-line",
        )
    parts: list[Tensor] = []
    for i, text in enumerate(texts):
        ids = _encode(tokenizer, text, special=True)
        before_next = doc_sep == "bos" and ids.numel() > 0 and int(ids[0]) == sep
        after_prev = doc_sep == "eos" and parts and parts[-1].numel() > 0 and int(parts[-1][-1]) == sep
        if i and not (before_next or after_prev):
            parts.append(torch.tensor([sep], dtype=torch.long))
        parts.append(ids)
    return torch.cat(parts)


def _cut(sequences: list[Tensor], max_tokens: int | None) -> tuple[list[Tensor], bool]:
    """The first ``max_tokens`` tokens over the sequences in order; whether anything was cut."""
    if max_tokens is None or sum(s.numel() for s in sequences) <= max_tokens:
        return sequences, False
    out, left = [], max_tokens
    for s in sequences:
        if left <= 0:
            break
        out.append(s[:left])
        left -= min(left, s.numel())
    return out, True


def file_streams(
    path: str | Path,
    tokenizer: Any | None,
    cfg: ModelConfig,
    *,
    protocol: str,
    doc_sep: str,
    specials: Specials,
    text_field: str = "text",
    max_tokens: int | None = None,
) -> FileStreams:
    """Read one data file and turn it into the sequences ``protocol`` scores (module docstring)."""
    if doc_sep not in DOC_SEPARATORS:
        raise UsageError(f"unknown `doc_sep` {doc_sep!r}; choose from {', '.join(DOC_SEPARATORS)}")
    df = read_data(path, text_field=text_field, vocab_size=cfg.vocab_size)
    path = Path(path)
    if df.ids is not None:
        seqs = [torch.from_numpy(df.ids)]  # read_data's own int64 copy: no second one
    else:
        if tokenizer is None:
            raise InputError("no tokenizer to encode this text", path=path, hint="pass --tokenizer tokenizer.json")
        texts = df.texts or []
        if protocol == "lm-eval-rolling":
            seqs = [_encode(tokenizer, t, special=True) for t in texts]
        else:
            seqs = [_joined(texts, tokenizer, doc_sep, specials)]
    seqs, cut = _cut([s for s in seqs if s.numel()], max_tokens)
    n = sum(s.numel() for s in seqs)
    if n == 0 or (protocol != "lm-eval-rolling" and n < 2):
        raise InputError("fewer than 2 tokens to score", path=path)
    hi = max(int(s.max()) for s in seqs)
    lo = min(int(s.min()) for s in seqs)
    if lo < 0 or hi >= cfg.vocab_size:
        raise InputError(
            f"token id {hi if hi >= cfg.vocab_size else lo} is outside the vocabulary [0, {cfg.vocab_size})",
            path=path,
            hint="the tokenizer does not belong to this model (or pass --tokenizer)",
        )
    words = nbytes = None
    if df.texts is not None and not cut:
        words, nbytes = text_counts(df.texts)
    record = {
        "path": str(path),
        "format": df.format,
        "compression": df.compression,
        "sha256": df.sha256,
        "documents": 1 if df.texts is None else len(df.texts),
        "tokens": n,
        "words": words,
        "bytes": nbytes,
    }
    return FileStreams(path, seqs, record, words, nbytes)
