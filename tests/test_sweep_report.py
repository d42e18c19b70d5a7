"""results.md: the frontier against brute force, the tables' cells against the rows, and the generated tables of
docs/compression.md against the committed demo results they were rendered from."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

from tolcli.sweep_report import frontier, frontier_table, results_markdown, variants_table

ROOT = Path(__file__).resolve().parents[1]


def _rows(seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = [{"name": "baseline", "family": "reference", "stored_bytes": None, "ppl": 50.0, "mean_kl": 0.0}]
    for k in range(12):
        frac = rng.choice([0.05, 0.1, 0.125, 0.2, 0.25, 0.3, 0.5])
        kl = rng.choice([rng.uniform(0, 0.1), math.nan])
        rows.append(
            {
                "name": f"v{k}",
                "family": "f",
                "stored_bytes": int(frac * 1000),
                "fraction_of_dense_fp16": frac,
                "mean_rel_error": 0.1,
                "ppl": 51.0,
                "ppl_change_pct": 2.0,
                "mean_kl": kl,
                "top1_agreement": 0.9,
            }
        )
    return rows


def test_the_frontier_is_the_least_kl_that_fits_by_brute_force() -> None:
    fractions = (0.04, 0.1, 0.125, 0.25, 1.0)
    for seed in range(30):
        rows = _rows(seed)
        got = frontier(rows, fractions)
        for f, r in zip(fractions, got, strict=True):
            best = None
            for cand in rows:  # brute force: every row with bytes and a finite KL whose bytes fit
                if cand["stored_bytes"] is None or not cand["stored_bytes"] <= f * 1000:
                    continue
                if math.isnan(cand["mean_kl"]):
                    continue
                if best is None or cand["mean_kl"] < best["mean_kl"]:
                    best = cand
            assert r is best, (seed, f)


def test_tables_show_the_rows_numbers() -> None:
    rows = _rows(3)
    rows[1].update(fraction_of_dense_fp16=0.1875, mean_kl=0.00521, ppl_change_pct=0.123, top1_agreement=0.9521)
    table = variants_table(rows)
    assert "`baseline`" not in table  # no bytes: not a bundle
    assert "| `v0` | f | 0.188 | 3.00 | 0.100 | 51.00 | +0.12% | 5.21e-03 | 95.2% |" in table
    assert table.count("\n") == 1 + 12  # header, rule, one line per bundle
    assert "| 0.1875 | 3.00 | `v0` | 0.188 | 51.00 | +0.12% | 5.21e-03 | 95.2% |" in frontier_table(rows, (0.1875,))
    assert "| 0.01 | 0.16 | (none fits) |" in frontier_table(rows, (0.01,))
    md = results_markdown(rows, {"tokens_scored": 1234})
    assert md.startswith("# Sweep results\n\nbaseline perplexity 50.00; 1,234 tokens scored.")


def test_the_docs_tables_are_rendered_from_the_committed_demo_results() -> None:
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen_compression_table.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    results = json.loads(gen.RESULTS.read_text(encoding="utf-8"))
    doc = gen.DOC.read_text(encoding="utf-8")
    assert gen.render(results) in doc, "docs/compression.md is stale: run scripts/gen_compression_table.py SWEEP_DIR"
    names = {r["name"] for r in results["rows"]}
    for family in ("mixed", "auto"):  # the issue-16 codecs are in the demo sweep
        assert any(n.startswith(f"{family}-") for n in names), family
