"""Scale searches in cache-sized blocks: `mixed`'s class fit and `fit=mse` int4 on a 4,096-row batch, blocked vs whole.

The clipping searches (``tolcli.codecs.mixed.fit_group_codes``, every class of every row when ``mixed`` allocates;
``tolcli.codecs.quant.fit_mse``, ``--fit mse``) make dozens of elementwise passes over their input. Fitted in
blocks of ``FIT_CHUNK_VALUES`` values (``tolcli.codecs.base.fit_chunks``) their temporaries stay in a core's L2
cache. Baseline: the same call on the whole batch at once (the block size set above the batch), in the same
process, one call each (warmed up on a small batch); the results are checked to be identical bit for bit.
Compress reads 4,096-row batches by default.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

import tolcli.codecs.base as base
from benchmarks._util import row
from tolcli.codecs.mixed import fit_group_codes
from tolcli.codecs.quant import quantize_int4

SHAPES = ((4_096, 128), (4_096, 2_048))  # a demo batch; a 1B-scale batch (compress's default 4,096 rows)
GOAL = 2.0  # at h = 2,048: blocked at least 2x faster than whole


def _time(fn: Callable[[], tuple], whole: bool) -> tuple[float, tuple]:
    saved = base.FIT_CHUNK_VALUES
    base.FIT_CHUNK_VALUES = 1 << 62 if whole else saved
    try:  # one call each: a whole-batch call at h = 2,048 takes seconds
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out
    finally:
        base.FIT_CHUNK_VALUES = saved


def _same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True) if x is not None)


def run() -> Iterator[str]:
    torch.manual_seed(0)
    yield f"  blocks of {base.FIT_CHUNK_VALUES:,} values; {torch.get_num_threads()} torch threads"
    fit_group_codes(torch.randn(64, 2, 64), 3)  # warm-up
    quantize_int4(torch.randn(64, 128), 64, False, "mse")
    for R, h in SHAPES:
        x = torch.randn(R, h) * torch.rand(R, 1)
        cases = {
            "mixed class fit (3 bits, groups of 64)": lambda x=x: fit_group_codes(x.reshape(x.shape[0], -1, 64), 3),
            "int4 g64 --fit mse": lambda x=x: quantize_int4(x, 64, False, "mse"),
        }
        for name, fn in cases.items():
            t_whole, out_whole = _time(fn, whole=True)
            t_block, out_block = _time(fn, whole=False)
            if not _same(out_whole, out_block):
                raise AssertionError(f"{name}: blocked results differ from whole-batch results")
            goal = f"goal >= {GOAL}x" if h == 2_048 else ""
            yield row(f"{R:,} x {h:,}: {name}, whole batch", f"{t_whole * 1e3:.0f} ms")
            yield row(f"{R:,} x {h:,}: {name}, blocked (identical)", f"{t_block * 1e3:.0f} ms", t_whole / t_block, goal)


if __name__ == "__main__":
    for line in run():
        print(line)
