"""``tolcli eval-ppl``: perplexity of a model with its own FFNs and with ToL bundles, side by side.

Every variant is scored on the same token windows with the same protocol (:mod:`tolcli.scoring`); the
first variant is the reference for KL divergence, top-1 agreement and the paired NLL difference: the
checkpoint's own FFNs, or, for a stripped checkpoint, the first bundle, or a stored reference
(:mod:`tolcli.reference`). Error bars: :mod:`tolcli.uncertainty`; data and documents: :mod:`tolcli.streams`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tolcli import reference as refs
from tolcli.bundle.drop import layers_to_keep
from tolcli.bundle.reader import Bundle, open_bundle
from tolcli.checkpoint import Checkpoint, open_checkpoint
from tolcli.choices import PROTOCOLS
from tolcli.errors import InputError, QualityGateError, UsageError
from tolcli.fsutil import path_bytes
from tolcli.model import ContextFreeSource, DropSource, FFNSource, Transformer, load_model
from tolcli.pairing import check_pairing
from tolcli.precompute import resolve_device
from tolcli.progress import NullProgress, Progress
from tolcli.scoring import Plan, RefCapture, StoredRef, VariantStats, count_plan_batches, make_plan, score_plan
from tolcli.streams import file_streams, special_tokens
from tolcli.text import load_tokenizer
from tolcli.uncertainty import change_interval, kl_summary, mean_stderr, proportion_stderr

SCORING_RULES = {
    "tolcli": (
        "windows of min(ctx, N-1) input tokens advancing by stride, the last one moved back to full length; "
        "each token after the first is scored exactly once, by the first window that predicts it"
    ),
    "hf-sliding": (
        "the Hugging Face guide's loop: windows [b, min(b+ctx, N)) for b = 0, stride, ...; labels are each window's "
        "tokens not yet covered, the first position dropped by the shift; window losses weighted by labels - 1"
    ),
    "lm-eval-rolling": (
        "lm-evaluation-harness loglikelihood_rolling: per document, a prefix token (BOS, else EOS) and disjoint "
        "windows of ctx predictions, each with a full window of context; every token is scored"
    ),
    "llama-cpp": (
        "llama.cpp perplexity: chunks of ctx tokens (tail dropped), BOS first when the tokenizer adds one; the "
        "logits at ctx/2 .. ctx-2 of each chunk are scored"
    ),
}
SCORING_RULE = SCORING_RULES["tolcli"]


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

    def gate(self, max_increase_pct: float, *, significant: bool = False) -> list[dict[str, Any]]:
        """Variants that fail the quality gate: perplexity up by more than ``max_increase_pct`` percent over the
        reference (exactly at the limit passes), or a perplexity or KL that is not a finite number (NaN and
        Inf never pass, nor does any variant when the reference's perplexity is not finite).

        ``significant``: fail only when the increase exceeds the limit with the report's confidence, i.e. when the
        low end of the paired interval ``ppl_change_pct_ci`` is above the limit (one-sided at (1 + c) / 2)."""
        if not math.isfinite(max_increase_pct):
            raise UsageError(f"`max_increase_pct` must be a finite number of percent, got {max_increase_pct}")
        return [
            v
            for v in self.variants[1:]
            if not (_gated_change(v, significant) <= max_increase_pct and math.isfinite(v["mean_kl"]))
        ]

    def enforce(self, max_increase_pct: float, *, significant: bool = False) -> None:
        """Raise :class:`QualityGateError` (carrying this report as ``.report``) when :meth:`gate` fails any."""
        failed = self.gate(max_increase_pct, significant=significant)
        if failed:
            if significant:
                c = 100 * self.protocol.get("confidence", 0.95)
                worst = ", ".join(
                    f"{v['name']} +{v['ppl_change_pct']:.2f}% ({c:g}% interval from {_gated_change(v, True):+.2f}%)"
                    for v in failed
                )
            else:
                worst = ", ".join(f"{v['name']} +{v['ppl_change_pct']:.2f}%" for v in failed)
            err = QualityGateError(f"quality gate failed: {worst} (limit +{max_increase_pct}%)")
            err.report = self  # type: ignore[attr-defined]
            raise err


def _gated_change(v: dict[str, Any], significant: bool) -> float:
    """The percent change the gate compares: the measured one, or the low end of its interval."""
    return v["ppl_change_pct_ci"][0] if significant else v["ppl_change_pct"]


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


def _check_window(ctx: int, stride: int) -> None:
    if ctx < 1 or not 1 <= stride <= ctx:
        raise UsageError(f"need `ctx` >= 1 and 1 <= `stride` <= `ctx`, got ctx={ctx} stride={stride}")


def _check_options(
    protocol: str,
    ctx: int | None,
    stride: int | None,
    batch_size: int,
    drop_last: int | None,
    keep_layers: str | None,
    data: Sequence[str | Path],
    max_increase: float | None,
    confidence: float,
) -> None:
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown `protocol` {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if ctx is not None:  # else checked once the model's positions give the default
        _check_window(ctx, ctx if stride is None else stride)
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be >= 1, got {batch_size}")
    if drop_last is not None and keep_layers is not None:
        raise UsageError("give `drop_last` or `keep_layers`, not both")
    if not data:
        raise UsageError("give at least one `data` file")
    if max_increase is not None and not math.isfinite(max_increase):
        raise UsageError(f"`max_increase` must be a finite number of percent, got {max_increase}")
    if not 0.5 <= confidence < 1.0:
        raise UsageError(f"`confidence` must be in [0.5, 1), got {confidence}")


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
    ckpt: Checkpoint,
    bundles: Sequence[Bundle],
    tokenizer: str | Path | None,
    allow_tokenizer_mismatch: bool,
    allow_source_mismatch: bool,
    note,
) -> tuple[Any, str | None, str | None]:
    """Each bundle was computed from this checkpoint (shapes, source fingerprint: :mod:`tolcli.pairing`) and with
    this tokenizer; returns (tokenizer, its sha256, where it came from)."""
    cfg = ckpt.config
    for b in bundles:
        if not cfg.has_memory:
            raise UsageError(f"{b.path}: model_type {cfg.model_type!r} has no context-free FFN to replace")
        check_pairing(ckpt, b, allow_mismatch=allow_source_mismatch, note=note)
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
            if not allow_tokenizer_mismatch:
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
                "layers_present": sorted(e["index"] for e in present),
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


def _joined(stats: Sequence[VariantStats]) -> VariantStats:
    """One variant's scores over every file, in order."""
    weights = None if stats[0].weights is None else np.concatenate([s.weights for s in stats])  # type: ignore[misc]
    return VariantStats(
        stats[0].name,
        np.concatenate([s.nll for s in stats]),
        np.concatenate([s.kl for s in stats]),
        np.concatenate([s.agree for s in stats]),
        weights,
    )


def summarise(
    infos: Sequence[dict[str, Any]],
    per_file: Sequence[list[VariantStats]],
    *,
    words: int | None = None,
    nbytes: int | None = None,
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """One result per variant over all files with error bars, and its change against the first (the reference).

    ``words``/``nbytes`` (of the original text) give lm-eval's word and byte perplexity and bits per byte."""
    totals = [_joined([fs[k] for fs in per_file]) for k in range(len(infos))]
    ref = totals[0]
    results = []
    for k, (st, info) in enumerate(zip(totals, infos, strict=True)):
        mean, se = mean_stderr(st.nll, st.weights)
        ppl = math.exp(mean)
        r: dict[str, Any] = {
            "name": st.name,
            **info,
            "tokens": st.tokens,
            "nll_sum": st.nll_sum,
            "mean_nll": mean,
            "mean_nll_stderr": se,
            "ppl": ppl,
            "ppl_stderr": ppl * se,
            "word_perplexity": None if not words else math.exp(st.nll_sum / words),
            "byte_perplexity": None if not nbytes else math.exp(st.nll_sum / nbytes),
            "bits_per_byte": None if not nbytes else st.nll_sum / (nbytes * math.log(2)),
            "mean_kl": st.mean_kl,
            "top1_agreement": st.top1_agreement,
        }
        if k:
            d_mean, d_se = mean_stderr(st.nll - ref.nll, st.weights)
            r["nll_diff_mean"], r["nll_diff_stderr"] = d_mean, d_se
            r["ppl_change_pct_ci"] = list(change_interval(d_mean, d_se, confidence))
            r["kl"] = kl_summary(st.kl)
            r["top1_agreement_stderr"] = proportion_stderr(st.top1_agreement, st.tokens)
        results.append(r)
    for r in results:
        r["ppl_change"] = r["ppl"] - results[0]["ppl"]
        r["ppl_change_pct"] = 100.0 * (r["ppl"] / results[0]["ppl"] - 1.0)
    return results


def _run_identity(
    protocol: str, ctx: int, stride: int, doc_sep: str | None, text_field: str, max_tokens: int | None, files, tok_sha
) -> dict[str, Any]:
    """What fixes the scored positions and their targets: a stored reference is used only for the same run."""
    return {
        "protocol": protocol,
        "ctx": ctx,
        "stride": stride,
        "doc_sep": doc_sep,
        "text_field": text_field,
        "max_tokens": max_tokens,
        "data": [f.record["sha256"] for f in files],
        "tokens": [f.record["tokens"] for f in files],
        "tokenizer_sha256": tok_sha,
    }


DEFAULT_CTX = 512  # tokens per window when `ctx` is not given, capped at the model's max_position_embeddings


def default_ctx(ckpt: Checkpoint) -> int:
    """``min(512, max_position_embeddings)``: the window when none is asked for (never beyond trained positions)."""
    return min(DEFAULT_CTX, ckpt.config.max_position_embeddings)


def _check_ctx_fits(ckpt: Checkpoint, ctx: int, protocol: str) -> None:
    limit = ckpt.config.max_position_embeddings
    if ctx > limit:
        raise UsageError(
            f"`ctx` {ctx} exceeds the model's max_position_embeddings ({limit}): positions beyond it were never "
            f"trained, so the {protocol} numbers would mean nothing",
            hint=f"use --ctx {limit} or less",
        )


def eval_ppl(
    checkpoint: str | Path | Checkpoint,
    data: Sequence[str | Path],
    *,
    tols: Sequence[str | Path] = (),
    protocol: str = "tolcli",
    ctx: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    drop_last: int | None = None,
    keep_layers: str | None = None,
    tokenizer: str | Path | None = None,
    text_field: str = "text",
    doc_sep: str = "eos",
    allow_tokenizer_mismatch: bool = False,
    allow_source_mismatch: bool = False,
    max_increase: float | None = None,
    gate_significant: bool = False,
    confidence: float = 0.95,
    save_reference: str | Path | None = None,
    reference: str | Path | None = None,
    reference_top_k: int = 64,
    extra_drops: Sequence[tuple[str, set[int]]] = (),
    verify_input: bool = False,
    progress: Progress | None = None,
    note=lambda s: None,
) -> EvalReport:
    """Evaluate the checkpoint's own FFNs (the baseline), each bundle, and optional layer drops.

    ``protocol`` picks which tokens are scored with which context (:mod:`tolcli.scoring`: tolcli, hf-sliding,
    lm-eval-rolling, llama-cpp); ``doc_sep`` and ``text_field`` how documents are read (:mod:`tolcli.streams`).
    ``extra_drops`` adds variants ``(name, layers kept)`` of the reference with the other layers removed.
    ``save_reference`` stores the reference's log-probabilities (the target's and the top ``reference_top_k``);
    ``reference`` loads such a file instead of computing the baseline (:mod:`tolcli.reference`).

    Raises :class:`QualityGateError` (exit 3) after measuring when a variant's perplexity rises by more
    than ``max_increase`` percent (with ``gate_significant``: when the low end of its ``confidence`` interval
    does), or its perplexity or KL is NaN or infinite (:meth:`EvalReport.gate`); the report is attached to the
    error as ``.report``.

    Example:
        >>> from tolcli import eval_ppl, demo_checkpoint_path, demo_heldout_path
        >>> r = eval_ppl(demo_checkpoint_path(), [demo_heldout_path()], ctx=128, max_tokens=2000, drop_last=1)
        >>> [v["name"] for v in r.variants], r.variants[0]["tokens"]
        (['baseline (own FFNs)', 'drop last 1'], 1999)
    """
    t0 = time.monotonic()
    progress = progress or NullProgress()
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"`max_tokens` must be >= 2 (one token of context and one to score), got {max_tokens}")
    _check_options(protocol, ctx, stride, batch_size, drop_last, keep_layers, data, max_increase, confidence)
    if save_reference is not None:
        refs.check_top_k(reference_top_k)
    if save_reference is not None and reference is not None:
        raise UsageError("give `save_reference` or `reference`, not both")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    ctx = default_ctx(ckpt) if ctx is None else ctx
    step = ctx if stride is None else stride
    _check_window(ctx, step)
    _check_ctx_fits(ckpt, ctx, protocol)
    bundles = open_bundles(tols, verify=verify_input)
    try:
        tok, tok_sha, tok_from = _check_pairing(
            ckpt, bundles, tokenizer, allow_tokenizer_mismatch, allow_source_mismatch, note
        )
        specials = special_tokens(ckpt.config, tok)
        sep = "separate" if protocol == "lm-eval-rolling" else doc_sep
        files = [
            file_streams(
                p,
                tok,
                ckpt.config,
                protocol=protocol,
                doc_sep=doc_sep,
                specials=specials,
                text_field=text_field,
                max_tokens=max_tokens,
            )
            for p in data
        ]
        plans = [make_plan(protocol, f.sequences, ctx=ctx, stride=step, specials=specials) for f in files]
        run = _run_identity(protocol, ctx, step, sep, text_field, max_tokens, files, tok_sha)
        dev = resolve_device(device)
        model = load_model(ckpt, device=dev)
        variants, infos = build_variants(
            model, bundles, drop_last=drop_last, keep_layers=keep_layers, extra_drops=extra_drops
        )
        stored = None
        if reference is not None:
            stored = refs.load_reference(
                reference,
                run=run,
                vocab_size=ckpt.config.vocab_size,
                tokens_scored=sum(p.tokens_scored for p in plans),
            )
            if stored.target_logp.numel() != sum(p.tokens_scored for p in plans):
                raise InputError(
                    f"the reference holds {stored.target_logp.numel()} tokens, this run scores "
                    f"{sum(p.tokens_scored for p in plans)}",
                    path=reference,
                )
            if variants[0][1] is None:  # the stored reference replaces the model's own FFNs
                variants, infos = variants[1:], infos[1:]
            infos = [{"kind": "reference", "bytes": None, "file": str(reference)}, *infos]
        capture = RefCapture(reference_top_k) if save_reference is not None else None
        per_file_stats = _score_files(model, plans, variants, batch_size, stored, capture, progress)
    finally:
        for b in bundles:
            b.close()
    if capture is not None:
        refs.save_reference(save_reference, capture, name=variants[0][0], vocab_size=ckpt.config.vocab_size, run=run)
    # Word/byte metrics need the log-likelihood of the whole text: lm-eval-rolling scores every token, tolcli all
    # but each file's first; hf-sliding's weighted sum and llama-cpp's half-chunks are not such a likelihood.
    text_ok = protocol in ("tolcli", "lm-eval-rolling") and all(f.words is not None for f in files)
    results = summarise(
        infos,
        per_file_stats,
        words=sum(f.words or 0 for f in files) if text_ok else None,
        nbytes=sum(f.bytes or 0 for f in files) if text_ok else None,
        confidence=confidence,
    )
    protocol_block = {
        "protocol": protocol,
        "model": ckpt.path.name,
        "model_type": ckpt.config.model_type,
        "stripped": ckpt.config.stripped,
        "reference": results[0]["name"],
        "reference_file": None if reference is None else str(reference),
        "saved_reference": None if save_reference is None else str(save_reference),
        "ctx": ctx,
        "stride": step,
        "doc_sep": sep,
        "text_field": text_field,
        "special_tokens": {"bos": specials.bos, "eos": specials.eos, "adds_bos": specials.adds_bos},
        "window_length": max(w.length for p in plans for w in p.windows),
        "windows": sum(len(p.windows) for p in plans),
        "tokens_scored": results[0]["tokens"],
        "words": results[0]["word_perplexity"] and sum(f.words or 0 for f in files),
        "bytes": results[0]["byte_perplexity"] and sum(f.bytes or 0 for f in files),
        "max_tokens": max_tokens,
        "data": [f.record for f in files],
        "tokenizer": tok_from,
        "tokenizer_sha256": tok_sha,
        "scoring_rule": SCORING_RULES[protocol],
        "confidence": confidence,
        "gate": None if max_increase is None else {"max_increase_pct": max_increase, "significant": gate_significant},
        "device": dev.type,
        "dtype": "fp32",
    }
    report = EvalReport(
        protocol_block,
        results,
        time.monotonic() - t0,
        [
            {"path": str(f.path), "variants": [{"name": s.name, "ppl": s.perplexity, "tokens": s.tokens} for s in fs]}
            for f, fs in zip(files, per_file_stats, strict=True)
        ],
    )
    if max_increase is not None:
        report.enforce(max_increase, significant=gate_significant)
    return report


def _score_files(
    model: Transformer,
    plans: Sequence[Plan],
    variants: Sequence[tuple[str, ContextFreeSource | None]],
    batch_size: int,
    stored: StoredRef | None,
    capture: RefCapture | None,
    progress: Progress,
) -> list[list[VariantStats]]:
    """Score every plan (one per data file); a stored reference is sliced file by file, in scoring order."""
    progress.start(f"eval-ppl ({len(variants)} variant(s))", sum(count_plan_batches(p, batch_size) for p in plans))
    out, offset = [], 0
    for plan in plans:
        part = None
        if stored is not None:
            sl = slice(offset, offset + plan.tokens_scored)
            part = StoredRef(
                stored.name, stored.target_logp[sl], stored.topk_ids[sl], stored.topk_logp[sl], stored.vocab_size
            )
            offset += plan.tokens_scored
        out.append(
            score_plan(
                model,
                plan,
                variants,
                batch_size=batch_size,
                stored=part,
                capture=capture,
                on_batch=lambda: progress.advance(1),
            )
        )
    progress.finish()
    return out
