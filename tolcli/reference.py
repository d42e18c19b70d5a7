"""Stored reference log-probabilities (``eval-ppl --save-reference`` / ``--reference``), like llama.cpp's
``--kl-divergence-base``: compute the baseline once, compare any number of variants against it later.

The file is safetensors with three tensors over the run's scored tokens, in scoring order:
``target_logp`` (N,) float32, the reference's log-probability of each target; ``topk_ids`` (N, k) int32 and
``topk_logp`` (N, k) float32, its k most likely tokens, most likely first. ``__metadata__["tolcli.reference"]`` is
a JSON object: ``format`` ("tolcli-reference"), ``version`` (1), ``name`` (the reference variant), ``top_k``,
``vocab_size``, ``tokens`` (N) and ``run``: what fixes the scored positions (protocol, ctx, stride, document
separation, text field, max_tokens, each data file's sha256, the tokenizer's sha256, the special tokens). A file
is used only for a run whose ``run`` is identical; everything is checked before a byte of data is read.
Size: ``N * (4 + 8 k)`` bytes (k = 64: about 0.5 GB per million tokens); KL against a top-k shorter than the
vocabulary is a lower bound (:class:`tolcli.scoring.TopKReference`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tolcli._lazy import lazy_import
from tolcli.errors import InputError, UsageError
from tolcli.fsutil import atomic_output
from tolcli.jsonsafe import loads, regular_file, short
from tolcli.scoring import RefCapture, StoredRef

FORMAT = "tolcli-reference"
VERSION = 1
META_KEY = "tolcli.reference"
MAX_TOP_K = 1 << 17  # a whole 128k vocabulary; the default is 64
TENSORS = {"target_logp": "F32", "topk_ids": "I32", "topk_logp": "F32"}
st = lazy_import("safetensors")
st_numpy = lazy_import("safetensors.numpy")


def check_top_k(top_k: int) -> None:
    if not 1 <= top_k <= MAX_TOP_K:
        raise UsageError(f"`reference_top_k` must be in [1, {MAX_TOP_K}], got {top_k}")


def save_reference(
    path: str | Path, capture: RefCapture, *, name: str, vocab_size: int, run: dict[str, Any], force: bool = True
) -> Path:
    """Write the captured reference atomically (temp file, fsync, rename)."""
    path = Path(path)
    arrays = {
        "target_logp": torch.cat(capture.target_logp).numpy(),
        "topk_ids": torch.cat(capture.topk_ids).numpy(),
        "topk_logp": torch.cat(capture.topk_logp).numpy(),
    }
    n, k = arrays["topk_ids"].shape
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "top_k": int(k),
        "vocab_size": vocab_size,
        "tokens": int(n),
        "run": run,
    }
    with atomic_output(path, force=force) as tmp:
        tmp.write_bytes(st_numpy.save(arrays, metadata={META_KEY: json.dumps(meta, sort_keys=True)}))
    return path


def load_reference(
    path: str | Path, *, run: dict[str, Any], vocab_size: int, tokens_scored: int | None = None
) -> StoredRef:
    """Read a reference for this run: the header, the metadata and every shape are checked first (its token count
    against ``tokens_scored`` when given, and never above the run's tokens, so a file cannot make tolcli allocate
    more than the run scores); then values (:func:`check_values`)."""
    path = Path(path)
    regular_file(path, what="reference file")
    try:
        with st.safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            if not isinstance(raw, str):
                raise InputError(f"not a tolcli reference file (no {META_KEY!r} metadata)", path=path)
            meta = loads(raw, path=path, what="reference metadata")
            if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise InputError(f"not a {FORMAT} version {VERSION} file", path=path)
            _check_run(path, meta.get("run"), run)
            n, k = meta.get("tokens"), meta.get("top_k")
            if meta.get("vocab_size") != vocab_size or type(k) is not int or not 1 <= k <= min(vocab_size, MAX_TOP_K):
                raise InputError(
                    f"reference for vocabulary {short(meta.get('vocab_size'))} with top-k {short(k)}; "
                    f"this model has {vocab_size} tokens",
                    path=path,
                )
            _check_tokens(path, n, run, tokens_scored)
            want = {"target_logp": ("F32", [n]), "topk_ids": ("I32", [n, k]), "topk_logp": ("F32", [n, k])}
            have = {name: (f.get_slice(name).get_dtype(), list(f.get_slice(name).get_shape())) for name in f.keys()}  # noqa: SIM118
            if have != want:
                raise InputError(f"reference tensors {short(have, 200)} are not {short(want, 200)}", path=path)
            target, ids, topk = (torch.from_numpy(f.get_tensor(name)) for name in want)
    except st.SafetensorError as e:
        raise InputError(f"not a readable safetensors file ({short(str(e), 200)})", path=path) from None
    check_values(path, target, ids, topk, vocab_size)
    name = meta.get("name")
    return StoredRef(f"reference {path.name} ({short(name, 60)})", target, ids, topk, vocab_size)


def _check_tokens(path: Path, n: Any, run: dict[str, Any], tokens_scored: int | None) -> None:
    """The stored token count: an int, at most the run's tokens (a run scores each token at most once), and
    ``tokens_scored`` when given; checked before any tensor is read."""
    counts = run.get("tokens")
    most = sum(counts) if isinstance(counts, list) and all(type(c) is int for c in counts) else None
    if type(n) is not int or n < 0 or (most is not None and n > most):
        raise InputError(
            f"reference metadata declares {short(n, 40)} tokens; the run has {short(most, 40)}",
            path=path,
            hint="the file is damaged or forged: save the reference again",
        )
    if tokens_scored is not None and n != tokens_scored:
        raise InputError(f"the reference holds {n} tokens, this run scores {tokens_scored}", path=path)


# Slack for float32 rounding: log(sum of the top-k probabilities) of a real distribution is <= 0 (the whole
# vocabulary sums to 1 up to about 1e-6 in float32).
LOGSUMEXP_SLACK = 1e-3


def check_values(path: Path, target: torch.Tensor, ids: torch.Tensor, topk: torch.Tensor, vocab_size: int) -> None:
    """Refuse values that are no top-k of a distribution: log-probabilities that are NaN, infinite or > 0, ids
    outside the vocabulary or repeated in a row, a top-k not sorted most likely first, or one whose probabilities
    sum past 1 (each would silently bias KL and top-1 agreement)."""
    for label, t in (("target_logp", target), ("topk_logp", topk)):
        if not bool(torch.isfinite(t).all()) or bool((t > 0).any()):
            raise InputError(
                f"reference {label} holds values that are not log-probabilities (NaN, inf or > 0)", path=path
            )
    if not ids.numel():
        return
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise InputError(f"reference token ids outside the vocabulary [0, {vocab_size})", path=path)
    problems = {
        "repeats a token id in a row": bool((ids.sort(dim=1).values.diff(dim=1) == 0).any()),
        "is not sorted most likely first": bool((topk.diff(dim=1) > 0).any()),
        "has probabilities summing past 1": bool((topk.double().logsumexp(dim=1) > LOGSUMEXP_SLACK).any()),
    }
    bad = [what for what, found in problems.items() if found]
    if bad:
        raise InputError(f"reference top-k {bad[0]}: not the top-k of a distribution", path=path)


def _check_run(path: Path, stored: Any, run: dict[str, Any]) -> None:
    if not isinstance(stored, dict):
        raise InputError("reference metadata has no run description", path=path)
    differ = sorted(k for k in set(stored) | set(run) if stored.get(k) != run.get(k))
    if differ:
        detail = "; ".join(
            f"{k}: file {short(stored.get(k), 60)}, this run {short(run.get(k), 60)}" for k in differ[:4]
        )
        raise InputError(
            f"the reference was computed for another run ({detail})",
            path=path,
            hint="use the same data, protocol, --ctx/--stride and tokenizer, or save a new reference",
        )


def reference_bytes(tokens: int, top_k: int) -> int:
    """Data bytes of a reference file for ``tokens`` scored tokens (the header adds well under a kilobyte)."""
    return tokens * (4 + 8 * top_k)
