"""``compress --scheme auto --budget B``: a codec for every layer, chosen to minimise the total weighted error
under one byte budget.

Every layer is encoded with every candidate codec (:data:`DEFAULT_CANDIDATES`, or the user's list): dense fp16,
the uniform quantisers, ``mixed`` (which itself spends its bytes row by row) at several rates, and SVD with an
int4 factor. Each (layer, candidate) pair gives its stored bytes and its weighted squared error
``D = sum_t w[l, t] * ||T_l[t] - decoded_l[t]||^2`` (``w``: the compress token weights, 1 without them; with
``--sensitivity`` they carry each layer's effect on the loss, so errors of different layers compare in loss
units). The plan picks one candidate per layer minimising ``sum_l D`` subject to ``sum_l bytes <= budget``: the
Lagrangian choice ``argmin D + lambda * bytes`` with ``lambda`` bisected to the smallest value that fits, then
greedy upgrades (the best error saved per extra byte) while the remaining budget allows.

The search costs one encode per candidate per layer (the error measured as compress measures it, in row
batches); restrict ``candidates`` on large models.

The weighted squared error is a proxy for what the model loses. ``--validate DATA`` checks it: the plan
above and the best plan of each codec kind alone (``int2`` on every layer, ``svd`` on every layer, ...) that
fits the budget are ranked by their error, and the top few (:func:`alternative_plans`) are written, evaluated
on ``DATA`` against the model's own FFNs, and the one of least mean KL is kept (:class:`Validation`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tolcli.choices import DENSE_SCHEMES
from tolcli.codecs import CodecSpec, parse_spec
from tolcli.errors import InputError, TolcliError, UsageError
from tolcli.progress import NullProgress, Progress

DEFAULT_CANDIDATES: tuple[str, ...] = (
    "fp16",
    "int8",
    "int4(group=64,fit=mse)",
    "int4(group=128,fit=mse,center=true)",
    "nf4(group=64,fit=mse)",
    "int3(group=64,fit=mse)",
    "int2(group=32,fit=mse)",
    # mixed at quarter-bit steps where budgets usually fall, so that layers can differ by less than half a bit
    *(f"mixed(bits={b})" for b in ("1", "1.5", "2", "2.25", "2.5", "2.75", "3", "3.25", "3.5", "4", "5", "6")),
    "svd(rank=H/4,a=int4(group=32))",
    "svd(rank=H/2,a=int4(group=32))",
)
BISECT_STEPS = 200
VALIDATE_PLANS = 3  # --validate: how many plans are evaluated


@dataclass(frozen=True)
class Candidate:
    """One codec measured on one layer."""

    spec: str  # canonical spec string
    stored_bytes: int
    error: float  # weighted squared error, summed over the layer's rows

    def as_json(self) -> dict[str, Any]:
        return {"codec": self.spec, "stored_bytes": self.stored_bytes, "weighted_sq_error": self.error}


def total_bytes(chosen: dict[int, Candidate]) -> int:
    """The stored bytes of a plan (one candidate per layer)."""
    return sum(c.stored_bytes for c in chosen.values())


def total_error(chosen: dict[int, Candidate]) -> float:
    """The weighted squared error of a plan (one candidate per layer)."""
    return sum(c.error for c in chosen.values())


@dataclass(frozen=True)
class Validation:
    """One plan evaluated by ``--validate``: what it is, what it stores, its proxy error and its measured KL."""

    label: str  # "all candidates", or the one codec kind it uses ("int2 only")
    chosen: dict[int, Candidate]
    mean_kl: float  # nats per token against the model's own FFNs on the validation text (NaN is never kept)
    ppl_change_pct: float

    @property
    def stored_bytes(self) -> int:
        return total_bytes(self.chosen)

    @property
    def error(self) -> float:
        return total_error(self.chosen)

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "stored_bytes": self.stored_bytes,
            "weighted_sq_error": self.error,
            "mean_kl": self.mean_kl if math.isfinite(self.mean_kl) else None,
            "ppl_change_pct": self.ppl_change_pct if math.isfinite(self.ppl_change_pct) else None,
            "layers": {str(i): c.spec for i, c in sorted(self.chosen.items())},
        }


@dataclass(frozen=True)
class AutoPlan:
    """The chosen codec of every layer, and what was measured (``validation``: the plans ``--validate``
    evaluated, in the order of their proxy error; the chosen one is the first of least KL)."""

    budget_bytes: int
    chosen: dict[int, Candidate]
    measured: dict[int, list[Candidate]]
    validation: tuple[Validation, ...] | None = None

    @property
    def stored_bytes(self) -> int:
        return total_bytes(self.chosen)

    @property
    def error(self) -> float:
        return total_error(self.chosen)

    def specs(self) -> dict[int, CodecSpec]:
        return {i: parse_spec(c.spec) for i, c in self.chosen.items()}

    def as_json(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget_bytes,
            "stored_bytes": self.stored_bytes,
            "weighted_sq_error": self.error,
            "layers": {str(i): c.as_json() for i, c in sorted(self.chosen.items())},
            "validation": None if self.validation is None else [v.as_json() for v in self.validation],
        }

    def validated(self, results: Sequence[Validation]) -> AutoPlan:
        """This plan with ``results`` recorded and the first one of least KL chosen (NaN KL counts as inf)."""
        best = min(results, key=lambda v: v.mean_kl if math.isfinite(v.mean_kl) else math.inf)
        return AutoPlan(self.budget_bytes, dict(best.chosen), self.measured, tuple(results))


def candidate_specs(texts: Sequence[str], width: int) -> list[CodecSpec]:
    """The candidate specs for tables of ``width`` columns (``H`` in a rank stands for the width: ``rank=H/4``);
    candidates that cannot encode that width (a group or rank that does not fit) are left out, duplicates once.
    ``fp32``, ``fp16`` and ``bf16`` stand for the dense casts, as the schemes name them.

    Example:
        >>> [str(s) for s in candidate_specs(["int4", "int4(group=64)", "int8(group=48)", "svd(rank=H/2)"], 128)]
        ['int4', 'svd(rank=64)']
    """
    out: dict[str, CodecSpec] = {}
    rejected = []
    for text in texts:
        text = f"dense(dtype={text})" if text in DENSE_SCHEMES else text  # fp16 as the scheme names it
        spec = parse_spec(_with_width(text, width))
        if getattr(spec, "cross_layer", False):
            raise UsageError(
                f"candidate {text!r}: a cross-layer svd encodes all layers at once, so it cannot be one layer's choice",
                hint="compare it with --scheme auto by building it on its own (tolcli sweep takes both)",
            )
        if width % spec.width_multiple:
            rejected.append(text)
            continue
        try:
            codec = spec.build(width)
            # a group or rank that does not fit refuses here (the bytes, not the tensors: a mixed codec, or an svd's
            # mixed residual, knows its tensors once fitted)
            codec.stored_bytes(1 << 10, width)
        except UsageError:
            rejected.append(text)  # also an SVD without a fixed rank (budget=, energy=): auto sets the budget
            continue
        out.setdefault(str(spec), spec)
    if not out:
        raise UsageError(
            f"no candidate codec can encode tables {width} wide ({', '.join(rejected)})",
            hint="give other --candidates; SVD candidates need a fixed rank, e.g. svd(rank=H/4,a=int4(group=32))",
        )
    return list(out.values())


def _with_width(text: str, width: int) -> str:
    """``rank=H/4`` -> ``rank=32`` at width 128 (multiples of 8, at least 8)."""
    for frac in ("H/8", "H/4", "H/2", "H"):
        text = text.replace(frac, str(max(8, width // int(frac[2:] or 1) // 8 * 8)))
    return text


def choose(measured: dict[int, list[Candidate]], budget: int) -> dict[int, Candidate]:
    """One candidate per layer: the least total error whose bytes fit ``budget`` (Lagrangian, then greedy)."""
    floor = sum(min(c.stored_bytes for c in cs) for cs in measured.values())
    if floor > budget:
        raise UsageError(
            f"the budget of {budget:,} bytes is below the smallest candidates' {floor:,} bytes",
            hint="raise --budget or add smaller --candidates (mixed(bits=1), int2)",
        )

    layers = sorted(measured.items())

    def pick(lam: float) -> dict[int, Candidate]:
        return {i: min(cs, key=lambda c: (c.error + lam * c.stored_bytes, c.stored_bytes)) for i, cs in layers}

    best = pick(0.0)
    if total_bytes(best) > budget:
        scale = max(max(c.error for c in cs) for cs in measured.values()) or 1.0
        lo, hi = 0.0, scale  # pick(hi) is the smallest candidate of every layer (errors below scale, bytes >= 1)
        while total_bytes(pick(hi)) > budget:  # ends: at hi = inf every layer takes its smallest candidate, which fit
            hi *= 2
        for _ in range(BISECT_STEPS):
            mid = (lo + hi) / 2 if lo == 0.0 else math.sqrt(lo * hi)
            if mid in (lo, hi):
                break
            if total_bytes(pick(mid)) <= budget:
                hi = mid
            else:
                lo = mid if mid > 0 else hi * 1e-30
        best = pick(hi)
    while True:  # greedy upgrades with what is left of the budget
        left = budget - total_bytes(best)
        moves = [
            ((best[i].error - c.error) / max(1, c.stored_bytes - best[i].stored_bytes), i, c)
            for i, cs in measured.items()
            for c in cs
            if c.error < best[i].error and c.stored_bytes - best[i].stored_bytes <= left
        ]
        if not moves:
            return best
        _, i, c = max(moves, key=lambda m: (m[0], -m[1]))
        best = {**best, i: c}


def codec_kind(spec: str) -> str:
    """The codec a candidate spec uses, without its options: ``int4(group=64)`` -> ``int4``; the dense casts
    keep their dtype (``dense(dtype=fp16)``), so that fp16 and fp32 are kinds of their own."""
    parsed = parse_spec(spec)
    return str(parsed) if parsed.name == "dense" else parsed.name


def alternative_plans(
    measured: dict[int, list[Candidate]], budget: int, top: int = VALIDATE_PLANS
) -> list[tuple[str, dict[int, Candidate]]]:
    """The plans ``--validate`` evaluates: the plan of all candidates (:func:`choose`), then the best plan of
    each codec kind alone (every layer one of that kind's candidates) that fits ``budget``, distinct plans only,
    in the order of their total error; at most ``top`` of them, the plan of all candidates always first.

    Example:
        >>> m = {0: [Candidate("int4", 10, 1.0), Candidate("int2", 5, 4.0), Candidate("int8", 20, 0.1)]}
        >>> [(label, plan[0].spec) for label, plan in alternative_plans(m, 12)]
        [('all candidates', 'int4'), ('int2 only', 'int2')]
    """
    plans = [("all candidates", choose(measured, budget))]
    kinds = dict.fromkeys(codec_kind(c.spec) for cs in measured.values() for c in cs)
    others = []
    for kind in kinds:
        only = {i: [c for c in cs if codec_kind(c.spec) == kind] for i, cs in measured.items()}
        if not all(only.values()):
            continue  # some layer has no candidate of this kind
        try:
            others.append((f"{kind} only", choose(only, budget)))
        except UsageError:
            continue  # does not fit the budget
    for label, plan in sorted(others, key=lambda p: total_error(p[1])):
        if len(plans) < top and all(plan != p for _, p in plans):
            plans.append((label, plan))
    return plans


def measure_layer(
    source: Any, specs: Sequence[CodecSpec], weights: torch.Tensor | None, measure: Any
) -> list[Candidate]:
    """Every spec's bytes and weighted squared error on one layer (``measure(codec, source, weights)`` returns
    the per-row squared errors, fp64 [V])."""
    out = []
    for spec in specs:
        codec = spec.build(source.width, weights=weights)
        err = measure(codec, source)
        w = torch.ones_like(err) if weights is None else weights.double()
        total = float((w * err).sum())
        total = total if math.isfinite(total) else math.inf  # NaN (a zero weight on an overflow) never chosen
        out.append(Candidate(str(spec), codec.stored_bytes(source.rows, source.width), total))
    return out


def plan_auto(
    layers: dict[int, Any],
    specs: Sequence[CodecSpec],
    weights: dict[int, torch.Tensor] | None,
    budget: int,
    measure: Any,
    progress: Progress | None = None,
) -> AutoPlan:
    """Measure every candidate on every layer (``layers``: index -> its row source) and choose (:func:`choose`)."""
    measured = measure_candidates(layers, specs, weights, measure, progress)
    return AutoPlan(budget, choose(measured, budget), measured)


def measure_candidates(
    layers: dict[int, Any],
    specs: Sequence[CodecSpec],
    weights: dict[int, torch.Tensor] | None,
    measure: Any,
    progress: Progress | None = None,
) -> dict[int, list[Candidate]]:
    """Every candidate measured on every layer (:func:`measure_layer`): what a plan at any budget chooses from. A
    candidate that cannot encode a layer is left out of that layer's list; a layer none can encode is refused."""
    progress = progress or NullProgress()
    progress.start(f"auto: {len(specs)} candidates x {len(layers)} layer(s)", len(layers) * len(specs))
    measured = {}
    for i, source in sorted(layers.items()):
        cands: list[Candidate] = []
        failed: TolcliError | None = None
        for spec in specs:
            try:
                cands += measure_layer(source, [spec], None if weights is None else weights[i], measure)
            except (UsageError, InputError) as e:  # this candidate cannot encode this layer: the others may
                failed = e
            progress.advance(1)
        if not cands:
            assert failed is not None
            raise failed
        measured[i] = cands
    progress.finish()
    return measured
