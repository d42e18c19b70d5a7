"""Timing helpers: best-of-N wall time, so one noisy run does not decide a ratio."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """The best wall time of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones."""
    return best_and_median(fn, repeat, warmup)[0]


def best_and_median(fn: Callable[[], object], repeat: int, warmup: int = 1) -> tuple[float, float]:
    """``(best, median)`` wall time of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0], times[len(times) // 2]


def row(name: str, value: str, ratio: float | None = None, goal: str = "") -> str:
    r = "" if ratio is None else f"{ratio:8.2f}x"
    return f"  {name:<62} {value:>16} {r:>8}  {goal}"
