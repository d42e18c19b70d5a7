"""The shipped demo models: present, small, and the README's figures reproduce within 1%."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from tolcli.demo import DEMO_DIR, demo_heldout_path
from tolcli.demo.figures import demo_figures

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_figures() -> dict[str, float]:
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- demo-figures:start -->")[1].split("<!-- demo-figures:end -->")[0]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"[\d,]+", cells[1]):
            rows[cells[0]] = (
                int(cells[1].replace(",", "")),
                int(cells[2].replace(",", "")),
                float(cells[3]),
                float(cells[4]),
            )
    return rows


@pytest.fixture(scope="module")
def figures() -> dict[str, float | int]:
    return demo_figures()


def test_demo_is_small_enough_to_ship() -> None:
    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file() and p.suffix != ".py")
    assert total <= 10_000_000


def test_readme_figures_reproduce(figures) -> None:
    rows = readme_figures()
    assert set(rows) == {"memoryllm", "memoryllm, FFN memory zeroed", "llama"}
    n_bytes = len(demo_heldout_path().read_bytes())  # the file is UTF-8 text: its bytes are the text's
    for label, key, kind in [
        ("memoryllm", "memoryllm_ppl", "memoryllm"),
        ("memoryllm, FFN memory zeroed", "memoryllm_ppl_memory_zeroed", "memoryllm"),
        ("llama", "llama_ppl", "llama"),
    ]:
        total, active, ppl, bpb = rows[label]
        assert total == figures[f"{kind}_params_total"] and active == figures[f"{kind}_params_active"]
        assert math.isclose(ppl, figures[key], rel_tol=0.01), (label, ppl, figures[key])
        # Expected bits per byte from the perplexity itself: NLL sum = ln(ppl) x (tokens - 1), over bytes x ln 2.
        want = math.log(figures[key]) * (figures["heldout_tokens"] - 1) / (n_bytes * math.log(2))
        assert math.isclose(bpb, want, rel_tol=0.01), (label, bpb, want)
        assert math.isclose(figures[key.replace("_ppl", "_bpb")], want, rel_tol=1e-9)


def test_ffn_memory_matters(figures) -> None:
    assert figures["memoryllm_ppl_memory_zeroed"] >= 1.2 * figures["memoryllm_ppl"]
