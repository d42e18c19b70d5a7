"""A sweep's results as Markdown (``results.md``): every variant in one table, and the frontier: the variant of
least KL at or under each of a few byte budgets. ``scripts/gen_compression_table.py`` copies it into
``docs/compression.md``, so the documented figures are what ``tolcli sweep`` printed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# Byte budgets of the frontier, as fractions of the dense fp16 tables (bits per value / 16).
FRONTIER_FRACTIONS = (0.10, 0.125, 0.15625, 0.1875, 0.25, 0.28125)


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None or not math.isfinite(x) else format(x, fmt)


def _kl(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return ""
    return "0" if x == 0 else f"{x:.2e}"


def _cells(r: dict[str, Any]) -> list[str]:
    frac = r.get("fraction_of_dense_fp16")
    top1 = r.get("top1_agreement")
    return [
        _num(frac, ".3f"),
        _num(None if frac is None else 16 * frac, ".2f"),
        _num(r.get("mean_rel_error"), ".3f"),
        _num(r.get("ppl"), ".2f"),
        _num(r.get("ppl_change_pct"), "+.2f") + ("%" if r.get("ppl_change_pct") is not None else ""),
        _kl(r.get("mean_kl")),
        _num(None if top1 is None else 100 * top1, ".1f") + ("%" if top1 is not None else ""),
    ]


def variants_table(rows: Sequence[dict[str, Any]]) -> str:
    """Every row with a bundle (the reference and drops have no bytes and are left out), in sweep order."""
    head = "| variant | family | bytes / fp16 | bits / value | mean rel. error | ppl | change | KL | top-1 agree |"
    lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("stored_bytes") is None:
            continue
        lines.append("| " + " | ".join([f"`{r['name']}`", r["family"], *_cells(r)]) + " |")
    return "\n".join(lines)


def frontier(rows: Sequence[dict[str, Any]], fractions: Sequence[float] = FRONTIER_FRACTIONS) -> list[Any]:
    """For each budget (a fraction of dense fp16): the row of least mean KL whose bytes fit it, or None.
    Rows without bytes or without a finite KL are never chosen; ties go to the first row.

    Example:
        >>> rows = [{"name": "a", "fraction_of_dense_fp16": 0.2, "mean_kl": 0.01, "stored_bytes": 2},
        ...         {"name": "b", "fraction_of_dense_fp16": 0.1, "mean_kl": 0.05, "stored_bytes": 1}]
        >>> [None if r is None else r["name"] for r in frontier(rows, (0.05, 0.1, 0.25))]
        [None, 'b', 'a']
    """
    out = []
    for f in fractions:
        fits = [
            r
            for r in rows
            if r.get("stored_bytes") is not None
            and r["fraction_of_dense_fp16"] <= f * (1 + 1e-9)
            and r.get("mean_kl") is not None
            and math.isfinite(r["mean_kl"])
        ]
        out.append(min(fits, key=lambda r: r["mean_kl"]) if fits else None)
    return out


def frontier_table(rows: Sequence[dict[str, Any]], fractions: Sequence[float] = FRONTIER_FRACTIONS) -> str:
    head = "| budget (of fp16) | bits / value | least KL within it | bytes / fp16 | ppl | change | KL | top-1 agree |"
    lines = [head, "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for f, r in zip(fractions, frontier(rows, fractions), strict=True):
        if r is None:
            lines.append(f"| {f:.4g} | {16 * f:.2f} | (none fits) | | | | | |")
            continue
        frac, _, _, ppl, change, kl, top1 = _cells(r)
        lines.append(f"| {f:.4g} | {16 * f:.2f} | `{r['name']}` | {frac} | {ppl} | {change} | {kl} | {top1} |")
    return "\n".join(lines)


def results_markdown(rows: Sequence[dict[str, Any]], protocol: dict[str, Any]) -> str:
    """``results.md``: what was scored, the frontier, then every bundle."""
    base = next((r for r in rows if r["name"] == "baseline"), None)
    scored = protocol.get("tokens_scored")
    what = [f"baseline perplexity {base['ppl']:.2f}" if base else None, f"{scored:,} tokens scored" if scored else None]
    return (
        "# Sweep results\n\n"
        + ("; ".join(w for w in what if w) + ". " if any(what) else "")
        + "Bytes are a fraction of the dense fp16 tables; KL is the mean per token against the model's own FFNs.\n\n"
        + "## The least KL within each budget\n\n"
        + frontier_table(rows)
        + "\n\n## Every bundle\n\n"
        + variants_table(rows)
        + "\n"
    )
