"""``tolcli eval-ppl``: perplexity of a model with its own FFNs and with ToL bundles, side by side.

Every variant is scored on the same token windows with the same rule (:mod:`tolcli.scoring`); the
first variant is the reference for KL divergence and top-1 agreement: the checkpoint's own FFNs, or,
for a stripped checkpoint, the first bundle.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from tolcli.bundle.drop import layers_to_keep
from tolcli.bundle.reader import Bundle, open_bundle
from tolcli.checkpoint import Checkpoint, open_checkpoint
from tolcli.errors import InputError, QualityGateError, UsageError
from tolcli.fsutil import path_bytes, sha256_file
from tolcli.model import ContextFreeSource, DropSource, FFNSource, Transformer, load_model
from tolcli.precompute import resolve_device
from tolcli.progress import NullProgress, Progress
from tolcli.scoring import VariantStats, compare, count_batches, plan_windows
from tolcli.text import load_tokenizer, read_tokens

SCORING_RULE = (
    "windows of min(ctx, N-1) input tokens advancing by stride, the last one moved back to full length; "
    "each token after the first is scored exactly once, by the first window that predicts it"
)


@dataclass
class EvalReport:
    """What ``eval-ppl`` measured; :meth:`to_json` is the ``--json`` document."""

    protocol: dict[str, Any]
    variants: list[dict[str, Any]]
    seconds: float
    per_file: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "variants": self.variants,
            "per_file": self.per_file,
            "seconds": round(self.seconds, 3),
        }

    def gate(self, max_increase_pct: float) -> list[dict[str, Any]]:
        """Variants that fail the quality gate: perplexity up by more than ``max_increase_pct`` percent over the
        reference (exactly at the limit passes), or a perplexity or KL that is not a finite number (NaN and
        Inf never pass, nor does any variant when the reference's perplexity is not finite)."""
        if not math.isfinite(max_increase_pct):
            raise UsageError(f"`max_increase_pct` must be a finite number of percent, got {max_increase_pct}")
        return [
            v
            for v in self.variants[1:]
            if not (v["ppl_change_pct"] <= max_increase_pct and math.isfinite(v["mean_kl"]))
        ]

    def enforce(self, max_increase_pct: float) -> None:
        """Raise :class:`QualityGateError` (carrying this report as ``.report``) when :meth:`gate` fails any."""
        failed = self.gate(max_increase_pct)
        if failed:
            worst = ", ".join(f"{v['name']} +{v['ppl_change_pct']:.2f}%" for v in failed)
            err = QualityGateError(f"quality gate failed: {worst} (limit +{max_increase_pct}%)")
            err.report = self  # type: ignore[attr-defined]
            raise err


def _tokenizer_for(ckpt: Checkpoint, bundles: Sequence[Bundle], tokenizer: str | Path | None):
    """(tokenizer, its bytes, where it came from): --tokenizer, else the checkpoint's, else a bundle's."""
    if tokenizer is not None:
        raw = Path(tokenizer).read_bytes() if Path(tokenizer).is_file() else None
        if raw is None:
            raise InputError("tokenizer not found", path=tokenizer)
        return load_tokenizer(tokenizer), raw, str(tokenizer)
    if ckpt.tokenizer_path is not None:
        return load_tokenizer(ckpt.tokenizer_path), ckpt.tokenizer_path.read_bytes(), str(ckpt.tokenizer_path)
    for b in bundles:
        raw = b.tokenizer_bytes()
        if raw is not None:
            return b.tokenizer(), raw, f"{b.path} (embedded)"
    return None, None, None


def _check_options(
    ctx: int, stride: int, batch_size: int, drop_last: int | None, keep_layers: str | None, data, max_increase
) -> None:
    if ctx < 1 or not 1 <= stride <= ctx:
        raise UsageError(f"need `ctx` >= 1 and 1 <= `stride` <= `ctx`, got ctx={ctx} stride={stride}")
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be >= 1, got {batch_size}")
    if drop_last is not None and keep_layers is not None:
        raise UsageError("give `drop_last` or `keep_layers`, not both")
    if not data:
        raise UsageError("give at least one `data` file")
    if max_increase is not None and not math.isfinite(max_increase):
        raise UsageError(f"`max_increase` must be a finite number of percent, got {max_increase}")


def open_bundles(paths: Sequence[str | Path], *, verify: bool) -> list[Bundle]:
    """Open every bundle, closing the ones already open when one fails."""
    bundles: list[Bundle] = []
    for p in paths:
        try:
            bundles.append(open_bundle(p, verify=verify))
        except BaseException:
            for b in bundles:
                b.close()
            raise
    return bundles


def _check_pairing(
    ckpt: Checkpoint, bundles: Sequence[Bundle], tokenizer: str | Path | None, allow_mismatch: bool, note
) -> tuple[Any, str | None, str | None]:
    """Each bundle fits the checkpoint (shapes, tokenizer); returns (tokenizer, its sha256, where it came from)."""
    cfg = ckpt.config
    for b in bundles:
        if not cfg.has_memory:
            raise UsageError(f"{b.path}: model_type {cfg.model_type!r} has no context-free FFN to replace")
        if (b.vocab_size, b.hidden_size, b.num_layers) != (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers):
            raise InputError(
                f"bundle (vocab {b.vocab_size}, hidden {b.hidden_size}, {b.num_layers} layers) does not match "
                f"the checkpoint (vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers)",
                path=b.path,
            )
    if cfg.stripped and not bundles:
        raise UsageError(f"{ckpt.path} is stripped (no context-free FFN): evaluate it with a bundle (`tols`)")
    tok, tok_bytes, tok_from = _tokenizer_for(ckpt, bundles, tokenizer)
    tok_sha = None if tok_bytes is None else hashlib.sha256(tok_bytes).hexdigest()
    for b in bundles:
        want = b.manifest["vocabulary"]["tokenizer_sha256"]
        if want and tok_sha and want != tok_sha:
            msg = (
                f"tokenizer {tok_from} (sha256 {tok_sha[:12]}...) differs from the one the bundle was "
                f"built with ({want[:12]}...)"
            )
            if not allow_mismatch:
                raise InputError(msg, path=b.path, hint="pass --allow-tokenizer-mismatch if this is intended")
            note(f"warning: {msg}")
    return tok, tok_sha, tok_from


def build_variants(
    model: Transformer,
    bundles: Sequence[Bundle],
    *,
    drop_last: int | None,
    keep_layers: str | None,
    extra_drops: Sequence[tuple[str, set[int]]],
) -> tuple[list[tuple[str, ContextFreeSource | None]], list[dict[str, Any]]]:
    """Every variant to score, ``(name, source)``, and what the report says about each. The first is the
    reference: the model's own FFNs, or for a stripped checkpoint the first bundle."""
    cfg = model.cfg
    variants: list[tuple[str, ContextFreeSource | None]] = []
    infos: list[dict[str, Any]] = []
    if not cfg.stripped:
        variants.append(("baseline (own FFNs)", None))
        infos.append({"kind": "baseline", "bytes": None})
    for b in bundles:
        variants.append((str(b.path), b.as_source()))
        present = [e for e in b.manifest["layers"] if e["status"] == "present"]
        infos.append(
            {
                "kind": "bundle",
                "bytes": path_bytes(b.path),
                "stored_bytes": sum(e["stored_bytes"] for e in present),
                "codecs": sorted({e["codec"] for e in present}),
                "layers_present": len(present),
            }
        )
    L = cfg.num_hidden_layers
    drops = list(extra_drops)
    if drop_last is not None or keep_layers is not None:
        keep = layers_to_keep(L, drop_last=drop_last, keep_layers=keep_layers)
        drops.append((f"drop last {drop_last}" if drop_last is not None else f"keep layers {keep_layers}", keep))
    base_src = variants[0][1] if variants else None
    for name, kept in drops:
        inner = base_src if base_src is not None else FFNSource(model)
        variants.append((name, DropSource(inner, set(range(L)) - set(kept))))
        infos.append({"kind": "drop", "bytes": None, "layers_kept": sorted(kept)})
    return variants, infos


def load_data(
    data: Sequence[str | Path], tok: Any, vocab_size: int, max_tokens: int | None
) -> tuple[list[dict[str, Any]], list[Tensor]]:
    """Each data file's token ids (cut at ``max_tokens``) and its record for the report."""
    files, tokens = [], []
    for path in data:
        ids = read_tokens(path, tok, vocab_size)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if ids.numel() < 2:
            raise InputError("fewer than 2 tokens to score", path=path)
        files.append(
            {"path": str(path), "sha256": sha256_file(Path(path)), "tokens": ids.numel(), "scored": ids.numel() - 1}
        )
        tokens.append(ids)
    return files, tokens


def summarise(
    variants: Sequence[tuple[str, Any]], infos: Sequence[dict[str, Any]], per_file: Sequence[list[VariantStats]]
) -> list[dict[str, Any]]:
    """One result per variant over all files, with its change against the first (the reference)."""
    results = []
    for k, ((name, _), info) in enumerate(zip(variants, infos, strict=True)):
        nll = sum(fs[k].nll_sum for fs in per_file)
        n = sum(fs[k].tokens for fs in per_file)
        kl = sum(fs[k].kl_sum for fs in per_file)
        agree = sum(fs[k].top1_agree for fs in per_file)
        results.append(
            {
                "name": name,
                **info,
                "tokens": n,
                "mean_nll": nll / n,
                "ppl": math.exp(nll / n),
                "mean_kl": kl / n,
                "top1_agreement": agree / n,
            }
        )
    ref = results[0]
    for r in results:
        r["ppl_change"] = r["ppl"] - ref["ppl"]
        r["ppl_change_pct"] = 100.0 * (r["ppl"] / ref["ppl"] - 1.0)
    return results


def eval_ppl(
    checkpoint: str | Path | Checkpoint,
    data: Sequence[str | Path],
    *,
    tols: Sequence[str | Path] = (),
    ctx: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    drop_last: int | None = None,
    keep_layers: str | None = None,
    tokenizer: str | Path | None = None,
    allow_tokenizer_mismatch: bool = False,
    max_increase: float | None = None,
    extra_drops: Sequence[tuple[str, set[int]]] = (),
    verify_input: bool = False,
    progress: Progress | None = None,
    note=lambda s: None,
) -> EvalReport:
    """Evaluate the checkpoint's own FFNs (the baseline), each bundle, and optional layer drops.

    ``extra_drops`` adds variants ``(name, layers kept)`` of the reference with the other layers removed.

    Raises :class:`QualityGateError` (exit 3) after measuring when a variant's perplexity rises by more
    than ``max_increase`` percent, or its perplexity or KL is NaN or infinite (:meth:`EvalReport.gate`);
    the report is attached to the error as ``.report``.

    Example:
        >>> from tolcli import eval_ppl, demo_checkpoint_path, demo_heldout_path
        >>> r = eval_ppl(demo_checkpoint_path(), [demo_heldout_path()], ctx=128, max_tokens=2000, drop_last=1)
        >>> [v["name"] for v in r.variants], r.variants[0]["tokens"]
        (['baseline (own FFNs)', 'drop last 1'], 1999)
    """
    t0 = time.monotonic()
    progress = progress or NullProgress()
    stride = ctx if stride is None else stride
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"`max_tokens` must be >= 2 (one token of context and one to score), got {max_tokens}")
    _check_options(ctx, stride, batch_size, drop_last, keep_layers, data, max_increase)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    bundles = open_bundles(tols, verify=verify_input)
    try:
        tok, tok_sha, tok_from = _check_pairing(ckpt, bundles, tokenizer, allow_tokenizer_mismatch, note)
        dev = resolve_device(device)
        model = load_model(ckpt, device=dev)
        variants, infos = build_variants(
            model, bundles, drop_last=drop_last, keep_layers=keep_layers, extra_drops=extra_drops
        )
        files, tokens = load_data(data, tok, ckpt.config.vocab_size, max_tokens)
        total = sum(count_batches(t.numel(), ctx=ctx, stride=stride, batch_size=batch_size) for t in tokens)
        progress.start(f"eval-ppl ({len(variants)} variant(s))", total)
        per_file_stats = [
            compare(
                model,
                ids,
                variants,
                ctx=ctx,
                stride=stride,
                batch_size=batch_size,
                on_batch=lambda: progress.advance(1),
            )
            for ids in tokens
        ]
        progress.finish()
    finally:
        for b in bundles:
            b.close()
    results = summarise(variants, infos, per_file_stats)
    protocol = {
        "model": ckpt.path.name,
        "model_type": ckpt.config.model_type,
        "stripped": ckpt.config.stripped,
        "reference": results[0]["name"],
        "ctx": ctx,
        "stride": stride,
        "window_length": min(ctx, min(t.numel() for t in tokens) - 1),
        "windows": sum(len(plan_windows(t.numel(), ctx, stride)[1]) for t in tokens),
        "tokens_scored": results[0]["tokens"],
        "max_tokens": max_tokens,
        "data": files,
        "tokenizer": tok_from,
        "tokenizer_sha256": tok_sha,
        "scoring_rule": SCORING_RULE,
        "device": dev.type,
        "dtype": "fp32",
    }
    per_file = [
        {"path": f["path"], "variants": [{"name": s.name, "ppl": s.perplexity, "tokens": s.tokens} for s in fs]}
        for f, fs in zip(files, per_file_stats, strict=True)
    ]
    report = EvalReport(protocol, results, time.monotonic() - t0, per_file)
    if max_increase is not None:
        report.enforce(max_increase)
    return report
