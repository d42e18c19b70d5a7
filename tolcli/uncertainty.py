"""Error bars for per-token scores: standard errors of means (weighted where a protocol weights tokens), paired
differences, proportions and the distribution of KL divergences.

Tokens are treated as independent samples, as llama.cpp's ``perplexity`` and ``kl-divergence`` do; tokens of one
window share context, so these intervals are optimistic for strongly correlated text (``docs/evaluation.md``).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def mean_stderr(x: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """Weighted mean and its standard error ``sqrt(sum w^2 (x - m)^2) / sum w * sqrt(n / (n - 1))``; with unit
    weights the familiar ``sqrt(sum (x - m)^2 / (n (n - 1)))``. The error is NaN for fewer than 2 samples."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if n == 0:
        return math.nan, math.nan
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    mean = float((w * x).sum() / total)
    if n < 2:
        return mean, math.nan
    se = math.sqrt(float((w * w * (x - mean) ** 2).sum())) / total * math.sqrt(n / (n - 1))
    return mean, se


def proportion_stderr(p: float, n: int) -> float:
    """``sqrt(p (1 - p) / (n - 1))``: llama.cpp's error of its "same top p"."""
    return math.sqrt(p * (1.0 - p) / (n - 1)) if n > 1 else math.nan


def z_value(confidence: float) -> float:
    """The two-sided normal quantile for ``confidence`` (1.96 for 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf((1.0 + confidence) / 2.0)


def kl_summary(kl: np.ndarray) -> dict[str, float]:
    """Mean, its standard error, median, 90/99/99.9th percentiles (numpy's linear interpolation) and maximum."""
    kl = np.asarray(kl, dtype=np.float64)
    if kl.size == 0:
        return {k: math.nan for k in ("mean", "stderr", "median", "p90", "p99", "p999", "max")}
    mean, se = mean_stderr(kl)
    p50, p90, p99, p999 = np.percentile(kl, [50.0, 90.0, 99.0, 99.9])
    return {
        "mean": mean,
        "stderr": se,
        "median": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "p999": float(p999),
        "max": float(kl.max()),
    }


def change_interval(diff_mean: float, diff_se: float, confidence: float) -> tuple[float, float]:
    """Percent change of perplexity, ``100 (exp(d) - 1)``, at the ends of the interval ``d +- z se`` of the paired
    mean NLL difference ``d`` (variant minus reference)."""
    z = z_value(confidence)
    return 100.0 * math.expm1(diff_mean - z * diff_se), 100.0 * math.expm1(diff_mean + z * diff_se)
