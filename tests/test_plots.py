"""Sweep plots (issue 18): every bundle a labelled point, zero and negative changes drawn where they are, the
confidence interval as error bars, KL beside perplexity, and no figure without points."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require

from tolcli.plots import drop_series, point_label, rd_series, sweep_figures


def _row(name: str, family: str, frac: float | None, change: float, ci=None, kl=0.01, **kw) -> dict:
    return {
        "name": name,
        "family": family,
        "stored_bytes": None if frac is None else int(frac * 1000),
        "fraction_of_dense_fp16": frac,
        "ppl_change_pct": change,
        "ppl_change_pct_ci": ci,
        "mean_kl": kl,
        **kw,
    }


ROWS = [
    _row("baseline", "baseline", None, 0.0),
    _row("dense-fp32", "dense fp32", 2.0, 0.0),
    _row("int4-g64", "int4", 0.28, 0.17, [0.1, 0.25], 0.002),
    _row("int4-g32", "int4", 0.31, -0.02, [-0.05, 0.01], 0.0015),
    _row("svd-r16", "svd", 0.12, 9.5, None, 0.3),
    _row("adaptive-svd@r16", "adaptive-svd", 0.12, 4.0, [3.5, 4.6], 0.1),
    _row("drop-last-2", "drop", None, 12.0, [11.0, 13.5], layers_dropped=2),
    _row("drop-last-1", "drop", None, 4.0, [3.0, 5.0], layers_dropped=1),
]
META = {"model": "m", "tokens_scored": 10, "ctx": 8}


def test_rate_distortion_series_keep_negative_changes_and_intervals() -> None:
    s = {x.family: x for x in rd_series(ROWS)}
    assert list(s) == ["int4", "svd", "adaptive-svd"]  # no dense fp32, no baseline, no drops
    int4 = s["int4"]
    assert int4.x == [0.28, 0.31] and int4.change == [0.17, -0.02]  # sorted by bytes; -0.02 not clipped
    assert int4.err == [pytest.approx((0.07, 0.08)), pytest.approx((0.03, 0.03))]
    assert int4.kl == [0.002, 0.0015] and int4.labels == ["g64", "g32"]
    assert s["svd"].err == [(0.0, 0.0)]  # no interval measured: no bar
    assert s["adaptive-svd"].labels == ["@r16"]


def test_drop_series_starts_at_the_model_itself() -> None:
    x, change, err = drop_series(ROWS)
    assert x == [0, 1, 2] and change == [0.0, 4.0, 12.0]
    assert err == [(0, 0), pytest.approx((1.0, 1.0)), pytest.approx((1.0, 1.5))]
    assert drop_series(ROWS[:6]) == ([], [], [])


def test_point_labels() -> None:
    assert point_label("svd-r8-weighted", "svd (weighted)") == "r8-weighted"
    assert point_label("adaptive-svd+int4-0.25", "adaptive-svd+int4") == "0.25"
    assert point_label("int8", "int8") == "int8"
    assert point_label("mixed:b3", "int4") == "mixed:b3"


@pytest.mark.parametrize(
    ("rows", "want"),
    [
        (ROWS, {"rate_distortion.png", "drop_layers.png"}),
        (ROWS[:6], {"rate_distortion.png"}),
        (ROWS[:1] + ROWS[6:], {"drop_layers.png"}),
    ],
)
def test_no_figure_without_points(tmp_path: Path, rows: list[dict], want: set[str]) -> None:
    require("matplotlib")
    paths = sweep_figures(tmp_path, rows, META, note=print)
    assert {p.name for p in paths} == want == {p.name for p in tmp_path.iterdir()}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
